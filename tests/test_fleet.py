"""`edge-slm deploy --inventory` over three "devices": three throwaway users behind one real OpenSSH
server on loopback, described in an Ansible YAML inventory, two good and one whose Python does not
exist. The edge_slm role makes a venv from Debian's externally managed /usr/bin/python3 on each,
installs the wheel and onnxruntime, copies, verifies, smoke-tests and serves the tiny bundle; a
second run changes nothing; --status and --stop go over the inventory; the plain
`ansible-playbook -i inventory.yml deploy.yml` does the same."""

import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from conftest import SSHD, free_port, wait_for_port

from edge_slm.harness.fleet import ANSIBLE_DIR

GOOD, BROKEN = ("dev1", "dev2"), "dev3"
EDGE_SLM = [sys.executable, "-m", "edge_slm.cli"]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, tiny_bundle):
    """Three device users with fresh homes behind one sshd, and the inventory that names them."""
    assert Path(SSHD).exists(), "openssh-server is not installed: run `make test`, which installs it"
    if os.geteuid() != 0:
        pytest.skip("the fleet tests make throwaway device users with useradd: run them as root (as CI does)")
    d = tmp_path_factory.mktemp("fleet")
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    users, homes = [f"edge-slm-fleet-{os.getpid()}-{n}" for n in range(3)], []
    try:
        for user in users:
            home = Path(tempfile.mkdtemp(prefix="edge-slm-fleet-home-"))  # outside pytest's private root
            homes.append(home)
            subprocess.run(
                ["useradd", "--home-dir", str(home), "--no-create-home", "--shell", "/bin/sh", "--user-group"]
                + ["--password", "*", user],  # no password, yet not a locked account (which sshd refuses)
                check=True,
            )
            (home / "authorized_keys").write_text((d / "client_key.pub").read_text())
            subprocess.run(["chown", "-R", f"{user}:{user}", str(home)], check=True)
        port = free_port()
        (d / "sshd_config").write_text(
            f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\nAuthorizedKeysFile %h/authorized_keys\n"
            f"PidFile {d / 'sshd.pid'}\nAllowUsers {' '.join(users)}\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nPermitRootLogin no\nStrictModes no\nUsePAM no\n"
            "Subsystem sftp internal-sftp\nMaxStartups 30\n"
        )
        Path("/run/sshd").mkdir(exist_ok=True)
        log = d / "sshd.log"
        server = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stderr=log.open("wb"))
        try:
            wait_for_port(port, server, log)
            listen = {name: f"127.0.0.1:{free_port()}" for name in (*GOOD, BROKEN)}
            hosts = {}
            for name, user in zip((*GOOD, BROKEN), users):
                hosts[name] = {
                    "ansible_host": "127.0.0.1",
                    "ansible_port": port,
                    "ansible_user": user,
                    "ansible_ssh_private_key_file": str(d / "client_key"),
                    "ansible_python_interpreter": "/nonexistent/python3" if name == BROKEN else "/usr/bin/python3",
                    "edge_slm_listen": listen[name],
                }
            inventory = d / "inventory.yml"
            inventory.write_text(
                json.dumps(  # JSON is YAML
                    {
                        "all": {
                            "hosts": hosts,
                            "vars": {
                                "edge_slm_bundle": str(tiny_bundle),
                                "edge_slm_threads": 1,
                                "ansible_ssh_common_args": f"-o UserKnownHostsFile={d / 'known_hosts'} "
                                "-o StrictHostKeyChecking=accept-new",
                            },
                        }
                    },
                    indent=1,
                )
            )
            yield {"inventory": inventory, "listen": listen, "homes": dict(zip((*GOOD, BROKEN), homes))}
        finally:
            server.terminate()
            server.wait(timeout=10)
    finally:
        left = []
        for user in users:
            for _ in range(50):  # what a failed test left running (or sshd's session closing) ends first
                subprocess.run(["pkill", "-KILL", "-u", user], capture_output=True)
                gone = subprocess.run(["userdel", user], capture_output=True, text=True)
                if gone.returncode == 0 or "does not exist" in gone.stderr:
                    break
                time.sleep(0.1)
            else:
                left.append(f"{user}: {gone.stderr.strip()}")
        for home in homes:
            shutil.rmtree(home, ignore_errors=True)
        assert not left, f"userdel failed: {left}"


