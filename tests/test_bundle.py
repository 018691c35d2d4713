"""Bundles: manifest round-trip, checksum and schema verification, tokenizer fidelity, and
atomic writes (a killed or failed build never leaves a complete-looking bundle)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from edge_slm.core.bundle import MANIFEST, SCHEMA_VERSION, read_manifest, staging_dir, verify_bundle, write_manifest
from edge_slm.core.errors import BundleError
from edge_slm.core.hashing import sha256_file
from edge_slm.core.manifest import DecoderManifest


def test_manifest_round_trip(tiny_bundle, tiny_llama):
    manifest = verify_bundle(tiny_bundle)
    on_disk = json.loads((tiny_bundle / MANIFEST).read_text())
    assert "family" not in on_disk and isinstance(manifest, DecoderManifest) and manifest.raw == on_disk
    assert manifest.schema_version == SCHEMA_VERSION
    assert set(manifest.files) == {
        "model.onnx",
        "model.onnx.data",
        "tokenizer.json",
        "generation.json",
        "genai_config.json",
    }
    for name, info in manifest.files.items():
        assert info.sha256 == sha256_file(tiny_bundle / name)
        assert info.bytes == (tiny_bundle / name).stat().st_size
    assert manifest.target == "tiny-laptop" and manifest.precision == "fp32"
    assert manifest.stages == ("load", "export", "validate", "tokenizer", "manifest")
    assert manifest.profile.recorded["export"]["context_length"] == 128 == manifest.model.context_length
    assert manifest.source.kind == "hf-dir" and len(manifest.source.sha256) == 64
    assert manifest.model.num_layers == 2 and manifest.model.num_kv_heads == 2
    assert manifest.graph.kind == "fused" and manifest.graph.nodes == 37  # Neg + Slice: logits_to_keep
    assert manifest.graph.shared_kv_buffer and manifest.graph.prefill_file is None
    assert manifest.graph.recorded["inputs"][0] == {
        "name": "input_ids",
        "dtype": "int64",
        "shape": ["batch", "sequence"],
    }
    assert manifest.validation["passed"] and manifest.validation["max_abs_diff"]["logits"] < 1e-3
    assert {"edge_slm", "onnx", "onnxruntime", "torch", "transformers"} <= set(manifest.versions)
    generation = json.loads((tiny_bundle / "generation.json").read_text())
    assert generation["eos_token_ids"] == [2] and generation["chat_template"].startswith("{% for message")


def test_tokenizer_fidelity(tiny_bundle, tiny_llama):
    reference = AutoTokenizer.from_pretrained(tiny_llama)
    bundled = Tokenizer.from_file(str(tiny_bundle / "tokenizer.json"))
    chat = reference.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    for text in ["The capital of France is Paris.", "Ünïcödé 東京 1234 %&*", chat, ""]:
        assert bundled.encode(text).ids == reference(text).input_ids
    ids = bundled.encode(chat).ids
    assert ids[0] == 1 and ids[1] != 1  # <|im_start|> once: a single special id, no BOS added


@pytest.fixture()
def bundle_copy(tiny_bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    return copy


def test_one_changed_byte_is_named(bundle_copy):
    data = bundle_copy / "model.onnx.data"
    with open(data, "r+b") as handle:
        handle.seek(100)
        byte = handle.read(1)
        handle.seek(100)
        handle.write(bytes([byte[0] ^ 1]))
    with pytest.raises(BundleError, match=r"model.onnx.data: checksum mismatch"):
        verify_bundle(bundle_copy)
    verify_bundle(bundle_copy, checksums=False)  # same size: only the checksum can tell


def test_truncated_missing_and_foreign_files(bundle_copy):
    tok = bundle_copy / "tokenizer.json"
    tok.write_bytes(tok.read_bytes()[:100])
    with pytest.raises(BundleError, match=r"tokenizer.json: 100 bytes, the manifest says \d+"):
        verify_bundle(bundle_copy, checksums=False)
    tok.unlink()
    with pytest.raises(BundleError, match=r"tokenizer.json: missing from the bundle"):
        verify_bundle(bundle_copy)


def test_schema_version_and_bad_manifest(bundle_copy, tmp_path):
    manifest = json.loads((bundle_copy / MANIFEST).read_text())
    manifest["schema_version"] = SCHEMA_VERSION + 1
    (bundle_copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(
        BundleError, match=rf"bundle schema version {SCHEMA_VERSION + 1}, this edge-slm reads version {SCHEMA_VERSION}"
    ):
        read_manifest(bundle_copy)
    (bundle_copy / MANIFEST).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        read_manifest(bundle_copy)
    (bundle_copy / MANIFEST).unlink()
    with pytest.raises(BundleError, match="no manifest.json, so not a complete bundle"):
        read_manifest(bundle_copy)
    with pytest.raises(BundleError, match="no such bundle directory"):
        read_manifest(tmp_path / "nothing-here")


def test_failed_build_keeps_previous_bundle(bundle_copy):
    before = verify_bundle(bundle_copy)
    with pytest.raises(RuntimeError):
        with staging_dir(bundle_copy) as stage:
            (stage / "model.onnx").write_bytes(b"half written")
            write_manifest(stage, {"target": "x"})
            raise RuntimeError("export failed midway")
    assert verify_bundle(bundle_copy) == before
    assert not list(bundle_copy.parent.glob("bundle.partial-*"))


def test_staging_without_manifest_publishes_nothing(tmp_path):
    out = tmp_path / "fresh"
    with pytest.raises(BundleError, match="wrote no manifest.json; nothing was published"):
        with staging_dir(out) as stage:
            (stage / "model.onnx").write_bytes(b"x")
    assert not out.exists()


def _start_build(profile, model, out, stderr):
    """A real `edge-slm build` of the tiny model into `out`, running in the background."""
    command = [sys.executable, "-m", "edge_slm.cli", "build", "--target", str(profile), "--model", str(model)]
    return subprocess.Popen([*command, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=stderr, text=True)


def test_killed_build_leaves_no_complete_looking_bundle(bundle_copy, tiny_llama, tiny_profile):
    """SIGKILL a real `edge-slm build` while it writes: the old bundle survives untouched, and the
    partial directory has no manifest; the next build cleans it up."""
    before = verify_bundle(bundle_copy)
    proc = _start_build(tiny_profile, tiny_llama, bundle_copy, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    partial = []
    while time.monotonic() < deadline and proc.poll() is None:
        partial = list(bundle_copy.parent.glob("bundle.partial-*"))
        if partial:
            break
        time.sleep(0.005)
    assert partial, "the build finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert verify_bundle(bundle_copy) == before
    assert not (partial[0] / MANIFEST).exists()
    with pytest.raises(BundleError):
        read_manifest(partial[0])  # whatever it holds, it is not a bundle
    with staging_dir(bundle_copy) as stage:  # the next build sweeps the dead build's leftovers
        assert not partial[0].exists()
        # its fp32 scratch directory too (hundreds of MB for a real model)
        assert sorted(p.name for p in bundle_copy.parent.iterdir()) == sorted([stage.name, bundle_copy.name])
        write_manifest(stage, {"target": "rebuilt"})
    assert json.loads((bundle_copy / MANIFEST).read_text())["target"] == "rebuilt"


def test_terminated_build_cleans_up_and_says_so(bundle_copy, tiny_llama, tiny_profile):
    """SIGTERM (a closed terminal, `kill`, a CI timeout) unwinds like Ctrl-C: the staging and
    scratch directories are removed, the old bundle is untouched, one line says so."""
    before = verify_bundle(bundle_copy)
    proc = _start_build(tiny_profile, tiny_llama, bundle_copy, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if list(bundle_copy.parent.glob("bundle.partial-scratch-*")):
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the build finished before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, f"exit {proc.returncode}; stderr: {stderr[-2000:]}"
    assert (
        stderr.strip().splitlines()[-1] == "interrupted: nothing was published (the previous bundle, if any, is intact)"
    )
    assert "Traceback" not in stderr
    assert [p.name for p in bundle_copy.parent.iterdir()] == [bundle_copy.name]
    assert verify_bundle(bundle_copy) == before


# -- edge-slm replaces only what it made ---------------------------------------------------------
def _cli(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "edge_slm.cli", *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


def _tree(directory):
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "contents",
    [
        {"manifest.json": '{"name": "my-web-app", "version": "1.0"}', "index.html": "<h1>mine</h1>"},
        {"manifest.json": "not even json", "notes.txt": "keep me"},
    ],
)
def test_build_refuses_a_user_folder_that_has_a_manifest(tmp_path, tiny_llama, tiny_profile, contents):
    folder = tmp_path / "project"
    folder.mkdir()
    for name, text in contents.items():
        (folder / name).write_text(text)
    before = _tree(folder)
    started = time.monotonic()
    proc = _cli("build", "--target", tiny_profile, "--model", tiny_llama, "--out", folder)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: --out {folder} exists and is not an edge-slm bundle (it holds files the build did not make): "
        "edge-slm replaces only its own bundles; choose another --out or empty it yourself"
    ]
    assert time.monotonic() - started < 30  # refused before the build's minutes of work
    assert _tree(folder) == before


def test_build_refuses_a_bundle_with_a_foreign_file_in_it(bundle_copy, tiny_llama, tiny_profile):
    (bundle_copy / "my-notes.txt").write_text("not edge-slm's")
    before = _tree(bundle_copy)
    proc = _cli("build", "--target", tiny_profile, "--model", tiny_llama, "--out", bundle_copy)
    assert proc.returncode == 2 and "is not an edge-slm bundle" in proc.stderr
    assert _tree(bundle_copy) == before


def test_build_refuses_a_file_a_link_and_the_source_folder(tmp_path, tiny_llama, tiny_profile):
    a_file = tmp_path / "out.bin"
    a_file.write_bytes(b"precious")
    proc = _cli("build", "--target", tiny_profile, "--model", tiny_llama, "--out", a_file)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: --out {a_file} is a file, not a directory: choose another --out"
    assert a_file.read_bytes() == b"precious"
    link = tmp_path / "link"
    link.symlink_to(tmp_path)
    proc = _cli("build", "--target", tiny_profile, "--model", tiny_llama, "--out", link)
    assert proc.returncode == 2 and "is a symbolic link" in proc.stderr
    inside = tiny_llama / "bundle"
    proc = _cli("build", "--target", tiny_profile, "--model", tiny_llama, "--out", inside)
    assert proc.returncode == 2 and "is inside the model being built" in proc.stderr
    assert not inside.exists()


def test_is_bundle_dir_needs_exactly_the_listed_files(bundle_copy, tmp_path):
    from edge_slm.core.bundle import check_output_dir, is_bundle_dir

    assert is_bundle_dir(bundle_copy)
    check_output_dir(bundle_copy)  # a bundle may be rebuilt in place
    check_output_dir(tmp_path / "new" / "dir")  # a new path too
    (bundle_copy / "sub").mkdir()
    assert not is_bundle_dir(bundle_copy)
    (bundle_copy / "sub").rmdir()
    manifest = json.loads((bundle_copy / MANIFEST).read_text())
    manifest["schema_version"] = 99
    (bundle_copy / MANIFEST).write_text(json.dumps(manifest))
    assert not is_bundle_dir(bundle_copy)
    with pytest.raises(BundleError, match="is not an edge-slm bundle"):
        check_output_dir(bundle_copy)


def test_staging_sweeps_only_its_own_dead_directories(tmp_path):
    out = tmp_path / "b"
    mine = tmp_path / "b.partial-notes"  # a user's folder that merely looks alike
    dead = tmp_path / "b.partial-999999999"  # a killed build's staging (no such pid)
    dead_scratch = tmp_path / "b.partial-scratch-ab12_cd-999999999"
    for d in (mine, dead, dead_scratch):
        d.mkdir()
        (d / "f").write_text("x")
    with staging_dir(out) as stage:
        write_manifest(stage, {"target": "t", "precision": "fp32"})
    assert mine.is_dir() and (mine / "f").read_text() == "x"
    assert not dead.exists() and not dead_scratch.exists()
    from edge_slm.core.bundle import is_bundle_dir

    assert is_bundle_dir(out)


def test_prune_refuses_a_user_folder(tmp_path, tiny_llama):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    proc = _cli("prune", "--model", tiny_llama, "--out", folder, "--ffn", "0.25")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"error: --out {folder} holds files edge-slm did not list as its own (no .edge-slm-files.json): "
        "edge-slm replaces only folders it wrote itself; choose another --out or move that away"
    )
    assert (folder / "config.json").read_text() == "{}"
    # A folder edge-slm pruned into, with a user's notes added afterwards, is theirs now.
    (folder / "config.json").unlink()
    (folder / ".edge-slm-files.json").write_text('{"written_by": "edge-slm prune", "files": {}}')
    (folder / "notes.txt").write_text("mine")
    proc = _cli("prune", "--model", tiny_llama, "--out", folder, "--ffn", "0.25")
    assert proc.returncode == 2 and "notes.txt" in proc.stderr and (folder / "notes.txt").read_text() == "mine"
