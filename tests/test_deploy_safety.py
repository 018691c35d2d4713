"""`edge-slm deploy` tried as a careless user and an attacker would, against a real OpenSSH server on
loopback (the `sshd` fixture) whose Python is Debian 12's system /usr/bin/python3: two deploys at
once, a port held by another process, a pid in the record that now belongs to another process, and a
redeploy under a running server (nothing of the served bundle rewritten in place). The first deploy
of the module installs the device's venv (a minute or two); the others reuse it."""

import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from conftest import free_port

from edge_slm.harness.ssh import RemoteError, ssh

SYSTEM_PYTHON = "/usr/bin/python3"
STATE = ".local/share/edge-slm"


@pytest.fixture(scope="module")
def device(sshd):
    ssh_device, _ = sshd
    return dataclasses.replace(ssh_device, python=SYSTEM_PYTHON)


@pytest.fixture(scope="module")
def device_home(device) -> Path:
    """The device user's home (the device is this machine, so its files can be looked at directly)."""
    return Path(ssh(device, 'printf %s "$HOME"'))


def cli_args(device, *args):
    return [
        sys.executable,
        "-m",
        "edge_slm.cli",
        "deploy",
        *map(str, args),
        "--host",
        device.host,
        "--port",
        str(device.port),
        "--identity",
        device.identity,
        "--remote-python",
        SYSTEM_PYTHON,
    ]


def cli(device, *args, timeout=900):
    return subprocess.run(cli_args(device, *args), capture_output=True, text=True, timeout=timeout)


def last_line(proc) -> str:
    return (proc.stderr.strip().splitlines() or [""])[-1]


def record(device_home) -> dict:
    return json.loads((device_home / STATE / "serve.json").read_text())


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] not in ("Z", "X")
    except OSError:
        return False


@pytest.fixture
def stopped(device):
    """Whatever server a test leaves behind is stopped (only ours: the record's pid and start time)."""
    from edge_slm.harness.deploy import stop_service

    yield
    stop_service(device, quiet=True)


