"""This machine, as the runtime and the benchmark records see it: peak memory, CPU model and
flags, operating system. Stdlib only, so that it runs on every device."""

from __future__ import annotations

import os
import platform
import resource
import sys
from pathlib import Path

# The instruction sets whose presence changes which int8 / fp16 kernels onnxruntime runs.
FLAGS_OF_INTEREST = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx_vnni",
    "amx_int8",
    "neon",
    "asimd",
    "asimddp",
    "i8mm",
    "fphp",
    "asimdhp",
    "sve",
)


def _status_mb(field: str) -> float | None:
    """A memory line of /proc/self/status (kB) in MB; None where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far: the kernel's high-water mark (VmHWM) where
    /proc exists, else getrusage (Linux reports kB, macOS bytes)."""
    peak = _status_mb("VmHWM")
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def current_rss_mb() -> float:
    """Resident memory of this process now (VmRSS); 0 where /proc is missing."""
    return _status_mb("VmRSS") or 0.0


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """Every flag /proc/cpuinfo lists (x86 `flags`, ARM `Features`); empty where there is none."""
    flags: set[str] = set()
    for line in (_cpuinfo() if cpuinfo is None else cpuinfo).splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags |= set(value.split())
    return flags


def cpu_model(cpuinfo: str | None = None) -> str:
    for line in (_cpuinfo() if cpuinfo is None else cpuinfo).splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "CPU part") and value.strip():
            return value.strip()
    return platform.processor() or ""


def machine() -> dict:
    """What a benchmark record says about where it ran."""
    return {
        "os": f"{platform.system()} {platform.release()}",
        "arch": platform.machine(),
        "python": platform.python_version(),
        "cores": os.cpu_count(),
        "cpu": cpu_model(),
        "flags": sorted(cpu_flags() & set(FLAGS_OF_INTEREST)),
    }
