"""Benchmarks over SSH against a real OpenSSH server on a loopback port, with throwaway keys.
`make test` (and so CI) installs Debian's openssh-server for this."""

import shutil

import pytest
from conftest import free_port

from edge_slm.harness.deploy import BUNDLES, VENV
from edge_slm.harness.remote import bench_remote
from edge_slm.harness.ssh import Device, RemoteError

BENCH = ["--prompt-tokens", "8", "--gen-tokens", "4", "-r", "2", "--warmup", "1", "--threads", "1", "--no-accuracy"]
CONFIG = {"prompt_tokens": 8, "gen_tokens": 4, "repetitions": 2, "warmup": 1, "threads": [1], "accuracy": False}


def _forget_bundles(sshd):
    """The device without any bundle copy, whichever test (here or in test_deploy) made one."""
    shutil.rmtree(sshd.home / BUNDLES, ignore_errors=True)


def test_bench_over_ssh_copies_once_and_returns_records(sshd, tiny_bundle):
    device = sshd.device
    _forget_bundles(sshd)
    messages = []
    records = bench_remote(device, tiny_bundle, CONFIG, progress=messages.append)
    try:
        assert len(records) == 1
        r = records[0]
        assert r["remote"] == {"host": device.host, "port": device.port, "bundle": str(tiny_bundle)}
        assert (
            r["bundle"]["precision"] == "fp32"
            and r["settings"]["threads"] == 1
            and r["results"]["decode_tok_s"]["n"] == 2
        )
        assert "edge-slm/bundles/" in r["bundle"]["path"]
        assert any("copying 6 of 6 bundle files" in m for m in messages), messages
        again = []
        bench_remote(device, tiny_bundle, CONFIG, progress=again.append)
        assert any("already there (checksums match)" in m for m in again)
        assert not any("copying" in m for m in again)
    finally:
        _forget_bundles(sshd)


def test_unreachable_wrong_key_and_no_python(sshd, tiny_bundle):
    device, d = sshd.device, sshd.keys
    closed = Device(device.host, port=free_port(), identity=device.identity, known_hosts=device.known_hosts)
    with pytest.raises(RemoteError, match=rf"127.0.0.1:{closed.port}: ssh failed: .*(refused|Connection)"):
        bench_remote(closed, tiny_bundle, CONFIG)
    wrong_key = Device(device.host, port=device.port, identity=str(d / "other_key"), known_hosts=device.known_hosts)
    with pytest.raises(RemoteError, match=r"ssh failed: the key was refused"):
        bench_remote(wrong_key, tiny_bundle, CONFIG)
    no_python = Device(
        device.host,
        port=device.port,
        identity=device.identity,
        python="/nonexistent/python3",
        known_hosts=device.known_hosts,
    )
    with pytest.raises(RemoteError, match=r"no usable Python 3.10\+ at '/nonexistent/python3'"):
        bench_remote(no_python, tiny_bundle, CONFIG)


def test_installed_code_on_the_device_is_verified_file_by_file(sshd, tiny_bundle):
    """The device's edge-slm is checked against the sha256 pip recorded from the wheel before every
    use; a changed file is repaired by reinstalling."""
    device = sshd.device
    records = bench_remote(device, tiny_bundle, CONFIG)
    try:
        venv = sshd.home / VENV
        code = next(venv.glob("lib/python3*/site-packages/edge_slm/core/bundle.py"))
        original = code.read_bytes()
        code.write_bytes(original + b"\nraise SystemExit('tampered')\n")
        messages = []
        records += bench_remote(device, tiny_bundle, CONFIG, progress=messages.append)  # would fail if it ran
        assert code.read_bytes() == original
        assert any("installed edge-slm files differ from the wheel: reinstalling" in m for m in messages)
    finally:
        _forget_bundles(sshd)


def test_strict_host_keys_refuse_an_unknown_host(sshd, tiny_bundle, tmp_path):
    device = sshd.device
    strict = Device(
        device.host,
        port=device.port,
        identity=device.identity,
        python=device.python,
        known_hosts=str(tmp_path / "empty_known_hosts"),
        strict_host_keys=True,
    )
    with pytest.raises(RemoteError, match=r"ssh failed: Host key verification failed"):
        bench_remote(strict, tiny_bundle, CONFIG)