def edge_slm(*args, timeout=900, cwd=None):
    return subprocess.run([*EDGE_SLM, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=cwd)


def recap(stdout: str) -> dict[str, dict[str, int]]:
    rows = {}
    for line in stdout.splitlines():
        host, sep, counts = line.partition(" : ")
        if sep and "ok=" in counts:
            rows[host.strip()] = {k: int(v) for k, v in (c.split("=") for c in counts.split())}
    return rows


def test_deploy_inventory_serve_redeploy_status_stop(fleet, tiny_bundle, tmp_path):
    inventory, listen = fleet["inventory"], fleet["listen"]
    first = edge_slm("deploy", "--inventory", inventory, "--serve")
    assert first.returncode == 1
    rows = recap(first.stdout)
    for host in GOOD:
        assert rows[host]["failed"] == 0 and rows[host]["unreachable"] == 0 and rows[host]["changed"] > 0, rows
    assert rows[BROKEN]["failed"] == 1, rows
    assert (
        f"error: {BROKEN}: Refuse a device without a usable Python: no Python 3.10+ at /nonexistent/python3 "
        "(install python3 there or set ansible_python_interpreter)"
    ) in first.stderr
    assert "2 of 3 hosts ok, 1 failed" in first.stdout
    for host in GOOD:
        base = f"http://{listen[host]}"
        assert httpx.get(f"{base}/health", timeout=5).json()["status"] == "ok"
        model = httpx.get(f"{base}/v1/models", timeout=5).json()["data"][0]["id"]
        reply = httpx.post(
            f"{base}/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
            timeout=60,
        )
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] >= 1, reply.text
        home = fleet["homes"][host]
        current = home / ".local/share/edge-slm/current"
        assert current.is_symlink() and (current / "manifest.json").is_file()
        assert "home = /usr/bin" in (home / ".local/share/edge-slm/venv/pyvenv.cfg").read_text()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://{listen[BROKEN]}/health", timeout=2)

    again = edge_slm("deploy", "--inventory", inventory, "--serve", "--limit", ",".join(GOOD))
    assert again.returncode == 0, again.stdout + again.stderr
    rows = recap(again.stdout)
    assert all(rows[h]["changed"] == 0 and rows[h]["failed"] == 0 for h in GOOD), again.stdout
    assert "2 of 2 hosts ok" in again.stdout

    # One deploy at a time per device: while another deploy holds dev0's lock (the flock `deploy --host`
    # takes), the role fails there in one line naming the holder; dev1 proceeds and releases its lock.
    state = {host: fleet["homes"][host] / ".local/share/edge-slm" for host in GOOD}
    holder = "deploy --host from elsewhere pid 42 since 12:00:00 UTC"
    (state[GOOD[0]] / "deploy.owner").write_text(holder + "\n")
    with open(state[GOOD[0]] / "deploy.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        locked = edge_slm("deploy", "--inventory", inventory, "--serve", "--limit", ",".join(GOOD))
    assert locked.returncode == 1, locked.stdout + locked.stderr
    assert (
        f"error: {GOOD[0]}: Take the device's deploy lock: another deploy is using this device's edge-slm install "
        f"({holder}): wait for it to finish, then deploy again"
    ) in locked.stderr.splitlines(), locked.stderr
    rows = recap(locked.stdout)
    assert rows[GOOD[0]]["failed"] == 1 and rows[GOOD[1]]["failed"] == 0 and rows[GOOD[1]]["changed"] == 0, rows
    assert (state[GOOD[0]] / "deploy.owner").read_text() == holder + "\n"  # the holder's record left alone
    (state[GOOD[0]] / "deploy.owner").unlink()
    assert not (state[GOOD[1]] / "deploy.owner").exists() and not (state[GOOD[1]] / "deploy.holder").exists()
    with open(state[GOOD[1]] / "deploy.lock", "a") as free:
        fcntl.flock(free, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released at the end of dev1's play

    # bench over the inventory, through the same venvs and bundle folders; the records filed per host.
    # The broken host fails alone.
    bench = edge_slm(
        "bench", "--inventory", inventory, "-r", "1", "--warmup", "0", "--no-accuracy",
        "--prompt-tokens", "8", "--gen-tokens", "4", "--threads", "1", cwd=tmp_path,
    )  # fmt: skip
    assert bench.returncode == 2, bench.stdout + bench.stderr  # the broken host fails, the good ones measure
    assert f"error: {BROKEN}: Refuse a device without a usable Python: no Python 3.10+" in bench.stderr
    for host in GOOD:
        filed = tmp_path / f"benchmarks/results/tiny-laptop/{host}.jsonl"
        assert filed.is_file(), bench.stdout + bench.stderr
        records = [json.loads(line) for line in filed.open()]
        assert len(records) == 1 and records[0]["remote"]["host"] == host, records
        assert records[0]["bundle"]["target"] == "tiny-laptop" and records[0]["settings"]["gen_tokens"] == 4
    assert f"{GOOD[0]}: 1 records appended to benchmarks/results/tiny-laptop/{GOOD[0]}.jsonl" in bench.stderr
    # The report keeps the hosts apart (the three devices share this machine's hostname).
    files = [tmp_path / f"benchmarks/results/tiny-laptop/{host}.jsonl" for host in GOOD]
    made = edge_slm("report", *files, "--out", tmp_path / "fleet-report")
    assert made.returncode == 0, made.stderr
    report = (tmp_path / "fleet-report" / "report.md").read_text()
    assert all(f"1t, {host})" in report or f"2t, {host})" in report for host in GOOD), report

    # A rolling update one host at a time, whose first host cannot listen where the inventory says:
    # the rollout stops there, and that host keeps serving its previous server.
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        busy = blocker.getsockname()[1]
        moved = json.loads(inventory.read_text())
        moved["all"]["hosts"][GOOD[0]]["edge_slm_listen"] = f"127.0.0.1:{busy}"
        (inventory.parent / "moved.yml").write_text(json.dumps(moved))
        rolled = edge_slm("deploy", "--inventory", inventory.parent / "moved.yml", "--serve", "--serial", "1")
    assert rolled.returncode == 1, rolled.stdout + rolled.stderr
    assert (
        f"error: {GOOD[0]}: Refuse a port held by another process: port {busy} is already in use there "
        "(a process of another user) and not by the server deploy started: stop that process or set "
        "edge_slm_listen to another port"
    ) in rolled.stderr
    assert GOOD[1] not in recap(rolled.stdout) and BROKEN not in recap(rolled.stdout), rolled.stdout
    assert httpx.get(f"http://{listen[GOOD[0]]}/health", timeout=5).json()["status"] == "ok"

    # A rollout one host at a time of a bundle whose smoke test fails on the first host: dev0 computes
    # other greedy tokens than this machine (a fault planted in its venv: numpy's argmax answers argmin).
    # The rollout stops there, every host keeps serving the previous bundle and dev1 is not touched.
    following = tmp_path / "following"
    shutil.copytree(tiny_bundle, following)
    manifest = json.loads((following / "manifest.json").read_text())
    (following / "manifest.json").write_text(json.dumps({**manifest, "target": "tiny-laptop-next"}))
    fault = next((state[GOOD[0]] / "venv").glob("lib/python3*/site-packages")) / "zz_edge_slm_test_fault.pth"
    before = {host: sorted(p.name for p in (state[host] / "bundles").iterdir()) for host in GOOD}
    fault.write_text("import numpy; numpy.argmax = numpy.argmin\n")
    try:
        bad = edge_slm("deploy", following, "--inventory", inventory, "--serve", "--serial", "1")
    finally:
        fault.unlink()
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert (
        f"error: {GOOD[0]}: Compare with the control machine's reference: the smoke test failed: "
        "0/8 greedy tokens as on this machine"
    ) in bad.stderr, bad.stderr
    rows = recap(bad.stdout)
    assert rows[GOOD[0]]["failed"] == 1 and set(rows) == {GOOD[0]}, bad.stdout
    assert sorted(p.name for p in (state[GOOD[1]] / "bundles").iterdir()) == before[GOOD[1]]
    for host in GOOD:
        assert httpx.get(f"http://{listen[host]}/health", timeout=5).json()["model"] == "tiny-laptop"
        assert (state[host] / "current").resolve().name == before[host][0]

    # A file of a device's install that differs from the wheel is found, and the wheel installed again.
    venv = fleet["homes"][GOOD[1]] / ".local/share/edge-slm/venv"
    code = next(venv.glob("lib/python3*/site-packages/edge_slm/core/bundle.py"))
    original = code.read_bytes()
    code.write_bytes(original + b"\nraise SystemExit('tampered')\n")
    repaired = edge_slm("deploy", "--inventory", inventory, "--serve", "--limit", GOOD[1])
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert code.read_bytes() == original and recap(repaired.stdout)[GOOD[1]]["changed"] > 0, repaired.stdout
    assert httpx.get(f"http://{listen[GOOD[1]]}/health", timeout=5).json()["status"] == "ok"

    status = edge_slm("deploy", "--inventory", inventory, "--status", "--limit", ",".join(GOOD))
    assert status.returncode == 0, status.stdout + status.stderr
    for host in GOOD:
        assert f"{host}: detached pid" in status.stdout and f"on {listen[host]}" in status.stdout, status.stdout
    stopped = edge_slm("deploy", "--inventory", inventory, "--stop", "--limit", ",".join(GOOD))
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert all(f"{host}: stopped" in stopped.stdout for host in GOOD), stopped.stdout
    for host in GOOD:
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://{listen[host]}/health", timeout=2)
    status = edge_slm("deploy", "--inventory", inventory, "--status", "--limit", GOOD[0])
    assert f"{GOOD[0]}: stopped" in status.stdout, status.stdout


def test_plain_ansible_playbook_serves_again(fleet, tmp_path):
    """A person's own run: `ansible-playbook -i inventory.yml deploy.yml`, the first play preparing
    on this machine; the installs of the test above are reused, the server started again."""
    env = {**os.environ, "ANSIBLE_NOCOLOR": "1"}
    run = subprocess.run(
        [str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(fleet["inventory"]), "--limit", GOOD[0]]
        + ["-e", "edge_slm_serve=true", "-e", f"edge_slm_work_dir={tmp_path}", str(ANSIBLE_DIR / "deploy.yml")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "failed=0" in run.stdout.split("PLAY RECAP")[-1]
    assert httpx.get(f"http://{fleet['listen'][GOOD[0]]}/health", timeout=5).json()["status"] == "ok"
    stopped = edge_slm("deploy", "--inventory", fleet["inventory"], "--stop", "--limit", GOOD[0])
    assert stopped.returncode == 0 and f"{GOOD[0]}: stopped" in stopped.stdout, stopped.stdout + stopped.stderr


def test_unreachable_refused_and_damaged_are_named(fleet, tiny_bundle, tmp_path):
    """A host whose key is refused, one where nothing listens, each named in one line; a damaged
    bundle is refused before any host is contacted."""
    hosts = json.loads(fleet["inventory"].read_text())
    good = hosts["all"]["hosts"][GOOD[0]]
    # A user sshd does not let in, with a key it does not know (a user of its own: Ansible's shared
    # connection to dev1 would otherwise be reused without authenticating again).
    refused = {
        **good,
        "ansible_user": "edge-slm-nobody",
        "ansible_ssh_private_key_file": str(fleet["inventory"].parent / "host_key"),
    }
    closed = {**good, "ansible_port": free_port()}
    # A Python without ensurepip, as Debian's is until python3-venv is installed.
    shadow = Path(tempfile.mkdtemp(prefix="edge-slm-fleet-novenv-"))
    (shadow / "sitecustomize.py").write_text("import sys\nsys.modules['ensurepip'] = None\n")
    (shadow / "python3").write_text(f'#!/bin/sh\nPYTHONPATH={shadow} exec /usr/bin/python3 "$@"\n')
    for path in (shadow, shadow / "python3", shadow / "sitecustomize.py"):
        path.chmod(0o755)
    novenv = {**hosts["all"]["hosts"][GOOD[1]], "ansible_python_interpreter": str(shadow / "python3")}
    hosts["all"]["hosts"] = {"refused": refused, "closed": closed, "novenv": novenv}
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(json.dumps(hosts))
    run = edge_slm("deploy", "--inventory", inventory)
    assert run.returncode == 1, run.stdout + run.stderr
    rows = recap(run.stdout)
    assert rows["refused"]["unreachable"] == rows["closed"]["unreachable"] == 1, run.stdout
    lines = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    shutil.rmtree(shadow)
    assert len(lines) == 3, run.stderr
    assert lines[0].startswith("error: closed: Check for Python 3.10+ with the venv module: unreachable: ")
    assert "Connection refused" in lines[0]
    assert lines[2].startswith("error: refused: Check for Python 3.10+ with the venv module: authentication refused: ")
    assert "Permission denied (publickey)" in lines[2]
    assert lines[1] == (
        f"error: novenv: Refuse a device without a usable Python: no venv module in {shadow / 'python3'}: "
        "`sudo apt install python3-venv`, then deploy again"
    )
    assert "0 of 3 hosts ok, 3 failed" in run.stdout

    toml = tmp_path / "devices.toml"
    toml.write_text(f'[[device]]\nhost = "pi@192.0.2.7"\nport = 2222\nbundle = "{tiny_bundle}"\ntarget = "rpi5"\n')
    old = edge_slm("bench", "--inventory", toml)
    assert old.returncode == 2 and old.stderr.strip() == (
        f"error: --inventory {toml}: bench takes an Ansible inventory now; {tmp_path / 'devices.yml'} holds the "
        f"same devices: check it, then run again with --inventory {tmp_path / 'devices.yml'}"
    )
    assert json.loads((tmp_path / "devices.yml").read_text())["all"]["hosts"] == {
        "192.0.2.7": {"ansible_host": "192.0.2.7", "ansible_port": 2222, "edge_slm_bundle": str(tiny_bundle),
                      "ansible_user": "pi", "edge_slm_target": "rpi5"}
    }  # fmt: skip

    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_bundle, damaged)
    with open(damaged / "tokenizer.json", "r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(b"[" if first != b"[" else b"{")
    run = edge_slm("deploy", damaged, "--inventory", fleet["inventory"], "--serve")
    assert run.returncode == 2 and "PLAY RECAP" not in run.stdout, run.stdout + run.stderr
    assert run.stderr.strip().splitlines()[-1] == (
        f"error: {damaged / 'tokenizer.json'}: checksum mismatch (the file is corrupt): copy it again or rebuild"
    )
