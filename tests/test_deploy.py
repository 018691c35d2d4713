"""`edge-slm deploy` against a real OpenSSH server on loopback whose Python is this machine's
system /usr/bin/python3: Debian 12's, externally managed (PEP 668) exactly as Raspberry Pi OS
Bookworm's is. The venv is made there, onnxruntime pinned from the profile is installed from the
package index, the bundle is copied and verified, smoke-tested, served and stopped."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import free_port

SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.fixture(scope="module")
def system_device(sshd):
    import dataclasses

    device = sshd.device
    externally_managed = list(Path("/usr/lib").glob("python3*/EXTERNALLY-MANAGED"))
    assert externally_managed, "this test wants Debian's externally managed system Python"
    return dataclasses.replace(device, python=SYSTEM_PYTHON)


def test_deploy_serve_status_stop_with_the_system_python(sshd, system_device, tiny_bundle):
    from edge_slm.harness.deploy import BUNDLES, VENV, deploy, service_status, stop_service
    from edge_slm.harness.device_service import has_systemd

    venv = sshd.home / VENV
    shutil.rmtree(sshd.home / BUNDLES, ignore_errors=True)  # whatever another test copied there
    port = free_port()
    messages = []
    result = deploy(
        system_device, tiny_bundle, serve=True, listen=f"127.0.0.1:{port}", threads=1, progress=messages.append
    )
    try:
        smoke = result["smoke"]
        assert smoke["passed"] and smoke["tokens_agreeing"] == smoke["tokens"] == 8, smoke
        assert smoke["decode_tokens_per_s"] > 0 and 30 < smoke["peak_rss_mb"] < 1000  # MB, onnxruntime loaded
        config = (venv / "pyvenv.cfg").read_text()
        assert "home = /usr/bin" in config  # the venv is the device's system Python's
        installed = subprocess.run(
            [str(venv / "bin/python"), "-c", "import onnxruntime; print(onnxruntime.__version__)"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        assert installed.startswith("1.32."), installed  # the newest version the profile lists
        # All copied, or the model's files linked from a bundle an earlier run left on the device.
        assert any(m.endswith(("copying 6 of 6 bundle files", "(5 already on the device, linked)")) for m in messages)
        # The wheel works alone: the device's venv has no torch, and the runtime commands run there.
        edge = str(venv / "bin/edge-slm")
        no_torch = subprocess.run([str(venv / "bin/python"), "-c", "import torch"], capture_output=True, text=True)
        assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr
        listed = subprocess.run([edge, "targets"], capture_output=True, text=True).stdout
        assert all(name in listed for name in ("rpi4", "rpi5", "x86-laptop", "jetson-orin"))
        refused = subprocess.run([edge, "build", "--target", "x86-laptop"], capture_output=True, text=True)
        assert refused.returncode == 2 and refused.stderr.strip() == (
            "error: edge-slm build needs the build extra (torch is not installed): pip install 'edge-slm[build]' "
            "on a build host; a device needs only the runtime"
        )
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
        assert health.status_code == 200 and health.json()["status"] == "ok"
        systemd = has_systemd(system_device)  # the throwaway device user has no user session here
        assert result["service"].startswith("a systemd user service" if systemd else "detached"), result["service"]
        assert service_status(system_device).startswith("systemd active" if systemd else "detached pid")
        again = []
        deploy(system_device, tiny_bundle, progress=again.append)  # the same bundle: nothing to copy or install
        assert any("already there (checksums match)" in m for m in again)
        assert any("is installed (every file verified)" in m for m in again)
        assert not any("copying" in m or "installing edge-slm" in m for m in again)
    finally:
        assert stop_service(system_device) == "stopped"
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
    assert service_status(system_device) == "stopped"


def test_deploy_and_serve_a_classifier(system_device, classifier_bundle):
    """An encoder bundle takes the same path; its smoke test compares labels, and the device's
    server answers /v1/classifications as this machine's runtime does."""
    from edge_slm import runtime
    from edge_slm.harness.deploy import SMOKE_TEXTS, deploy, stop_service

    port = free_port()
    result = deploy(system_device, classifier_bundle, serve=True, listen=f"127.0.0.1:{port}", threads=1)
    try:
        want = [r.label for r in runtime.load(classifier_bundle).classify(list(SMOKE_TEXTS))]
        assert result["smoke"] == {"passed": True, "summary": f"3/3 labels as on this machine ({', '.join(want)})"}
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/classifications", json={"input": list(SMOKE_TEXTS)}, timeout=30)
        assert [d["label"] for d in reply.json()["data"]] == want
    finally:
        assert stop_service(system_device) == "stopped"


