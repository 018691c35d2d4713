"""Output folders edge-slm may regenerate: a report folder, a fine-tuned model.

The rule is the bundle's (`core.bundle.check_output_dir`): a command writes to a path that does
not exist, an empty directory, or a folder it wrote itself, and refuses anything else before any
work starts. A folder is provably edge-slm's when it holds a list of what edge-slm wrote there
(`.edge-slm-files.json`: each file's sha256 and size) and nothing else: no other file, no link,
no subfolder, and no listed file changed since. A user's `README.md`, their edits to `report.md`
or a symlink planted in the folder make it theirs, and it is refused. The new folder is written
beside the old one and swapped in whole (`core.atomic.atomic_directory`), so no write ever goes
through a link inside the folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edge_slm.core.atomic import atomic_directory
from edge_slm.core.errors import EdgeSlmError
from edge_slm.core.hashing import sha256_file

FILES_LIST = ".edge-slm-files.json"
MAX_LIST_BYTES = 1_000_000  # a list of a few dozen files; anything larger is not one edge-slm wrote


class OutputError(EdgeSlmError):
    """An output path edge-slm must not write: a user's file or folder, a link, or not writable."""


def check_output_folder(out: Path, option: str = "--out") -> None:
    """Refuse `out` unless it is free, an empty directory, or a folder edge-slm wrote and nobody
    changed (see the module's docstring); every refusal names the path and the fix."""
    out = Path(out)
    if out.is_symlink():
        raise OutputError(f"{option} {out} is a symbolic link: give the real directory or a new path")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{option} {out} is a file, not a directory: choose another {option}")
    if out.is_dir() and any(out.iterdir()):
        problem = foreign_entry(out)
        if problem:
            raise OutputError(
                f"{option} {out} holds {problem}: edge-slm replaces only folders it wrote itself; "
                f"choose another {option} or move that away"
            )
    where = out.absolute()
    if where.exists() and (where.samefile(Path.cwd()) or where.resolve() in Path.cwd().resolve().parents):
        raise OutputError(f"{option} {out} is the current directory or holds it: give a new folder inside it")
    parent = next(p for p in where.parents if p.exists())  # the swap renames entries of this folder
    if not parent.is_dir():
        raise OutputError(f"{option} {out}: {parent} is a file, not a folder: choose another {option}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{option} {out}: {parent} is not writable by this user: choose another {option}")


def foreign_entry(folder: Path) -> str | None:
    """What in `folder` edge-slm did not write, in words, or None if every entry is a file it
    listed, unchanged."""
    mark = folder / FILES_LIST
    if not mark.exists() and not mark.is_symlink():
        return f"files edge-slm did not list as its own (no {FILES_LIST})"
    not_ours = f"a {FILES_LIST} that is not edge-slm's list of its files"
    if mark.is_symlink() or not mark.is_file() or mark.stat().st_size > MAX_LIST_BYTES:
        return not_ours
    try:
        listed = json.loads(mark.read_text(encoding="utf-8"))["files"]
        if not isinstance(listed, dict):
            raise TypeError
    except (OSError, ValueError, RecursionError, KeyError, TypeError):
        return not_ours
    for entry in sorted(folder.iterdir()):
        if entry.name == FILES_LIST:
            continue
        if entry.is_symlink():
            return f"{entry.name}, a symbolic link edge-slm did not make"
        if entry.name not in listed:
            return f"{entry.name}, which edge-slm did not write"
        if not entry.is_file():
            return f"{entry.name}, which is not a regular file"
        expected = listed[entry.name]
        if not isinstance(expected, dict) or entry.stat().st_size != expected.get("bytes"):
            return f"{entry.name}, changed since edge-slm wrote it"
        if sha256_file(entry) != expected.get("sha256"):
            return f"{entry.name}, changed since edge-slm wrote it"
    return None


def write_files_list(folder: Path, writer: str) -> None:
    """List every file in `folder` (flat: a subfolder is refused) with its sha256 and size."""
    files = {}
    for entry in sorted(folder.iterdir()):
        if entry.name == FILES_LIST:
            continue
        if entry.is_symlink() or not entry.is_file():
            raise OutputError(f"{entry}: {writer} wrote something other than a file; nothing was published")
        files[entry.name] = {"sha256": sha256_file(entry), "bytes": entry.stat().st_size}
    text = json.dumps({"written_by": writer, "files": files}, indent=2) + "\n"
    (folder / FILES_LIST).write_text(text, encoding="utf-8")


@contextmanager
def output_folder(out: Path, writer: str, option: str = "--out") -> Iterator[Path]:
    """Yield an empty staging folder beside `out`; when the block ends without error, its files
    are listed and it replaces `out` whole. `out` is checked before (and again just before the
    swap: it may have changed while the work ran); on an error `out` is untouched."""
    out = Path(out)
    check_output_folder(out, option)
    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(out) as staging:
        yield staging
        write_files_list(staging, writer)
        check_output_folder(out, option)
