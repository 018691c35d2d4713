"""`edge-slm deploy --inventory` over three "devices": three throwaway users behind one real OpenSSH
server on loopback, described in an Ansible YAML inventory, two good and one whose Python does not
exist. The edge_slm role makes a venv from Debian's externally managed /usr/bin/python3 on each,
installs the wheel and onnxruntime, copies, verifies, smoke-tests and serves the tiny bundle; a
second run changes nothing; --status and --stop go over the inventory; the plain
`ansible-playbook -i inventory.yml deploy.yml` does the same."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
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
        for user in users:
            subprocess.run(["pkill", "-KILL", "-u", user], capture_output=True)  # what a failed test left running
            subprocess.run(["userdel", user], capture_output=True)
        for home in homes:
            shutil.rmtree(home, ignore_errors=True)


def edge_slm(*args, timeout=900):
    return subprocess.run([*EDGE_SLM, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def recap(stdout: str) -> dict[str, dict[str, int]]:
    rows = {}
    for line in stdout.splitlines():
        host, sep, counts = line.partition(" : ")
        if sep and "ok=" in counts:
            rows[host.strip()] = {k: int(v) for k, v in (c.split("=") for c in counts.split())}
    return rows


def test_deploy_inventory_serve_redeploy_status_stop(fleet, tiny_bundle):
    inventory, listen = fleet["inventory"], fleet["listen"]
    first = edge_slm("deploy", "--inventory", inventory, "--serve")
    print(first.stdout, first.stderr)
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