def test_the_smoke_test_judges_as_verify_does(system_device, tiny_bundle, tiny_llama, tiny_profile, tmp_path):
    """The smoke test runs the probes of `edge-slm verify --emulate` on the device and judges them
    by the same rule (harness.agreement): an int8 build on the device against this machine's fp32
    bundle is refused with its numbers, exactly as the rule judges the same two traces here; the
    int8 bundle against itself passes on its accuracy budget's statistics."""
    import re
    import shutil

    from edge_slm.builder.pipeline import build
    from edge_slm.core.bundle import read_manifest
    from edge_slm.core.targets import load_profile
    from edge_slm.harness.agreement import greedy_agreement
    from edge_slm.harness.deploy import checkout_wheel, copy_bundle, ensure_venv, smoke_test
    from edge_slm.runtime.probe import greedy_trace

    int8 = tmp_path / "int8"
    build(str(tiny_llama), load_profile(str(tiny_profile)), int8, echo=lambda m: None, precision="int8")
    manifest = read_manifest(int8)
    with checkout_wheel() as wheel:
        venv = ensure_venv(system_device, manifest, wheel)
    remote = copy_bundle(system_device, int8, manifest)
    try:
        refused = smoke_test(system_device, venv, remote, tiny_bundle, threads=1)
        here = greedy_agreement(
            greedy_trace(str(tiny_bundle), tokens=8, threads=1),
            greedy_trace(str(int8), tokens=8, threads=1),
            read_manifest(tiny_bundle).profile.as_profile(),
            "fp32",
        )
        assert refused["passed"] is here["passed"] is False
        assert refused["summary"].startswith(here["summary"] + "; ")
        assert re.search(
            r"largest logit difference \d+\.\d{3}% of the largest logit \(tolerance 0\.1%\)", here["summary"]
        )
        same = smoke_test(system_device, venv, remote, int8, threads=1)
        assert same["passed"] and same["tokens_agreeing"] == 8, same
        assert "over 128 tokens of eval.txt next-token agreement 100.0% (needs 96%)" in same["summary"]
    finally:
        shutil.rmtree(Path.home() / remote, ignore_errors=True)


def test_deploy_failures_are_one_line(sshd, tiny_bundle, tmp_path):
    device = sshd.device
    no_python = _cli(
        "deploy",
        tiny_bundle,
        "--host",
        device.host,
        "--port",
        device.port,
        "--identity",
        device.identity,
        "--remote-python",
        "/nonexistent/python3",
    )
    assert no_python.returncode == 2
    assert no_python.stderr.strip().splitlines()[-1] == (
        f"error: {device.host}: no usable Python 3.10+ at '/nonexistent/python3' "
        "(install python3 there or pass --remote-python PATH)"
    )
    closed = _cli("deploy", tiny_bundle, "--host", device.host, "--port", free_port(), "--identity", device.identity)
    assert closed.returncode == 2 and "ssh failed" in closed.stderr
    bad_listen = _cli("deploy", tiny_bundle, "--host", device.host, "--serve", "--listen", "8080")
    assert bad_listen.returncode == 2 and "--listen '8080': write HOST:PORT" in bad_listen.stderr


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "edge_slm.cli", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def test_the_wheel_holds_every_file_of_the_package_and_leaves_the_checkout_alone():
    """Every file under edge_slm/ (and the profiles) is in the wheel deploy installs: a subpackage
    or data file missing from pyproject's lists would break the device (or the build extra) only
    there. Building it writes nothing into the checkout."""
    import zipfile

    from edge_slm.harness.deploy import _CHECKOUT, checkout_wheel

    def package_files() -> set[str]:
        files = {
            str(p.relative_to(_CHECKOUT))
            for p in (_CHECKOUT / "edge_slm").rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
        }
        return files | {f"edge_slm/profiles/{p.name}" for p in (_CHECKOUT / "targets").glob("*.toml")}

    top_before, want = sorted(p.name for p in _CHECKOUT.iterdir()), package_files()
    with checkout_wheel() as wheel:
        names = {n for n in zipfile.ZipFile(wheel).namelist() if not n.startswith("edge_slm-")}
        assert [p.name for p in wheel.parent.iterdir()] == [wheel.name]  # the source copy is gone
    assert names == want, (sorted(want - names), sorted(names - want))
    assert not wheel.parent.exists()
    assert sorted(p.name for p in _CHECKOUT.iterdir()) == top_before and package_files() == want  # no build/, egg-info


def test_the_no_deps_install_keeps_a_device_s_own_onnxruntime(tmp_path, tiny_bundle):
    """A Jetson has NVIDIA's onnxruntime-gpu, which pip must not shadow with PyPI's CPU onnxruntime:
    the documented path installs the wheel with --no-deps plus the other runtime packages. Here a
    pinned onnxruntime stands in for the device's own build; the wheel must leave it as it is."""
    from edge_slm.harness.deploy import checkout_wheel

    venv = tmp_path / "venv"
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin/pip"), "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "onnxruntime==1.32.0"], check=True, timeout=900)
    with checkout_wheel() as wheel:
        subprocess.run([*pip, "--no-deps", str(wheel)], check=True, timeout=300)
    subprocess.run([*pip, "numpy", "tokenizers", "click", "jinja2"], check=True, timeout=900)
    listed = subprocess.run([str(venv / "bin/pip"), "list", "--format=freeze"], capture_output=True, text=True).stdout
    assert [line for line in listed.splitlines() if line.lower().startswith("onnxruntime")] == ["onnxruntime==1.32.0"]
    out = subprocess.run(
        [str(venv / "bin/edge-slm"), "generate", str(tiny_bundle), "The capital", "-n", "3", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    from edge_slm import runtime

    want = runtime.load(tiny_bundle).generate("The capital", max_new_tokens=3, temperature=0.0).token_ids
    assert json.loads(out.stdout)["token_ids"] == want
