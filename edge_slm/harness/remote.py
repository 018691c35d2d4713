"""Benchmark on a remote device over SSH: copy the bundle and the runtime, run the benchmark there
(`edge_slm.runtime.bench:bench_worker`, through the worker protocol), bring the records back.

    edge-slm bench BUNDLE --host user@device [--port 22] [--identity KEY] [--remote-python python3]
    edge-slm bench --inventory devices.toml        # several devices in parallel

The venv and the bundle copy are `edge-slm deploy`'s (harness/deploy.py): the wheel of this
checkout in `~/.local/share/edge-slm/venv/` with onnxruntime pinned from the profile, the bundle
under `~/.local/share/edge-slm/bundles/<manifest hash>/`, files already there with the same sha256
not copied again. Uses the system's `ssh` and `scp` (OpenSSH).
"""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from edge_slm.core.bundle import verify_bundle
from edge_slm.core.errors import EdgeSlmError
from edge_slm.core.tomlfile import TOMLDecodeError, read_toml
from edge_slm.harness.deploy import checkout_wheel, copy_bundle, ensure_venv
from edge_slm.harness.device_service import device_lock
from edge_slm.harness.ssh import Device, RemoteError, remote_worker
from edge_slm.runtime.bench import record_problem


def bench_remote(device: Device, bundle: Path, config: dict, progress=lambda msg: None) -> list[dict]:
    """`edge_slm.runtime.bench.bench_bundle(**config)` on the device (the worker protocol over SSH),
    through the venv and bundle copy that `edge-slm deploy` uses."""
    manifest = verify_bundle(bundle, checksums=False)
    # The install deploy uses, under deploy's lock: no deploy reinstalls the venv under a benchmark.
    with device_lock(device, f"bench of {Path(bundle).name}"):
        with checkout_wheel() as wheel:
            venv = ensure_venv(device, manifest, wheel, progress=progress)
        remote_bundle = copy_bundle(device, Path(bundle), manifest, progress)
        progress(f"{device.host}: running the benchmark")
        reply = remote_worker(
            device,
            f"{venv}/bin/python",
            "edge_slm.runtime.bench:bench_worker",
            {**config, "bundle": remote_bundle},
            what=f"{device.host}: the benchmark",
        )
    records = device_records(device, reply.get("records"))
    for record in records:
        record["remote"] = {"host": device.host, "port": device.port, "bundle": str(bundle)}
    return records


def device_records(device: Device, records) -> list[dict]:
    """The records a device sent back, each checked: a reply that is not a list of valid records
    fails this host only, with one line naming it."""
    if not isinstance(records, list):
        raise RemoteError(f"{device.host}: its reply has no list of records: check the edge-slm install there")
    for number, record in enumerate(records, 1):
        problem = record_problem(record)
        if problem:
            raise RemoteError(f"{device.host}: record {number} of its reply is not a valid record: {problem}")
    if not records:
        raise RemoteError(f"{device.host}: the benchmark printed no records: run `edge-slm bench` there to see why")
    return records


def read_inventory(path: Path) -> list[Device]:
    try:
        raw = read_toml(path)
    except FileNotFoundError:
        raise EdgeSlmError(f"{path}: no such inventory file") from None
    except TOMLDecodeError as exc:
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


def bench_inventory(devices: list[Device], config: dict, progress=lambda msg: None) -> tuple[list[dict], dict]:
    """All devices in parallel; returns every record and, per host that failed, why."""

    def one(device):
        try:
            return bench_remote(device, Path(device.bundle), config, progress), None
        except (EdgeSlmError, subprocess.SubprocessError, OSError) as exc:
            return [], str(exc)

    records, failures = [], {}
    with ThreadPoolExecutor(max_workers=len(devices)) as pool:
        for device, (got, error) in zip(devices, pool.map(one, devices)):
            records += got
            if error:
                failures[f"{device.host}:{device.port}"] = error
    return records, failures
