"""Run a bundle on an emulated Raspberry Pi CPU and compare it with this machine.

    edge-slm verify BUNDLE --emulate cortex-a72|cortex-a76 [--onnxruntime 1.27.0] [--tokens 8]
    make verify-rpi4 | verify-rpi5

Prepares, once, an aarch64 sysroot (Debian's arm64 Python 3.11 unpacked from its .deb files, and
PyPI's aarch64 wheels of onnxruntime, numpy, tokenizers, jinja2, click), cached in
~/.cache/edge-slm/aarch64/<recipe hash>/ and rebuilt when the recipe changes. Then runs the
torch-free runtime's probes (`edge_slm.runtime.probe`) on the bundle under `qemu-aarch64-static
-cpu <cpu>` through the worker protocol, and judges them against the host's by the rule deploy's
smoke test uses (`edge_slm.harness.agreement`, tolerances from the bundle's profile).
Needs Debian's qemu-user-static, apt-get (arm64 packages) and pip.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from edge_slm.core.atomic import atomic_directory
from edge_slm.core.bundle import read_manifest
from edge_slm.core.cache import cache_root
from edge_slm.core.capabilities import version_tuple
from edge_slm.core.errors import EdgeSlmError
from edge_slm.core.worker import run_worker
from edge_slm.harness.agreement import encoder_agreement, greedy_agreement, statistical_agreement
from edge_slm.runtime.probe import encoder_trace, eval_trace, greedy_trace

CPUS = {"cortex-a72": "Raspberry Pi 4", "cortex-a76": "Raspberry Pi 5"}
DEBS = [
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "libc6",
    "libstdc++6",
    "libgcc-s1",
    "zlib1g",
    "libexpat1",
    "libffi8",
    "libssl3",
    "libbz2-1.0",
    "liblzma5",
    "libuuid1",
    "libcrypt1",
]
WHEELS = ["numpy==2.2.6", "tokenizers==0.22.2", "jinja2==3.1.6", "markupsafe==3.0.2", "click==8.1.8"]
PLATFORMS = [
    "manylinux_2_28_aarch64",
    "manylinux_2_27_aarch64",
    "manylinux_2_17_aarch64",
    "manylinux2014_aarch64",
    "any",
]


class SetupError(EdgeSlmError):
    """The emulator or its sysroot cannot be prepared here."""


def _run(cmd: list[str], what: str, fix: str, **kw) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    except FileNotFoundError:
        raise SetupError(f"{what}: `{cmd[0]}` is not installed; {fix}") from None
    if proc.returncode:
        tail = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise SetupError(f"{what} failed: {tail}; {fix}")
    return proc


def prepare_sysroot(onnxruntime: str, progress=lambda msg: None) -> Path:
    recipe = json.dumps({"debs": DEBS, "wheels": WHEELS + [f"onnxruntime=={onnxruntime}"], "python": "3.11"})
    root = cache_root() / "aarch64" / hashlib.sha256(recipe.encode()).hexdigest()[:16]
    if (root / "ready").is_file():
        return root
    if not shutil.which("qemu-aarch64-static"):
        raise SetupError("qemu-aarch64-static is not installed: `apt-get install qemu-user-static` (Debian/Ubuntu)")
    progress(f"preparing the aarch64 sysroot (once) in {root}")
    with atomic_directory(root) as tmp:  # our cache: an unfinished sysroot is replaced whole
        _fill_sysroot(tmp, onnxruntime, recipe)
    return root


def _fill_sysroot(tmp: Path, onnxruntime: str, recipe: str) -> None:
    (tmp / "debs").mkdir(parents=True)
    arches = subprocess.run(["dpkg", "--print-foreign-architectures"], capture_output=True, text=True).stdout.split()
    if "arm64" not in arches:
        _run(
            ["dpkg", "--add-architecture", "arm64"],
            "adding the arm64 architecture",
            "run as root, or run `dpkg --add-architecture arm64 && apt-get update` yourself",
        )
        _run(["apt-get", "update", "-qq"], "apt-get update", "check that the Debian mirrors are reachable")
    _run(
        ["apt-get", "download", *[f"{d}:arm64" for d in DEBS]],
        "downloading Debian's arm64 Python",
        "run `apt-get update` (as root) and retry",
        cwd=tmp / "debs",
    )
    for deb in (tmp / "debs").glob("*.deb"):
        _run(["dpkg", "-x", str(deb), str(tmp / "root")], f"unpacking {deb.name}", "check the download")
    wheels = tmp / "wheels"
    for spec in WHEELS + [f"onnxruntime=={onnxruntime}"]:
        platform_args = [a for p in PLATFORMS for a in ("--platform", p)]
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--only-binary=:all:",
                *platform_args,
                "--python-version",
                "3.11",
                "--implementation",
                "cp",
                "--abi",
                "cp311",
                "--abi",
                "abi3",
                "--abi",
                "none",
                "-d",
                str(wheels),
                spec,
            ],
            f"downloading the aarch64 wheel of {spec}",
            "check that PyPI has an aarch64 wheel of that version",
        )
    for wheel in wheels.glob("*.whl"):
        import zipfile

        zipfile.ZipFile(wheel).extractall(tmp / "site")
    shutil.rmtree(tmp / "debs")
    (tmp / "ready").write_text(recipe)


def verify_encoder(bundle: Path, cpu: str, onnxruntime: str | None, threads: int, progress) -> dict:
    manifest = read_manifest(bundle)
    versions = manifest.profile.runtime.onnxruntime_versions or ("1.27.0",)
    onnxruntime = onnxruntime or max(versions, key=version_tuple)
    root = prepare_sysroot(onnxruntime, progress)
    progress("host: the shipped texts through the encoder")
    host = encoder_trace(str(bundle), threads)
    progress(f"emulated {cpu} ({CPUS[cpu]}), onnxruntime {onnxruntime} aarch64: the same texts (slow: minutes)")
    started = time.perf_counter()
    arm = _emulated(root, cpu, "encoder_trace", {"bundle": str(Path(bundle).resolve()), "threads": threads})
    result = encoder_agreement(host, arm, manifest.profile.as_profile())
    return result | {
        "family": manifest.family,
        "texts": host["texts"],
        "cpu": cpu,
        "device": CPUS[cpu],
        "onnxruntime": arm["onnxruntime"],
        "host_onnxruntime": host["onnxruntime"],
        "emulated_seconds": time.perf_counter() - started,
    }


def _emulated(root: Path, cpu: str, probe: str, config: dict) -> dict:
    """`edge_slm.runtime.probe.<probe>` on `config` in the sysroot's aarch64 Python under qemu."""
    env = {
        "QEMU_LD_PREFIX": str(root / "root"),
        "PYTHONPATH": f"{root / 'site'}:{Path(__file__).resolve().parents[2]}",
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", "/tmp"),
    }
    return run_worker(
        f"edge_slm.runtime.probe:{probe}",
        config,
        python=str(root / "root" / "usr" / "bin" / "python3.11"),
        prefix_cmd=["qemu-aarch64-static", "-cpu", cpu],
        env=env,
        what=f"the bundle under emulated {cpu}",
    )


