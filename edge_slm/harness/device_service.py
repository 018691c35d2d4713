"""What deploy keeps on a device besides files: the install's lock and the server it started.

- One deploy at a time per device install: `device_lock()` holds `flock` on
  ~/.local/share/edge-slm/deploy.lock for as long as an SSH session stays open (the lock goes when
  the session ends, however this machine's process ends); a second deploy fails in one line naming
  the first.
- The server deploy starts is recorded in serve.json with its pid and its start time (field 22 of
  /proc/PID/stat, in clock ticks since boot): a pid the kernel gave to another process since has
  another start time, so `--stop` never signals it. Under systemd the record names the user unit
  deploy wrote (marked as ours), and only such a unit is stopped or replaced.
- A listen port held by anything but that recorded server fails the deploy before the switch, and a
  started server counts as up only when /health answers AND the listening socket on the port is
  its own (so another server answering on the port, or our server dying of EADDRINUSE, is a failure).

The device half of this is one stdlib-only Python script (`DEVICE_SCRIPT`) run by the device's
Python: reading /proc and JSON in POSIX shell would be longer and easier to get wrong.
"""

from __future__ import annotations

import json
import os
import select
import shlex
import socket
import subprocess
import time
from contextlib import contextmanager

from edge_slm.core.device_scripts import DEVICE_SCRIPT
from edge_slm.harness.ssh import Device, RemoteError, ssh, ssh_failure

HOME_DIR = ".local/share/edge-slm"
SERVICE = "edge-slm"
LOCK_WAIT_S = 0  # a second deploy fails at once, naming the first: deploys take minutes, not seconds
HEALTH_WAIT_S = 120


