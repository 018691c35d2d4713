"""Where a pruning run keeps its recovery checkpoints: in edge-slm's cache, one folder per output
path, so that the same command run again after an interruption resumes, and nothing is written
beside the user's --out or removed from there (a folder of theirs named like ours stays theirs)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from edge_slm.core.cache import cache_root


def checkpoint_dir(out: Path) -> Path:
    """The checkpoint folder of the run that writes `out` (the same for every spelling of the path)."""
    key = hashlib.sha256(str(Path(out).resolve()).encode()).hexdigest()[:16]
    return cache_root() / "prune-checkpoints" / key


def remove_checkpoints(out: Path) -> None:
    """Drop the checkpoints once `out` is published: only edge-slm's cache folder is removed."""
    shutil.rmtree(checkpoint_dir(out), ignore_errors=True)


def load_checkpoint(path: Path, progress):
    """A checkpoint's tensors and numbers, or None when there is none or it cannot be read: with
    weights_only no pickled code runs, so a file planted or damaged in the cache is passed over
    (and overwritten by the next checkpoint), never executed."""
    import torch

    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception as exc:  # any unreadable checkpoint means the same: start over
        progress(f"{path.name}: not a checkpoint this run can read ({type(exc).__name__}); starting over")
        return None
