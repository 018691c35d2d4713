"""Bundles: the one contract between the build host and the device.

A bundle is a directory holding the ONNX model and its data, the tokenizer, `generation.json`
(chat template, BOS/EOS ids) and `manifest.json` (schema version, source, full profile, precision,
graph signature, per-file sha256 and size, versions, validation results). `write_bundle` writes
it atomically; `verify_bundle` checks schema and checksums before anything uses it. Torch-free:
the device runtime imports this module. `edge-slm inspect BUNDLE` shows and verifies one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edge_slm.core.atomic import atomic_directory, pid_alive, write_text
from edge_slm.core.errors import BundleError
from edge_slm.core.hashing import sha256_file
from edge_slm.core.manifest import Manifest
from edge_slm.core.manifest_schema import parse_manifest

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
STAGING_MARK = ".partial-"


@contextmanager
def staging_dir(out: Path) -> Iterator[Path]:
    """A scratch directory beside `out`; on success it replaces `out` in one rename.

    An interrupted or failed build leaves only a `.partial-*` directory with no manifest (never
    something that looks like a bundle) and never touches the previous good bundle at `out`.
    `out` must be free or an edge-slm bundle (`check_output_dir`): anything else is refused
    before the staging directory is made, and again just before it is replaced.
    """
    out = Path(out)
    check_output_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_staging(out)
    with atomic_directory(out, tmp=out.parent / f"{out.name}{STAGING_MARK}{os.getpid()}") as tmp:
        yield tmp
        if not (tmp / MANIFEST).is_file():
            raise BundleError(f"{tmp}: the build wrote no {MANIFEST}; nothing was published")
        check_output_dir(out)  # again: the directory may have changed while the build ran


def staging_name_pid(out: Path, name: str) -> int | None:
    """The process id in a staging or scratch directory name of `out`, or None if `name` is not
    one that edge-slm makes (`<out>.partial-<pid>` or `<out>.partial-scratch-<random>-<pid>`)."""
    match = re.fullmatch(re.escape(out.name) + re.escape(STAGING_MARK) + r"(?:scratch-[A-Za-z0-9_]+-)?(\d+)", name)
    return int(match.group(1)) if match else None


def sweep_stale_staging(out: Path) -> None:
    """Remove the staging and scratch directories of builds of `out` that were killed: only
    directories named as edge-slm names them, whose process is gone."""
    for stale in out.parent.glob(f"{out.name}{STAGING_MARK}*"):
        pid = staging_name_pid(out, stale.name)
        if pid is not None and stale.is_dir() and not stale.is_symlink() and not pid_alive(pid):
            shutil.rmtree(stale, ignore_errors=True)


def check_output_dir(out: Path, source: Path | None = None) -> None:
    """Refuse an output directory that a build must not replace, before any work starts.

    A build may write to a path that does not exist, an empty directory, or an edge-slm bundle
    (`is_bundle_dir`); never to a file, a symlink, a directory with anything else in it, a
    directory it cannot write, or a place inside the model it is building from.
    """
    out = Path(out)
    if out.is_symlink():
        raise BundleError(f"--out {out} is a symbolic link: give the real directory or a new path")
    if out.exists() and not out.is_dir():
        raise BundleError(f"--out {out} is a file, not a directory: choose another --out")
    if out.is_dir() and any(out.iterdir()) and not is_bundle_dir(out):
        raise BundleError(
            f"--out {out} exists and is not an edge-slm bundle (it holds files the build did not "
            "make): edge-slm replaces only its own bundles; choose another --out or empty it yourself"
        )
    if source is not None:
        source = Path(source).resolve()
        where = out.resolve()
        if where == source or source in where.parents or (source.is_file() and source.parent == where):
            raise BundleError(f"--out {out} is inside the model being built ({source}): choose a directory elsewhere")
    parent = next((p for p in [out, *out.absolute().parents] if p.exists()), None)
    if parent is not None and parent != out and not parent.is_dir():
        raise BundleError(f"--out {out}: {parent} is a file, not a folder: choose another --out")
    if parent is not None and not os.access(parent if parent.is_dir() else parent.parent, os.W_OK | os.X_OK):
        raise BundleError(f"--out {out}: {parent} is not writable by this user: choose another --out")


def is_bundle_dir(directory: Path) -> bool:
    """True if `directory` is provably an edge-slm bundle: its manifest parses as an edge-slm
    manifest of this schema, and it holds nothing but the files that manifest lists. Anything else
    may be a user's and is never replaced."""
    directory = Path(directory)
    if directory.is_symlink() or not directory.is_dir():
        return False
    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not (
        isinstance(manifest, dict)
        and manifest.get("schema_version") == SCHEMA_VERSION
        and isinstance(manifest.get("files"), dict)
        and isinstance(manifest.get("target"), str)
        and isinstance(manifest.get("precision"), str)
    ):
        return False
    allowed = {MANIFEST, *manifest["files"]}
    for entry in directory.iterdir():
        if entry.name not in allowed or entry.is_symlink() or not entry.is_file():
            return False
    return True


