"""What this CPU can do, against what a bundle's profile was built for: one warning, once."""

from __future__ import annotations

import logging
import platform

from edge_slm.core.manifest import DeviceRecord, ProfileRecord
from edge_slm.core.system import cpu_flags

log = logging.getLogger("edge_slm.runtime")
_NOT_CPU_FLAGS = {"neon", "cuda"}  # neon is "asimd" in /proc/cpuinfo; cuda is a GPU
_warned: set[str] = set()


def missing_features(device: DeviceRecord, machine: str | None = None, flags: set[str] | None = None) -> list[str]:
    """What the bundle's device section expects that this CPU lacks (arch first)."""
    machine = machine or platform.machine()
    arch = {"arm64": "aarch64", "AMD64": "x86_64"}.get(machine, machine)
    if device.arch and device.arch != arch:
        return [f"arch {device.arch} (this is {arch})"]
    flags = cpu_flags() if flags is None else flags
    if not flags:
        return []  # no /proc/cpuinfo (macOS, Windows): nothing to say
    return [f for f in device.features if f not in _NOT_CPU_FLAGS and f not in flags]


def warn_if_mismatched(profile: ProfileRecord, machine: str | None = None, flags: set[str] | None = None) -> list[str]:
    missing = missing_features(profile.device, machine, flags)
    key = profile.name + ",".join(missing)
    if missing and key not in _warned:
        _warned.add(key)
        if missing[0].startswith("arch "):
            what = f"this machine is not {missing[0][5:]}"
        else:
            what = f"this CPU lacks {', '.join(missing)}"
        hint = " (an rpi5 bundle on a Pi 4: build for rpi4)" if "asimddp" in missing else ""
        log.warning(
            "this bundle was built for %s, but %s: it will run, slower than planned%s; "
            "build one for this device with `edge-slm build --target <its profile>`",
            profile.name or "another device",
            what,
            hint,
        )
    return missing
