"""SSH to a device with the system's OpenSSH client: the device's address checked so that it can
never be read as an option, `--` before the destination, batch mode, trust on first use of host
keys (or strict), and one error line naming the host when anything fails."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass

from edge_slm.core.errors import EdgeSlmError
from edge_slm.core.worker import run_worker


@dataclass(frozen=True)
class Device:
    host: str  # user@hostname, hostname, or user@[IPv6]
    port: int = 22
    identity: str | None = None  # private key file
    python: str = "python3"
    bundle: str | None = None  # for inventories: the bundle to benchmark there
    target: str | None = None
    known_hosts: str | None = None  # a known_hosts file other than ~/.ssh/known_hosts
    strict_host_keys: bool = False  # True: only hosts already in known_hosts (fleets that pre-distribute keys)

    def __post_init__(self):
        check_host(self.host)
        if not isinstance(self.port, int) or isinstance(self.port, bool) or not 0 < self.port < 65536:
            raise RemoteError(f"{self.host}: port {self.port!r} is not a TCP port (1-65535)")
        for name in ("identity", "python", "bundle", "target", "known_hosts"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value or value.startswith("-")):
                raise RemoteError(
                    f"{self.host}: '{name}' must be a path or name that does not start with '-', got {value!r}"
                )

    @property
    def destination_scp(self) -> str:
        """The host as scp takes it (an IPv6 address keeps its brackets)."""
        return self.host

    @property
    def destination(self) -> str:
        """The host as ssh takes it (an IPv6 address without its brackets)."""
        return self.host.replace("[", "").replace("]", "")

    def ssh_args(self) -> list[str]:
        # Trust on first use by default: a new host's key is recorded, a changed one is refused.
        checking = "yes" if self.strict_host_keys else "accept-new"
        args = [
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=10",
            "-o",
            f"StrictHostKeyChecking={checking}",
            "-o",
            "LogLevel=ERROR",
        ]
        if self.known_hosts:
            args += ["-o", f"UserKnownHostsFile={self.known_hosts}"]
        if self.identity:
            args += ["-i", self.identity, "-o", "IdentitiesOnly=yes"]
        return args


# user@host, host, or user@[IPv6]: letters, digits, dots, dashes and underscores only, so that a host
# can never be read as an ssh option or carry shell or ssh syntax.
_HOST = re.compile(
    r"(?:[A-Za-z0-9_][A-Za-z0-9._-]{0,63}@)?(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]{2,45}\])"
)


def check_host(host) -> str:
    if not isinstance(host, str) or not _HOST.fullmatch(host):
        raise RemoteError(
            f"host {host!r} is not a device address: write user@hostname, hostname or user@[IPv6 address] "
            "(letters, digits, '.', '-', '_'; no spaces, no leading '-')"
        )
    return host


class RemoteError(EdgeSlmError):
    """A remote device could not be reached, refused us, or failed to run the benchmark."""


def ssh_prefix(device: Device) -> list[str]:
    """The ssh command that runs what follows it on the device (through the device's shell)."""
    return ["ssh", *device.ssh_args(), "-p", str(device.port), "--", device.destination]


def remote_worker(device: Device, python: str, target: str, config: dict, what: str, timeout: float = 3600) -> dict:
    """`target` ("package.module:function") on `config` by the device's `python`: the worker protocol over SSH."""
    try:
        return run_worker(
            target, config, python=python, prefix_cmd=ssh_prefix(device), shell=True, timeout=timeout, what=what
        )
    except EdgeSlmError as exc:
        raise RemoteError(str(exc)) from None


def ssh(device: Device, command: str, stdin: bytes | None = None, timeout: float = 3600) -> str:
    proc = subprocess.run(
        [*ssh_prefix(device), command],
        input=stdin,
        capture_output=True,
        timeout=timeout,
    )
    if proc.returncode == 255:
        raise ssh_failure(device, proc.stderr)
    if proc.returncode:
        tail = (proc.stderr.decode(errors="replace").strip().splitlines() or ["(no message)"])[-1]
        raise RemoteError(f"{device.host}: `{command.split()[0]}` failed with exit code {proc.returncode}: {tail}")
    return proc.stdout.decode()


def ssh_failure(device: Device, stderr: bytes) -> RemoteError:
    """ssh's own failure (exit code 255) as one line: its last message, a refused key said so."""
    message = stderr.decode(errors="replace").strip().splitlines()
    reason = message[-1] if message else "no answer"
    if "Permission denied" in reason:
        reason = f"the key was refused ({reason})"
    return RemoteError(f"{device.host}:{device.port}: ssh failed: {reason}")