def write_manifest(bundle_dir: Path, manifest: dict) -> dict:
    """Add checksums of every file in `bundle_dir` and write `manifest.json` (the last file)."""
    files = {}
    for path in sorted(bundle_dir.iterdir()):
        if path.is_file() and path.name != MANIFEST:
            path.chmod(0o644)  # onnx writes external data owner-only; a device user must read it
            files[path.name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest = {"schema_version": SCHEMA_VERSION, **manifest, "files": files}
    write_text(bundle_dir / MANIFEST, json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return manifest


def read_manifest(bundle_dir: Path) -> Manifest:
    """The bundle's typed manifest (`DecoderManifest`, `EncoderManifest`), checked as a whole."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise BundleError(f"{bundle_dir}: no such bundle directory (build one with `edge-slm build`)")
    path = bundle_dir / MANIFEST
    if not path.is_file():
        raise BundleError(f"{bundle_dir}: no {MANIFEST}, so not a complete bundle: rebuild it")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:
        raise BundleError(f"{path}: not valid JSON ({exc}): rebuild the bundle") from None
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if version != SCHEMA_VERSION:
        raise BundleError(
            f"{bundle_dir}: bundle schema version {version}, this edge-slm reads version "
            f"{SCHEMA_VERSION}: rebuild the bundle with this edge-slm or install the matching one"
        )
    return parse_manifest(manifest, str(path))


def verify_bundle(bundle_dir: Path, checksums: bool = True) -> Manifest:
    """Check the manifest's schema, that the bundle holds exactly the files it lists (each a plain
    file, no link, no folder: onnxruntime can open nothing unverified), and every file's size (and
    sha256); return the typed manifest."""
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    listed = manifest.files
    for entry in sorted(bundle_dir.iterdir()):
        if entry.name == MANIFEST:
            continue
        if entry.is_symlink() or not entry.is_file():
            raise BundleError(
                f"{entry}: a bundle holds only regular files, not links or folders: copy the bundle again or rebuild"
            )
        if entry.name not in listed:
            raise BundleError(
                f"{entry}: not listed in the manifest, so it cannot be verified: remove it, or copy the bundle again"
            )
    for name, expected in listed.items():
        path = bundle_dir / name
        if not path.is_file():
            raise BundleError(f"{path}: missing from the bundle: copy the whole directory again or rebuild")
        size = path.stat().st_size
        if size != expected.bytes:
            raise BundleError(
                f"{path}: {size} bytes, the manifest says {expected.bytes} (truncated or replaced): "
                "copy it again or rebuild"
            )
        if checksums and sha256_file(path) != expected.sha256:
            raise BundleError(f"{path}: checksum mismatch (the file is corrupt): copy it again or rebuild")
    return manifest
