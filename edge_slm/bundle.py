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
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import BundleError
from .hashing import sha256_file

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
STAGING_MARK = ".partial-"


@contextmanager
def staging_dir(out: Path) -> Iterator[Path]:
    """A scratch directory beside `out`; on success it replaces `out` in one rename.

    An interrupted or failed build leaves only a `.partial-*` directory with no manifest (never
    something that looks like a bundle) and never touches the previous good bundle at `out`.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f"{out.name}{STAGING_MARK}*"):
        if not _pid_alive(stale.name.rsplit("-", 1)[-1]):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f"{out.name}{STAGING_MARK}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if not (tmp / MANIFEST).is_file():
            raise BundleError(f"{tmp}: the build wrote no {MANIFEST}; nothing was published")
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _pid_alive(text: str) -> bool:
    try:
        os.kill(int(text), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _publish(tmp: Path, out: Path) -> None:
    if out.exists() and not (out / MANIFEST).is_file() and any(out.iterdir()):
        raise BundleError(f"{out} exists and is not a bundle: delete it or choose another --out")
    old = out.parent / f"{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def write_manifest(bundle_dir: Path, manifest: dict) -> dict:
    """Add checksums of every file in `bundle_dir` and write `manifest.json` (the last file)."""
    files = {}
    for path in sorted(bundle_dir.iterdir()):
        if path.is_file() and path.name != MANIFEST:
            path.chmod(0o644)  # onnx writes external data owner-only; a device user must read it
            files[path.name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest = {"schema_version": SCHEMA_VERSION, **manifest, "files": files}
    tmp = bundle_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, bundle_dir / MANIFEST)
    return manifest


def read_manifest(bundle_dir: Path) -> dict:
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise BundleError(f"{bundle_dir}: no such bundle directory (build one with `edge-slm build`)")
    path = bundle_dir / MANIFEST
    if not path.is_file():
        raise BundleError(f"{bundle_dir}: no {MANIFEST}, so not a complete bundle: rebuild it")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON ({exc}): rebuild the bundle") from None
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if version != SCHEMA_VERSION:
        raise BundleError(
            f"{bundle_dir}: bundle schema version {version}, this edge-slm reads version "
            f"{SCHEMA_VERSION}: rebuild the bundle with this edge-slm or install the matching one"
        )
    return manifest


def verify_bundle(bundle_dir: Path, checksums: bool = True) -> dict:
    """Check the schema version and every file's size (and sha256); return the manifest."""
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    for name, expected in manifest.get("files", {}).items():
        path = bundle_dir / name
        if not path.is_file():
            raise BundleError(f"{path}: missing from the bundle: copy the whole directory again or rebuild")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise BundleError(
                f"{path}: {size} bytes, the manifest says {expected['bytes']} (truncated or replaced): "
                "copy it again or rebuild"
            )
        if checksums and sha256_file(path) != expected["sha256"]:
            raise BundleError(f"{path}: checksum mismatch (the file is corrupt): copy it again or rebuild")
    return manifest