def verify(
    bundle: Path,
    cpu: str,
    onnxruntime: str | None = None,
    tokens: int = 8,
    threads: int = 2,
    progress=lambda msg: None,
    eval_tokens: int = 0,
) -> dict:
    """Greedy tokens and logits on the emulated CPU against the host; with `eval_tokens`, also
    next-token agreement and perplexity over that much of the evaluation text: ARM's int8 kernels
    round differently from x86's, so where the host itself is nearly tied a greedy token may flip;
    they must agree with the host at least as well as the profile's budget asks the precision to
    agree with fp32."""
    if cpu not in CPUS:
        raise EdgeSlmError(f"--emulate {cpu!r}: choose one of {', '.join(CPUS)}")
    manifest = read_manifest(bundle)
    versions = manifest.profile.runtime.onnxruntime_versions or ("1.27.0",)
    onnxruntime = onnxruntime or max(versions, key=version_tuple)
    root = prepare_sysroot(onnxruntime, progress)
    profile = manifest.profile.as_profile()
    progress(f"host: {tokens} greedy tokens")
    host = greedy_trace(str(bundle), tokens, threads)
    progress(f"emulated {cpu} ({CPUS[cpu]}), onnxruntime {onnxruntime} aarch64: {tokens} greedy tokens (slow: minutes)")
    started = time.perf_counter()
    config = {"bundle": str(Path(bundle).resolve()), "threads": threads}
    try:
        arm = _emulated(root, cpu, "greedy_trace", {**config, "tokens": tokens})
    except EdgeSlmError as exc:
        raise EdgeSlmError(f"{exc} (onnxruntime {onnxruntime})") from None
    wall = time.perf_counter() - started
    stats = None
    if eval_tokens:
        progress(f"next-token statistics over {eval_tokens} tokens of the evaluation text, host and emulated")
        stats = statistical_agreement(
            eval_trace(str(bundle), eval_tokens, threads),
            _emulated(root, cpu, "eval_trace", {**config, "eval_tokens": eval_tokens}),
        )
    result = greedy_agreement(host, arm, profile, manifest.precision, stats)
    return result | {
        "cpu": cpu,
        "device": CPUS[cpu],
        "onnxruntime": arm["onnxruntime"],
        "host_onnxruntime": host["onnxruntime"],
        "emulated_seconds": wall,
        "emulated_first_token_s": arm["first_token_s"],
        "emulated_peak_rss_mb": arm.get("peak_rss_mb"),
        "host_peak_rss_mb": host.get("peak_rss_mb"),
    }