@contextmanager
def device_lock(device: Device, what: str, wait_s: float = LOCK_WAIT_S):
    """Hold the device install's lock for the length of a `with` block, or fail in one line naming
    whoever holds it. The lock is `flock` on a file, held by a shell that waits for this end of the
    SSH session to close its input: no stale lock outlives a dead deploy."""
    owner = f"{what} from {socket.gethostname()} pid {os.getpid()} since {time.strftime('%H:%M:%S UTC', time.gmtime())}"
    script = (
        "command -v flock >/dev/null || { echo noflock; exit 0; }; "
        f"mkdir -p {HOME_DIR} && cd {HOME_DIR} || exit 1; exec 9>>deploy.lock; "
        f"if ! flock {'-w ' + str(wait_s) if wait_s else '-n'} 9; then "
        "echo busy $(head -c 300 deploy.owner 2>/dev/null | tr -cd '[:print:]'); exit 0; fi; "
        f"printf '%s\\n' {shlex.quote(owner)} > deploy.owner.tmp && mv -f deploy.owner.tmp deploy.owner; "
        "echo locked; cat > /dev/null; rm -f deploy.owner"
    )
    proc = subprocess.Popen(
        ["ssh", *device.ssh_args(), "-p", str(device.port), "--", device.destination, script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    ready, _, _ = select.select([proc.stdout], [], [], 30 + wait_s)
    first = proc.stdout.readline().decode(errors="replace").strip() if ready else ""
    if first != "locked":
        proc.kill()
        _, err = proc.communicate()
        if first.startswith("busy"):
            holder = first[4:].strip() or "owner unknown"
            raise RemoteError(
                f"{device.host}: another deploy is using this device's edge-slm install ({holder}): "
                "wait for it to finish, then try again"
            )
        if first == "noflock":
            raise RemoteError(f"{device.host}: `flock` is not installed there: install util-linux, then try again")
        if proc.returncode == 255 or not first:
            raise ssh_failure(device, err)
        reason = (err.decode(errors="replace").strip().splitlines() or ["no answer"])[-1]
        raise RemoteError(f"{device.host}: taking the deploy lock failed: {reason}")
    try:
        yield
    finally:
        proc.stdin.close()  # the device's `cat` ends, the shell exits, the lock is released
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _device(device: Device, action: str, timeout: float = 120, **args) -> dict:
    """Run one action of the device script with the device's Python; its last line is JSON."""
    payload = json.dumps({"action": action, "home_dir": HOME_DIR, **args})
    out = ssh(
        device,
        f"{shlex.quote(device.python)} - {shlex.quote(payload)}",
        stdin=DEVICE_SCRIPT.encode(),
        timeout=timeout,
    )
    try:
        reply = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise RemoteError(f"{device.host}: the device's answer to '{action}' was not understood ({out[-120:]!r})")
    if "error" in reply:
        raise RemoteError(f"{device.host}: {reply['error']}")
    return reply


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def check_port(device: Device, listen: str) -> None:
    """Fail in one line when the listen port is held by anything but the server deploy started."""
    host, port = split_listen(listen)
    found = _device(device, "check_port", host=host, port=port)
    if not found["free"] and not found["in_use"]:
        raise RemoteError(
            f"{device.host}: cannot listen on {host}:{port} there ({found['problem']}): "
            "pass --listen with an address of the device (0.0.0.0 for every interface)"
        )
    if not found["free"]:
        who = "; ".join(found["holders"]) or "a process of another user"
        raise RemoteError(
            f"{device.host}: port {port} is already in use there ({who}) and not by the server deploy started: "
            f"stop that process or pass --listen {host or '0.0.0.0'}:ANOTHER_PORT"
        )


def recorded_server(device: Device) -> dict | None:
    """The server deploy recorded, if it still runs (its pid with its start time, or our unit)."""
    found = _device(device, "status")
    return found["record"] if found["state"] == "running" else None


def has_systemd(device: Device) -> bool:
    try:
        ssh(device, "command -v systemctl >/dev/null && systemctl --user show-environment >/dev/null 2>&1", timeout=60)
        return True
    except RemoteError:
        return False


def start_server(
    device: Device,
    venv: str,
    remote_bundle: str,
    listen: str,
    threads: int | None,
    progress=lambda msg: None,
) -> str:
    """Start `edge-slm serve` on the device, record it, and wait until it is up (see `DEVICE_SCRIPT`'s
    "wait"); returns how it runs. Whatever was recorded before must have been stopped."""
    host, port = split_listen(listen)
    systemd = has_systemd(device)
    home = "%h" if systemd else "~"
    command = [f"{home}/{venv}/bin/edge-slm", "serve", f"{home}/{remote_bundle}", "--host", host, "--port", str(port)]
    command += ["--threads", str(threads)] if threads else []
    _device(
        device,
        "start",
        command=command,
        port=port,
        listen=listen,
        bundle=remote_bundle,
        threads=threads,
        systemd=systemd,
        unit=SERVICE,
    )
    if systemd:
        how = f"a systemd user service ({SERVICE}.service, restarted on failure, started at boot)"
    else:
        how = (
            f"detached (no systemd user session there): pid and start time in ~/{HOME_DIR}/serve.json, log in serve.log"
        )
    progress(f"{device.host}: started the server as {how}; waiting for /health")
    probe_host = "127.0.0.1" if host in ("", "0.0.0.0") else "::1" if host == "::" else host
    up = _device(device, "wait", timeout=HEALTH_WAIT_S + 60, probe_host=probe_host, seconds=HEALTH_WAIT_S)
    if not up["up"]:
        _device(device, "stop")
        raise RemoteError(f"{device.host}: the server on port {port} did not come up: {up['why']}")
    return how


def service_status(device: Device) -> str:
    found = _device(device, "status")
    if found["state"] == "stopped":
        return "stopped"
    record = found["record"]
    if found["state"] == "reused":
        return f"stopped (the recorded server is gone; pid {record['pid']} now belongs to another process)"
    if found["state"] == "gone":
        return "stopped (the recorded server exited)"
    if record.get("systemd"):
        return f"systemd active ({record['unit']}.service serving ~/{record['bundle']} on {record['listen']})"
    return f"detached pid {record['pid']} serving ~/{record['bundle']} on {record['listen']}"


def stop_service(device: Device, quiet: bool = False) -> str:
    """Stop the server deploy started and wait until it has exited (SIGTERM, then SIGKILL after
    15 s), so "stopped" means its port is free. Only the recorded process is signalled: its pid
    AND its start time must match; a pid that now belongs to another process is left alone and
    (unless `quiet`) reported as an error."""
    found = _device(device, "stop", timeout=60)
    if found["state"] == "reused" and not quiet:
        raise RemoteError(
            f"{device.host}: the recorded server is gone; pid {found['pid']} now belongs to another process: not stopped"
        )
    return "stopped"
