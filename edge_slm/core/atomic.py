"""Atomic writes: a file or a directory appears whole under its final name, or not at all.

Everything edge-slm publishes (bundles, manifests, the model cache, pruned models, checkpoints,
the emulation sysroot) is written beside its target under a temporary name that carries this
process's id, then renamed over it in one step, so an interrupted process leaves no half-written
thing under a name that looks complete.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends without error, it replaces `path`."""
    path = Path(path)
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
