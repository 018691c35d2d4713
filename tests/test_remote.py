"""Benchmarks over SSH against a real OpenSSH server on a loopback port, with throwaway keys.
`make test` (and so CI) installs Debian's openssh-server for this."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_slm.harness.remote import Device, RemoteError, bench_remote

SSHD = "/usr/sbin/sshd"
BENCH = ["--prompt-tokens", "8", "--gen-tokens", "4", "-r", "2", "--warmup", "1", "--threads", "1", "--no-accuracy"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    assert Path(SSHD).exists(), "openssh-server is not installed: run `make test`, which installs it"
    d = tmp_path_factory.mktemp("sshd")
    for name in ("host_key", "client_key", "other_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    os.chmod(d / "authorized_keys", 0o600)
    port = _free_port()
    (d / "sshd_config").write_text(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {d / "host_key"}
AuthorizedKeysFile {d / "authorized_keys"}
PidFile {d / "sshd.pid"}
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
Subsystem sftp internal-sftp
""")
    Path("/run/sshd").mkdir(exist_ok=True)
    server = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            assert server.poll() is None, server.stderr.read().decode()
            time.sleep(0.1)
    user = os.environ.get("USER") or subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
    device = Device(
        f"{user}@127.0.0.1",
        port=port,
        identity=str(d / "client_key"),
        python=sys.executable,
        known_hosts=str(d / "known_hosts"),
    )
    yield device, d
    server.terminate()
    server.wait(timeout=10)


def _cleanup_remote(records):
    home = Path.home() / ".cache" / "edge-slm" / "bundles"
    for r in records:
        shutil.rmtree(home / r["bundle"]["path"].rstrip("/").split("/")[-1], ignore_errors=True)


def test_bench_over_ssh_copies_once_and_returns_records(sshd, tiny_bundle):
    device, _ = sshd
    messages = []
    records = bench_remote(device, tiny_bundle, BENCH, progress=messages.append)
    try:
        assert len(records) == 1
        r = records[0]
        assert r["remote"] == {"host": device.host, "port": device.port, "bundle": str(tiny_bundle)}
        assert (
            r["bundle"]["precision"] == "fp32"
            and r["settings"]["threads"] == 1
            and r["results"]["decode_tok_s"]["n"] == 2
        )
        assert "/.cache/edge-slm/bundles/" in r["bundle"]["path"]
        assert any("copying 5 of 5 bundle files" in m for m in messages)
        again = []
        bench_remote(device, tiny_bundle, BENCH, progress=again.append)
        assert any("already there (checksums match)" in m for m in again)
        assert not any("copying" in m for m in again)
    finally:
        _cleanup_remote(records)


def test_unreachable_wrong_key_and_no_python(sshd, tiny_bundle):
    device, d = sshd
    closed = Device(device.host, port=_free_port(), identity=device.identity, known_hosts=device.known_hosts)
    with pytest.raises(RemoteError, match=rf"127.0.0.1:{closed.port}: ssh failed: .*(refused|Connection)"):
        bench_remote(closed, tiny_bundle, BENCH)
    wrong_key = Device(device.host, port=device.port, identity=str(d / "other_key"), known_hosts=device.known_hosts)
    with pytest.raises(RemoteError, match=r"ssh failed: the key was refused"):
        bench_remote(wrong_key, tiny_bundle, BENCH)
    no_python = Device(
        device.host,
        port=device.port,
        identity=device.identity,
        python="/nonexistent/python3",
        known_hosts=device.known_hosts,
    )
    with pytest.raises(RemoteError, match=r"no usable Python 3.10\+ at '/nonexistent/python3'"):
        bench_remote(no_python, tiny_bundle, BENCH)


def test_inventory_keeps_good_hosts_when_one_fails(sshd, tiny_bundle, tmp_path):
    device, _ = sshd
    bad_port = _free_port()
    inventory = tmp_path / "devices.toml"
    inventory.write_text(f"""
[[device]]
host = "{device.host}"
port = {device.port}
identity = "{device.identity}"
python = "{device.python}"
known_hosts = "{device.known_hosts}"
bundle = "{tiny_bundle}"
target = "tiny-laptop"

[[device]]
host = "{device.host}"
port = {bad_port}
identity = "{device.identity}"
known_hosts = "{device.known_hosts}"
bundle = "{tiny_bundle}"
""")
    out = tmp_path / "results.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "edge_slm.cli", "bench", "--inventory", str(inventory), *BENCH, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    records = [json.loads(line) for line in out.read_text().splitlines()]
    try:
        assert proc.returncode == 2
        assert f"error: {device.host}:{bad_port}: ssh failed" in proc.stderr
        assert len(records) == 1 and records[0]["remote"]["port"] == device.port
    finally:
        _cleanup_remote(records)


def test_a_device_that_replies_garbage_fails_alone(sshd, tiny_bundle, tmp_path):
    """A real sshd; the device's `python` answers the benchmark with `{garbage`. That host fails
    with one line naming it; the good host's records are kept."""
    device, _ = sshd
    liar = tmp_path / "python-liar"
    liar.write_text(
        f'#!/bin/sh\ncase "$*" in *"edge_slm.cli bench"*) echo "{{garbage";; *) exec {sys.executable} "$@";; esac\n'
    )
    liar.chmod(0o755)
    inventory = tmp_path / "devices.toml"
    entry = (
        f'host = "{device.host}"\nport = {device.port}\nidentity = "{device.identity}"\n'
        f'known_hosts = "{device.known_hosts}"\nbundle = "{tiny_bundle}"\n'
    )
    inventory.write_text(f'[[device]]\n{entry}python = "{sys.executable}"\n\n[[device]]\n{entry}python = "{liar}"\n')
    out = tmp_path / "results.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "edge_slm.cli", "bench", "--inventory", str(inventory), "--out", str(out), *BENCH],
        capture_output=True,
        text=True,
        timeout=600,
    )
    records = [json.loads(line) for line in out.read_text().splitlines()]
    try:
        assert proc.returncode == 2
        assert f"error: {device.host}: line 1 of its reply is not JSON ('{{garbage')" in proc.stderr
        assert len(records) == 1 and records[0]["remote"]["host"] == device.host
    finally:
        _cleanup_remote(records)


def test_runtime_code_on_the_device_is_verified_file_by_file(sshd, tiny_bundle):
    device, _ = sshd
    records = bench_remote(device, tiny_bundle, BENCH)
    try:
        from edge_slm.harness.remote import _runtime_tarball

        code = Path.home() / ".cache" / "edge-slm" / "runtime" / _runtime_tarball()[1] / "edge_slm/core/bundle.py"
        original = code.read_bytes()
        code.write_bytes(original + b"\nraise SystemExit('tampered')\n")  # not the first file, not __init__.py
        records += bench_remote(device, tiny_bundle, BENCH)  # would fail if the tampered copy ran
        assert code.read_bytes() == original
    finally:
        _cleanup_remote(records)


def test_strict_host_keys_refuse_an_unknown_host(sshd, tiny_bundle, tmp_path):
    device, _ = sshd
    strict = Device(
        device.host,
        port=device.port,
        identity=device.identity,
        python=device.python,
        known_hosts=str(tmp_path / "empty_known_hosts"),
        strict_host_keys=True,
    )
    with pytest.raises(RemoteError, match=r"ssh failed: Host key verification failed"):
        bench_remote(strict, tiny_bundle, BENCH)
