"""SHA-256 of files and directories, shared by the build side and the torch-free runtime."""

from __future__ import annotations

import hashlib
from pathlib import Path

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_tree(directory: Path, patterns: tuple[str, ...] = ("*",)) -> str:
    """One digest over the names and contents of the matching files, in sorted order."""
    digest = hashlib.sha256()
    files = sorted({p for pattern in patterns for p in directory.glob(pattern) if p.is_file()})
    for path in files:
        digest.update(path.name.encode() + b"\0" + sha256_file(path).encode() + b"\n")
    return digest.hexdigest()