def test_two_deploys_at_once_one_proceeds_the_other_fails_naming_it(device, tiny_bundle, stopped):
    port = free_port()
    args = (tiny_bundle, "--serve", "--listen", f"127.0.0.1:{port}", "--threads", "1")
    procs = [subprocess.Popen(cli_args(device, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    procs.append(subprocess.Popen(cli_args(device, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=900) for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 2], (codes, outs)
    won, lost = (0, 1) if codes[0] == 0 else (1, 0)
    line = outs[lost][1].strip().splitlines()[-1]
    held_by = f"deploy of {tiny_bundle.name} from {socket.gethostname()} pid {procs[won].pid} since "
    assert line.startswith(f"error: {device.host}: another deploy is using this device's edge-slm install ({held_by}")
    assert line.endswith("): wait for it to finish, then try again")
    assert "copying" not in outs[lost][1] and "installing" not in outs[lost][1]  # it did nothing on the device
    assert f"serving:      http://127.0.0.1:{port}/v1" in outs[won][0]
    assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()["status"] == "ok"
    # The lock went with the winner's SSH session: a deploy now proceeds.
    again = cli(device, tiny_bundle, "--threads", "1")
    assert again.returncode == 0, again.stderr


def test_a_port_held_by_another_process_fails_the_deploy_in_one_line(device, tiny_bundle, stopped):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        proc = cli(device, tiny_bundle, "--serve", "--listen", f"127.0.0.1:{port}", "--threads", "1")
        assert proc.returncode == 2, proc.stderr
        line = last_line(proc)
        assert line.startswith(f"error: {device.host}: port {port} is already in use there (")
        assert line.endswith(
            "and not by the server deploy started: stop that process or pass --listen 127.0.0.1:ANOTHER_PORT"
        )
        assert f"pid {os.getpid()}: " in line or "another user" in line  # the holder, where it can be seen
        assert "copying" not in proc.stderr and "started the server" not in proc.stderr
        status = cli(device, "--status")
        assert status.returncode == 0 and f"on 127.0.0.1:{port}" not in status.stdout
    # An address the device does not have is not "in use": it is named as what it is.
    elsewhere = cli(device, tiny_bundle, "--serve", "--listen", "192.0.2.1:8080", "--threads", "1")
    assert elsewhere.returncode == 2 and last_line(elsewhere) == (
        f"error: {device.host}: cannot listen on 192.0.2.1:8080 there (Cannot assign requested address): "
        "pass --listen with an address of the device (0.0.0.0 for every interface)"
    )


class _Impostor(BaseHTTPRequestHandler):
    """Another program on the port that answers /health as a healthy edge-slm would."""

    def do_GET(self):
        body = json.dumps({"status": "ok", "model": "someone-else"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_a_started_server_that_cannot_bind_is_a_failure_even_when_the_port_answers(device, tiny_bundle, stopped):
    """The port taken between the check and the start: /health answered by the other program must not
    count as our server being up; our server's exit (address already in use) is reported."""
    from edge_slm.harness.deploy import deploy, service_status, start_server

    deploy(device, tiny_bundle, threads=1)  # the venv and the bundle on the device, no server
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Impostor)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        remote_bundle = f"{STATE}/bundles/" + _bundle_folder(tiny_bundle)
        with pytest.raises(RemoteError) as failed:
            start_server(device, f"{STATE}/venv", remote_bundle, f"127.0.0.1:{port}", 1)
        message = str(failed.value)
        assert message.startswith(f"{device.host}: the server on port {port} did not come up: the server exited (")
        assert "address already in use" in message.lower() and "\n" not in message
        assert service_status(device) == "stopped"
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()["model"] == "someone-else"
    finally:
        server.shutdown()


def _bundle_folder(bundle: Path) -> str:
    from edge_slm.core.hashing import sha256_file

    return sha256_file(bundle / "manifest.json")[:16]


def test_stop_leaves_alone_a_process_that_took_the_recorded_pid(device, device_home, tiny_bundle, stopped):
    port = free_port()
    served = cli(device, tiny_bundle, "--serve", "--listen", f"127.0.0.1:{port}", "--threads", "1")
    assert served.returncode == 0, served.stderr
    crashed = record(device_home)
    os.kill(crashed["pid"], 9)  # the server crashes ...
    deadline = time.monotonic() + 10
    while alive(crashed["pid"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    # ... and its pid goes to another program of the same user, whose command line even says edge-slm serve.
    other = int(ssh(device, "nohup bash -c 'exec -a \"edge-slm serve impostor\" sleep 300' >/dev/null 2>&1 & echo $!"))
    try:
        deadline = time.monotonic() + 10  # `$!` is known before the background shell has exec'd sleep
        while b"edge-slm serve" not in Path(f"/proc/{other}/cmdline").read_bytes() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert b"edge-slm serve" in Path(f"/proc/{other}/cmdline").read_bytes()
        taken = dict(crashed, pid=other)  # the record as it would read had the kernel reused the pid
        (device_home / STATE / "serve.json").write_text(json.dumps(taken))
        status = cli(device, "--status")
        assert status.stdout.strip() == (
            f"{device.host}: stopped (the recorded server is gone; pid {other} now belongs to another process)"
        )
        stop = cli(device, "--stop")
        assert stop.returncode == 2
        assert last_line(stop) == (
            f"error: {device.host}: the recorded server is gone; pid {other} now belongs to another process: "
            "not stopped"
        )
        time.sleep(0.5)
        assert alive(other)
        again = cli(device, "--stop")  # the stale record is gone with the first --stop
        assert again.returncode == 0 and again.stdout.strip() == f"{device.host}: stopped"
        assert alive(other)
    finally:
        os.kill(other, 9)


def _changed_bundle(tiny_bundle: Path, out: Path, target: str) -> Path:
    """The tiny bundle under another target name: only its manifest differs."""
    import shutil

    shutil.copytree(tiny_bundle, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["target"] = target
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


def _watch(port: int, folder: Path, seen: list, stop: threading.Event) -> None:
    """Ask /health every 0.1 s and note the inode of every file in `folder` while it exists."""
    while not stop.is_set():
        try:
            reply = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
            answer = reply.json().get("model") if reply.status_code == 200 else reply.status_code
        except httpx.HTTPError:
            answer = None
        inodes = {}
        if folder.exists():
            for name in os.listdir(folder):
                try:
                    inodes[name] = os.stat(folder / name).st_ino
                except FileNotFoundError:
                    pass
        seen.append((time.monotonic(), answer, inodes))
        time.sleep(0.1)


def _redeploy_while_watching(device, bundle, port, old_folder):
    from edge_slm.harness.deploy import deploy

    seen, messages, stop = [], [], threading.Event()
    watcher = threading.Thread(target=_watch, args=(port, old_folder, seen, stop))
    watcher.start()
    try:
        result = deploy(
            device,
            bundle,
            serve=True,
            listen=f"127.0.0.1:{port}",
            threads=1,
            progress=lambda m: messages.append((time.monotonic(), m)),
        )
    finally:
        stop.set()
        watcher.join()
    return result, seen, messages


def test_a_redeploy_under_a_running_server_installs_beside_it_and_switches(device, device_home, tiny_bundle, tmp_path):
    from edge_slm.harness.deploy import deploy, stop_service

    port = free_port()
    bundles = device_home / STATE / "bundles"
    deploy(device, tiny_bundle, serve=True, listen=f"127.0.0.1:{port}", threads=1)
    try:
        old = bundles / _bundle_folder(tiny_bundle)
        before = {name: os.stat(old / name).st_ino for name in os.listdir(old)}
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json() == {
            "status": "ok",
            "model": "tiny-laptop",
        }

        changed = _changed_bundle(tiny_bundle, tmp_path / "v2", "tiny-laptop-v2")
        result, seen, messages = _redeploy_while_watching(device, changed, port, old)
        switch = next(t for t, m in messages if "switching the server" in m)
        assert any("copying 1 of 6 bundle files (5 already on the device, linked)" in m for _, m in messages)
        answered_before = [answer for t, answer, _ in seen if t < switch]
        assert len(answered_before) > 10 and set(answered_before) == {"tiny-laptop"}  # served until the switch
        # No file of the old folder was rewritten in place: the same inodes for as long as it existed.
        assert all(inodes == before for _, _, inodes in seen if inodes), [s for s in seen if s[2] != before][:2]
        assert not old.exists()  # removed once the new server was up
        new = bundles / _bundle_folder(changed)
        assert result["bundle"] == f"~/{STATE}/bundles/{new.name}"
        for name in before:  # unchanged files are the same inodes, hard-linked, not copies
            assert (os.stat(new / name).st_ino == before[name]) == (name != "manifest.json"), name
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json() == {
            "status": "ok",
            "model": "tiny-laptop-v2",
        }
        assert os.readlink(device_home / STATE / "current") == f"bundles/{new.name}"
        assert record(device_home)["bundle"] == f"{STATE}/bundles/{new.name}"

        # A damaged file in the served folder (replaced, as a careful attacker would, so that the server
        # lives on): the next deploy repairs it in a new folder, not by writing into the served one.
        damaged = new / "model.onnx.data"
        spare = new / "spare"
        spare.write_bytes(damaged.read_bytes()[::-1])
        os.replace(spare, damaged)
        damaged_inode = os.stat(damaged).st_ino
        unchanged = {n: os.stat(new / n).st_ino for n in os.listdir(new) if n != "model.onnx.data"}
        # The served folder's files as the server holds them: a write in place would show through these.
        held = {n: open(new / n, "rb") for n in os.listdir(new)}
        contents = {n: f.read() for n, f in held.items()}
        # The server watches its bundle: a file that no longer matches its checksum ends the server
        # (so that systemd restarts it on a good bundle); the deploy below then starts the repaired copy.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
            except httpx.HTTPError:
                break
            time.sleep(0.5)
        else:
            raise AssertionError("the server went on serving a bundle whose file no longer matches its checksum")
        try:
            result, seen, messages = _redeploy_while_watching(device, changed, port, new)
            for name, f in held.items():
                f.seek(0)
                assert f.read() == contents[name], name
        finally:
            for f in held.values():
                f.close()
        # Copied, or linked from another folder that holds the same file (bundles of earlier deploys).
        assert any(
            "copying 1 of 6 bundle files (5 already on the device, linked)" in m or "(6 linked, none copied)" in m
            for _, m in messages
        ), messages
        assert not any("switching the server" in m for _, m in messages)  # nothing was serving
        # The name now holds the repaired copy: a new inode for the damaged file, the same ones for the others.
        assert os.stat(damaged).st_ino != damaged_inode
        assert {n: os.stat(new / n).st_ino for n in unchanged} == unchanged
        assert not [p for p in bundles.iterdir() if p.name.startswith((".replaced-", ".staging-"))]
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()["model"] == "tiny-laptop-v2"
    finally:
        assert stop_service(device) == "stopped"


def test_a_new_server_that_does_not_come_up_gives_the_port_back_to_the_old_one(
    device, device_home, tiny_bundle, tmp_path, monkeypatch
):
    """The port taken by another program in the moment between the old server's stop and the new
    one's start (the real start_server runs, against the real device, with a real socket in the way):
    the deploy fails in one line, the old server is started again and `current` still names it."""
    from edge_slm.harness import deploy as d

    port = free_port()
    d.deploy(device, tiny_bundle, serve=True, listen=f"127.0.0.1:{port}", threads=1)
    try:
        old = f"{STATE}/bundles/{_bundle_folder(tiny_bundle)}"
        real_start, calls = d.start_server, []

        def port_taken_for_the_first_start(*args, **kwargs):
            calls.append(args[2])
            if len(calls) > 1:
                return real_start(*args, **kwargs)
            with socket.socket() as other:
                other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                other.bind(("127.0.0.1", port))
                other.listen()
                return real_start(*args, **kwargs)

        monkeypatch.setattr(d, "start_server", port_taken_for_the_first_start)
        changed = _changed_bundle(tiny_bundle, tmp_path / "v2", "tiny-laptop-v2")
        new = f"{STATE}/bundles/{_bundle_folder(changed)}"
        with pytest.raises(RemoteError) as failed:
            d.deploy(device, changed, serve=True, listen=f"127.0.0.1:{port}", threads=1)
        message = str(failed.value)
        assert calls == [new, old]
        assert message.startswith(f"{device.host}: the server on port {port} did not come up: the server exited (")
        assert message.endswith(f"; the previous server (~/{old}) serves again") and "\n" not in message
        assert "address already in use" in message.lower()
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json() == {
            "status": "ok",
            "model": "tiny-laptop",
        }
        assert record(device_home)["bundle"] == old
        assert os.readlink(device_home / STATE / "current") == f"bundles/{_bundle_folder(tiny_bundle)}"
        assert (device_home / old).is_dir()  # nothing removed on the way back
    finally:
        assert d.stop_service(device) == "stopped"
