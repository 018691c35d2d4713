"""Is the bundle being served still the bundle that was verified? A stat of its files (size,
mtime, inode) is cheap enough to take every few seconds; only when one changed are the sha256s
verified again (what `load` verified at start-up)."""

from __future__ import annotations

import os
from pathlib import Path

from edge_slm.core.errors import EdgeSlmError


class BundleWatch:
    def __init__(self, bundle: Path):
        self.bundle = Path(bundle)
        self._seen: dict[str, tuple] | None = None

    def _stat(self) -> dict[str, tuple]:
        seen = {}
        try:
            with os.scandir(self.bundle) as entries:
                for entry in entries:
                    st = entry.stat(follow_symlinks=False)
                    seen[entry.name] = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_mode)
        except OSError as exc:
            seen["<bundle>"] = (type(exc).__name__,)
        return seen

    def snapshot(self) -> None:
        self._seen = self._stat()

    def changed(self) -> bool:
        return self._seen is not None and self._stat() != self._seen

    def verify(self) -> str | None:
        """None if the bundle passes every check again (then this is the new snapshot), else why not."""
        from edge_slm.core.bundle import verify_bundle

        seen = self._stat()
        try:
            verify_bundle(self.bundle, checksums=True)
        except (EdgeSlmError, OSError) as exc:
            return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        self._seen = seen
        return None
