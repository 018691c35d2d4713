"""Benchmark on a remote device over SSH: copy the bundle and the runtime, run `edge-slm bench`
there, bring the records back.

    edge-slm bench BUNDLE --host user@device [--port 22] [--identity KEY] [--remote-python python3]
    edge-slm bench --inventory devices.toml        # several devices in parallel

The bundle goes to `~/.cache/edge-slm/bundles/<manifest hash>/` on the device; files already
there with the same sha256 are not copied again. The runtime (this package's torch-free code) goes
beside it; onnxruntime, numpy, tokenizers, jinja2 and click are installed with pip only if the
device's Python lacks them. Uses the system's `ssh` and `scp` (OpenSSH).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shlex
import subprocess
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from edge_slm.core.bundle import MANIFEST, verify_bundle
from edge_slm.core.errors import EdgeSlmError
from edge_slm.core.hashing import sha256_file
from edge_slm.harness.bench import record_problem

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

RUNTIME_SUMS = "edge_slm.sha256"
RUNTIME_PACKAGES = ["onnxruntime", "numpy", "tokenizers", "jinja2", "click"]
_PACKAGE_DIR = Path(__file__).resolve().parents[1]
# The device half of the package: what `python -m edge_slm.cli bench` needs on a device. The build
# half (torch, onnx) never goes there; tests/test_layering.py keeps these parts free of it.
DEVICE_PARTS = (
    "__init__.py",
    "cli.py",
    "commands",
    "core",
    "runtime",
    "data",
    "harness/__init__.py",
    "harness/bench.py",
)


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


def _ssh(device: Device, command: str, stdin: bytes | None = None, timeout: float = 3600) -> str:
    proc = subprocess.run(
        ["ssh", *device.ssh_args(), "-p", str(device.port), "--", device.destination, command],
        input=stdin,
        capture_output=True,
        timeout=timeout,
    )
    if proc.returncode == 255:
        message = proc.stderr.decode(errors="replace").strip().splitlines()
        reason = message[-1] if message else "no answer"
        if "Permission denied" in reason:
            reason = f"the key was refused ({reason})"
        raise RemoteError(f"{device.host}:{device.port}: ssh failed: {reason}")
    if proc.returncode:
        tail = (proc.stderr.decode(errors="replace").strip().splitlines() or ["(no message)"])[-1]
        raise RemoteError(f"{device.host}: `{command.split()[0]}` failed with exit code {proc.returncode}: {tail}")
    return proc.stdout.decode()


def _runtime_tarball() -> tuple[bytes, str]:
    """The torch-free code the device needs, as a tar.gz, and its digest."""
    files = sorted(
        p
        for part in DEVICE_PARTS
        for p in ([_PACKAGE_DIR / part] if part.endswith(".py") else (_PACKAGE_DIR / part).rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts and p.suffix in (".py", ".txt")
    )
    names = [str(Path("edge_slm") / path.relative_to(_PACKAGE_DIR)) for path in files]
    # A `sha256sum -c` list of every file, so the device can check the whole copy, not one file.
    sums = "".join(f"{sha256_file(path)}  {name}\n" for path, name in zip(files, names)).encode()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path, name in zip(files, names):
            info = tar.gettarinfo(str(path), arcname=name)
            info.mtime = 0
            with open(path, "rb") as handle:
                tar.addfile(info, handle)
        info = tarfile.TarInfo(RUNTIME_SUMS)
        info.size = len(sums)
        tar.addfile(info, io.BytesIO(sums))
    data = buffer.getvalue()
    return data, hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()[:16]


def prepare(device: Device, bundle: Path, progress=lambda msg: None) -> tuple[str, str]:
    """Make sure the device has Python with the runtime packages, our code and the bundle."""
    manifest = verify_bundle(bundle, checksums=False)
    py = shlex.quote(device.python)
    try:
        _ssh(device, f"{py} -c 'import sys; assert sys.version_info >= (3, 10)'", timeout=60)
    except RemoteError as exc:
        if "ssh failed" in str(exc):
            raise
        raise RemoteError(
            f"{device.host}: no usable Python 3.10+ at '{device.python}' "
            "(install python3 there or pass --remote-python PATH)"
        ) from None
    check = f"{py} -c 'import " + ", ".join(RUNTIME_PACKAGES) + "'"
    try:
        _ssh(device, check, timeout=120)
    except RemoteError:
        progress(f"{device.host}: installing the runtime packages ({' '.join(RUNTIME_PACKAGES)})")
        _ssh(device, f"{py} -m pip install --user --quiet " + " ".join(RUNTIME_PACKAGES), timeout=1800)

    tarball, digest = _runtime_tarball()
    code_dir = f".cache/edge-slm/runtime/{digest}"
    _ssh(
        device,
        # Every file is checked against its sha256; a copy that differs is replaced whole.
        f"mkdir -p {code_dir} && cd {code_dir} && (sha256sum --quiet -c {RUNTIME_SUMS} >/dev/null 2>&1 || "
        f"(rm -rf edge_slm {RUNTIME_SUMS} && tar -xzf -))",
        stdin=tarball,
    )

    manifest_hash = hashlib.sha256((bundle / MANIFEST).read_bytes()).hexdigest()[:16]
    remote_bundle = f".cache/edge-slm/bundles/{manifest_hash}"
    listing = _ssh(device, f"mkdir -p {remote_bundle} && cd {remote_bundle} && (sha256sum * 2>/dev/null || true)")
    present = {line.split()[1]: line.split()[0] for line in listing.splitlines() if len(line.split()) == 2}
    wanted = dict(
        manifest["files"], **{MANIFEST: {"sha256": hashlib.sha256((bundle / MANIFEST).read_bytes()).hexdigest()}}
    )
    missing = [name for name, info in wanted.items() if present.get(name) != info["sha256"]]
    if missing:
        progress(f"{device.host}: copying {len(missing)} of {len(wanted)} bundle files")
        proc = subprocess.run(
            [
                "scp",
                "-q",
                *device.ssh_args(),
                "-P",
                str(device.port),
                "--",
                *[str(bundle / name) for name in missing],
                f"{device.host}:{remote_bundle}/",
            ],
            capture_output=True,
            text=True,
        )
        if proc.returncode:
            raise RemoteError(f"{device.host}: copying the bundle failed: {proc.stderr.strip()[-300:]}")
    else:
        progress(f"{device.host}: the bundle is already there (checksums match)")
    return code_dir, remote_bundle


def bench_remote(device: Device, bundle: Path, bench_args: list[str], progress=lambda msg: None) -> list[dict]:
    code_dir, remote_bundle = prepare(device, Path(bundle), progress)
    progress(f"{device.host}: running the benchmark")
    command = (
        f"cd {code_dir} && PYTHONPATH=. {shlex.quote(device.python)} -m edge_slm.cli bench "
        f"$HOME/{remote_bundle} --json " + " ".join(shlex.quote(a) for a in bench_args)
    )
    output = _ssh(device, command)
    records = device_records(device, output)
    for record in records:
        record["remote"] = {"host": device.host, "port": device.port, "bundle": str(bundle)}
    return records


def device_records(device: Device, output: str) -> list[dict]:
    """The records a device printed, each checked: a reply that is not JSON lines of valid records
    fails this host only, with one line naming it."""
    records = []
    for number, line in enumerate(output.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            raise RemoteError(
                f"{device.host}: line {number} of its reply is not JSON ({line[:60]!r}): "
                "check the edge-slm install there"
            ) from None
        problem = record_problem(record)
        if problem:
            raise RemoteError(f"{device.host}: line {number} of its reply is not a valid record: {problem}")
        records.append(record)
    if not records:
        raise RemoteError(f"{device.host}: the benchmark printed no records: run `edge-slm bench` there to see why")
    return records


def read_inventory(path: Path) -> list[Device]:
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EdgeSlmError(f"{path}: no such inventory file") from None
    except tomllib.TOMLDecodeError as exc:
        raise EdgeSlmError(f"{path}: not valid TOML: {exc}") from None
    devices = []
    allowed = {"host", "port", "identity", "python", "bundle", "target", "known_hosts", "strict_host_keys"}
    entries = raw.get("device", [])
    if not isinstance(entries, list):
        raise EdgeSlmError(f"{path}: 'device' must be a list of [[device]] tables")
    for n, entry in enumerate(entries, 1):
        unknown = set(entry) - allowed
        if unknown:
            raise EdgeSlmError(
                f"{path}: device {n}: unknown key '{sorted(unknown)[0]}' (allowed: {', '.join(sorted(allowed))})"
            )
        if "host" not in entry or "bundle" not in entry:
            raise EdgeSlmError(f"{path}: device {n} needs a 'host' and a 'bundle'")
        if "strict_host_keys" in entry and not isinstance(entry["strict_host_keys"], bool):
            raise EdgeSlmError(f"{path}: device {n}: 'strict_host_keys' must be true or false")
        try:
            devices.append(Device(**entry))
        except RemoteError as exc:
            raise EdgeSlmError(f"{path}: device {n}: {exc}") from None
    if not devices:
        raise EdgeSlmError(f"{path}: no [[device]] entries")
    return devices


def bench_inventory(devices: list[Device], bench_args: list[str], progress=lambda msg: None) -> tuple[list[dict], dict]:
    """All devices in parallel; returns every record and, per host that failed, why."""

    def one(device):
        try:
            return bench_remote(device, Path(device.bundle), bench_args, progress), None
        except (EdgeSlmError, subprocess.SubprocessError, OSError) as exc:
            return [], str(exc)

    records, failures = [], {}
    with ThreadPoolExecutor(max_workers=len(devices)) as pool:
        for device, (got, error) in zip(devices, pool.map(one, devices)):
            records += got
            if error:
                failures[f"{device.host}:{device.port}"] = error
    return records, failures
