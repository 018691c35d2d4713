"""Atomic writes: a file or a directory appears whole under its final name, or not at all.

Everything edge-slm publishes (bundles, manifests, the model cache, pruned models, checkpoints,
the emulation sysroot) is written beside its target under a temporary name that carries this
process's id, then renamed over it in one step, so an interrupted process leaves no half-written
thing under a name that looks complete. A process killed before it could clean up leaves its
`<name>.tmp-<pid>` (or `<name>.old-<pid>`) behind; the next write of the same target removes
those whose process is gone, and nothing else.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends without error, it replaces `path`."""
    path = Path(path)
    sweep_stale_temporaries(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextmanager
def atomic_directory(target: Path, tmp: Path | None = None) -> Iterator[Path]:
    """Yield an empty directory beside `target` (or `tmp`); when the block ends without error it
    takes `target`'s place (`swap_in`); on any error it is removed and `target` is untouched."""
    target = Path(target)
    sweep_stale_temporaries(target)
    tmp = Path(tmp) if tmp is not None else target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # a name only this process uses
    tmp.mkdir(parents=True)
    try:
        yield tmp
        swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def swap_in(tmp: Path, target: Path) -> None:
    """Put directory `tmp` at `target` by renames; a previous `target` is removed only after the
    new one is in place. The caller decides whether `target` may be replaced."""
    old = target.with_name(f"{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def temporary_name_pid(target: Path, name: str) -> int | None:
    """The process id in `name` if it is one of the temporary names this module gives `target`
    (`<target>.tmp-<pid>`, `<target>.old-<pid>`), else None."""
    match = re.fullmatch(re.escape(Path(target).name) + r"\.(?:tmp|old)-(\d{1,10})", name)
    return int(match.group(1)) if match else None


def sweep_stale_temporaries(target: Path) -> list[Path]:
    """Remove the temporary files and directories that killed processes left beside `target`:
    only names this module makes, only when their process no longer runs, never a link (a name
    can be forged; what it points to is not ours). Returns what was removed."""
    target = Path(target)
    removed = []
    try:
        candidates = list(target.parent.glob(glob.escape(target.name) + ".*-*"))
    except OSError:
        return removed
    for stale in candidates:
        pid = temporary_name_pid(target, stale.name)
        if pid is None or pid == os.getpid() or pid_alive(pid) or stale.is_symlink():
            continue
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        removed.append(stale)
    return removed


def pid_alive(pid: int) -> bool:
    """True if a process `pid` exists (one of another user counts: its files are not ours to remove)."""
    try:
        os.kill(pid, 0)
    except (ValueError, ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return pid > 0
