"""The CLI as a user meets it: one-line errors, exit codes, tracebacks only with --debug."""

import json
import shutil
import subprocess
import sys

import pytest

from edge_slm.builder.decoder.load import load
from edge_slm.core.errors import ModelError


def run(*args, check_rc=None):
    proc = subprocess.run([sys.executable, "-m", "edge_slm.cli", *args], capture_output=True, text=True, timeout=300)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stderr
    return proc


def test_targets_lists_all_profiles():
    out = run("targets", check_rc=0).stdout
    for name in ("rpi4", "rpi5", "x86-laptop", "jetson-orin"):
        assert name in out
    as_json = json.loads(run("targets", "--json", check_rc=0).stdout)
    assert {p["name"] for p in as_json} >= {"rpi4", "rpi5", "x86-laptop", "jetson-orin"}


def test_unknown_target_is_one_line():
    proc = run("build", "--target", "nosuch", check_rc=2)
    assert proc.stderr.strip().splitlines() == [
        "error: unknown target 'nosuch': known targets are jetson-orin, rpi4, rpi5, x86-laptop "
        "(or pass a path to your own .toml profile)"
    ]
    assert "Traceback" not in proc.stderr


def test_misspelt_profile_key(tmp_path):
    from edge_slm.core.targets import TARGETS_DIR

    bad = tmp_path / "board.toml"
    text = (TARGETS_DIR / "rpi4.toml").read_text()
    assert "context_length" in text
    bad.write_text(text.replace("context_length", "context_lenght"))
    proc = run("build", "--target", str(bad), check_rc=2)
    assert "unknown key 'export.context_lenght'" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    debug = run("--debug", "build", "--target", str(bad))
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_inspect_verifies_and_names_corrupt_file(tiny_bundle, tmp_path):
    out = run("inspect", str(tiny_bundle), check_rc=0).stdout
    assert "all checksums verified" in out and "GroupQueryAttention 2" in out and "validation   passed" in out
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    data = copy / "model.onnx"
    raw = bytearray(data.read_bytes())
    raw[50] ^= 0xFF
    data.write_bytes(bytes(raw))
    proc = run("inspect", str(copy), check_rc=2)
    assert (
        proc.stderr.strip()
        == f"error: {copy}/model.onnx: checksum mismatch (the file is corrupt): copy it again or rebuild"
    )


def test_build_then_inspect_json(tiny_llama, tiny_profile, tmp_path):
    out = tmp_path / "bundle"
    proc = run("build", "--target", str(tiny_profile), "--model", str(tiny_llama), "--out", str(out), check_rc=0)
    assert f"bundle ready: {out}  (fp32, " in proc.stdout and "[5/5]" in proc.stderr  # progress on stderr
    assert " MB, validated against torch)\n" in proc.stdout  # no quantization, so no accuracy gate
    assert f'run it:       edge-slm generate {out} "What is the capital of France?" --chat' in proc.stdout
    manifest = json.loads(run("inspect", str(out), "--json", check_rc=0).stdout)
    assert manifest["target"] == "tiny-laptop" and manifest == json.loads((out / "manifest.json").read_text())


def test_bad_model_references(tmp_path):
    mamba = tmp_path / "mamba"  # neither the fused graph nor optimum's generic one takes it
    mamba.mkdir()
    (mamba / "config.json").write_text('{"model_type": "mamba"}')
    with pytest.raises(
        ModelError,
        match=r"architecture 'mamba' is not supported; supported: llama \(Llama, SmolLM2, TinyLlama\); qwen2",
    ):
        load(str(mamba))
    proc = run("build", "--target", "x86-laptop", "--model", str(mamba), "--out", str(tmp_path / "o"), check_rc=2)
    assert "architecture 'mamba' is not supported" in proc.stderr and not (tmp_path / "o").exists()
    with pytest.raises(ModelError, match="no such GGUF file"):
        load(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelError, match="not found"):
        load(str(tmp_path / "missing-dir"))
    not_gguf = tmp_path / "fake.gguf"
    not_gguf.write_bytes(b"definitely not gguf")
    with pytest.raises(ModelError, match="not a readable GGUF file"):
        load(str(not_gguf))
    (mamba / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ModelError, match="no weights"):
        load(str(mamba))


def run_without(module: str, *args: str) -> subprocess.CompletedProcess:
    """The CLI in a subprocess where `module` cannot be imported, as on an install without its extra."""
    code = f"import sys; sys.modules[{module!r}] = None; from edge_slm.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "module, extra, args",
    [
        ("matplotlib", "report", ["report", "benchmarks/results/encoders/vm.jsonl", "--out", "{tmp}/r"]),
        ("uvicorn", "serve", ["serve", "{tmp}/no-bundle"]),
        ("sse_starlette", "serve", ["serve", "{tmp}/no-bundle"]),
        ("onnx", "build", ["build", "--target", "x86-laptop", "--out", "{tmp}/b"]),
        ("torch", "prune", ["prune", "--model", "m", "--out", "{tmp}/p"]),
    ],
)
def test_a_missing_extra_is_one_line_naming_it(module, extra, args, tmp_path):
    proc = run_without(module, *(a.format(tmp=tmp_path) for a in args))
    extra = {"prune": "build"}.get(extra, extra)
    where = " on a build host; a device needs only the runtime" if extra == "build" else ""
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: edge-slm {args[0]} needs the {extra} extra ({module} is not installed): "
        f"pip install 'edge-slm[{extra}]'{where}"
    ]
    assert list(tmp_path.iterdir()) == []


def test_a_missing_module_of_an_extra_found_late_is_the_same_line(tmp_path):
    """matplotlib is there but a part of it cannot be imported: the import fails inside the report,
    after the command's own check, and still ends as the one line naming the extra."""
    proc = run_without("matplotlib.pyplot", "report", "benchmarks/results/encoders/vm.jsonl", "--out", str(tmp_path))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: edge-slm report needs the report extra (matplotlib is not installed): pip install 'edge-slm[report]'"
    )


def test_threads_and_ssh_options_are_declared_once_and_checked_alike(tmp_path):
    """Every command takes --threads with one check and one message (a comma list for bench), and
    the SSH options of deploy and bench --host take the same port range."""
    bundle = str(tmp_path / "bundle")
    for args in (
        ["generate", bundle, "hi"],
        ["chat", bundle],
        ["eval", bundle],
        ["classify", bundle, "a text"],
        ["embed", bundle, "a text"],
        ["serve", bundle],
        ["deploy", bundle, "--host", "pi@device"],
    ):
        for bad in ("0", "two"):
            proc = run(*args, "--threads", bad, check_rc=2)
            assert f"Error: Invalid value for '--threads': '{bad}': give a count of 1 or more, e.g. 2" in proc.stderr
    proc = run("bench", bundle, "--threads", "1,0", check_rc=2)
    assert "Error: Invalid value for '--threads': '1,0': give counts of 1 or more, e.g. 1,2,4" in proc.stderr
    for command in (["bench", bundle], ["deploy", bundle]):
        proc = run(*command, "--host", "pi@device", "--port", "70000", check_rc=2)
        assert "Error: Invalid value for '--port': 70000 is not in the range 1<=x<=65535." in proc.stderr
