"""Put a bundle on a device over SSH and keep it running there.

    edge-slm deploy BUNDLE --host user@device [--port 22] [--identity KEY] [--serve [--listen HOST:PORT]]
    edge-slm deploy --host user@device --status | --stop

On the device everything lives under ~/.local/share/edge-slm/: a virtual environment (so that
Debian 12 and Raspberry Pi OS Bookworm, whose system Python is externally managed, need no
`--break-system-packages`) with the edge-slm wheel built from this checkout (the runtime set, plus
the serve extra with `--serve`) and onnxruntime pinned to a version the bundle's profile lists;
bundles under bundles/<manifest hash>/, copied file by file only where the sha256 differs and then
verified on the device by the device's own edge-slm. A smoke test runs the same probe on the
device and here (8 greedy tokens, or three texts through an encoder) and judges them by the rule of
`edge-slm verify --emulate`. With `--serve` the server runs as a systemd user service where the
device has systemd, else detached with a pid file and a log; either way deploy waits for /health.
`edge-slm bench --host` installs through the same venv.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

from edge_slm.core.bundle import MANIFEST, read_manifest, verify_bundle
from edge_slm.core.capabilities import version_tuple
from edge_slm.core.hashing import sha256_file
from edge_slm.core.targets import profile_from_dict
from edge_slm.harness.agreement import encoder_agreement, greedy_agreement, statistical_agreement
from edge_slm.harness.ssh import Device, RemoteError, remote_worker, ssh
from edge_slm.runtime.probe import encoder_trace, eval_trace, greedy_trace

HOME_DIR = ".local/share/edge-slm"
VENV = f"{HOME_DIR}/venv"
BUNDLES = f"{HOME_DIR}/bundles"
MARKER = f"{VENV}/.edge-slm-install.json"
SERVICE = "edge-slm"
_CHECKOUT = Path(__file__).resolve().parents[2]
WHEEL_SOURCES = ("pyproject.toml", "README.md", "edge_slm", "targets")  # what the wheel is built from


def build_wheel(progress=lambda msg: None) -> Path:
    """The edge-slm wheel of this checkout (pure Python, a second or two), in a temporary folder."""
    if not (_CHECKOUT / "pyproject.toml").is_file():
        raise RemoteError(
            "deploy installs the wheel of an edge-slm checkout, and this edge-slm is not one: "
            "run it from a clone of the repository"
        )
    out = Path(tempfile.mkdtemp(prefix="edge-slm-wheel-"))
    progress("building the edge-slm wheel of this checkout")
    # Built from a copy of the sources: setuptools writes build/ and *.egg-info into the folder it
    # builds, which must not be the user's checkout (nor shared by two builds at once).
    source = out / "source"
    for name in WHEEL_SOURCES:
        if (_CHECKOUT / name).is_dir():
            shutil.copytree(_CHECKOUT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            source.mkdir(parents=True, exist_ok=True)
            shutil.copy2(_CHECKOUT / name, source / name)
    try:
        for isolation in (["--no-build-isolation"], []):
            proc = subprocess.run(
                [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, str(source), "-w", str(out)],
                capture_output=True,
                text=True,
            )
            wheels = list(out.glob("edge_slm-*.whl"))
            if proc.returncode == 0 and wheels:
                return wheels[0]
    finally:
        shutil.rmtree(source, ignore_errors=True)
    raise RemoteError(f"building the edge-slm wheel failed: {proc.stderr.strip()[-300:]}")


@contextmanager
def checkout_wheel(progress=lambda msg: None):
    """`build_wheel()` for the length of a `with` block; its temporary folder is removed after."""
    wheel = build_wheel(progress)
    try:
        yield wheel
    finally:
        shutil.rmtree(wheel.parent, ignore_errors=True)


def wheel_digest(wheel: Path) -> str:
    """A digest of the wheel's files and their contents, not of the zip (whose timestamps change
    with every build), so that an unchanged checkout is not installed again."""
    digest = hashlib.sha256()
    with zipfile.ZipFile(wheel) as archive:
        for name in sorted(archive.namelist()):
            digest.update(name.encode() + b"\0" + hashlib.sha256(archive.read(name)).digest())
    return digest.hexdigest()


def onnxruntime_specs(manifest: dict) -> list[str]:
    """pip requirements for onnxruntime, newest first, from the versions the bundle's profile says
    the device runs ("1.27.0" exactly, "1.32" any 1.32.x); none listed: the newest on the index."""
    versions = manifest["profile"]["runtime"].get("onnxruntime_versions") or []
    ordered = sorted((v for v in versions if isinstance(v, str)), key=version_tuple, reverse=True)
    specs = [f"onnxruntime=={v}" if v.count(".") >= 2 else f"onnxruntime=={v}.*" for v in ordered]
    return specs or ["onnxruntime"]


def check_python(device: Device) -> str:
    """The device's Python version, if it is 3.10+ with venv; else one line saying what to install."""
    py = shlex.quote(device.python)
    probe = (
        "import sys, platform; ok = sys.version_info >= (3, 10)\n"
        "try:\n import venv, ensurepip\n has_venv = True\nexcept ImportError:\n has_venv = False\n"
        "print(platform.python_version(), platform.machine(), ok, has_venv)"
    )
    try:
        out = ssh(device, f"{py} -", stdin=probe.encode(), timeout=60).split()
    except RemoteError as exc:
        if "ssh failed" in str(exc):
            raise
        raise RemoteError(
            f"{device.host}: no usable Python 3.10+ at '{device.python}' "
            "(install python3 there or pass --remote-python PATH)"
        ) from None
    if len(out) != 4 or out[2] != "True":
        raise RemoteError(
            f"{device.host}: Python {out[0] if out else '?'} at '{device.python}' is older than 3.10: "
            "install python3.10 or newer there, or pass --remote-python PATH"
        )
    if out[3] != "True":
        raise RemoteError(
            f"{device.host}: Python there has no venv module: `sudo apt install python3-venv` "
            "(Debian, Raspberry Pi OS), then deploy again"
        )
    return f"{out[0]} {out[1]}"


# Checks every installed edge_slm file against the sha256 pip recorded from the wheel.
_RECORD_CHECK = """
import base64, hashlib, pathlib, sys, importlib.metadata as md
dist = md.distribution("edge-slm")
bad = []
for f in dist.files or []:
    if f.hash is None or f.hash.mode != "sha256":
        continue
    path = pathlib.Path(f.locate())
    digest = base64.urlsafe_b64encode(hashlib.sha256(path.read_bytes()).digest()).rstrip(b"=").decode() \\
        if path.is_file() else None
    if digest != f.hash.value:
        bad.append(str(f))
print(len(bad), " ".join(bad[:3]))
"""


def ensure_venv(device: Device, manifest: dict, wheel: Path, serve: bool = False, progress=lambda msg: None) -> str:
    """The device's edge-slm venv with this wheel, the runtime set (and serve extra) and a pinned
    onnxruntime; reinstalls only what changed, repairs files that differ from the wheel."""
    version = check_python(device)
    specs = onnxruntime_specs(manifest)
    want = {"wheel": wheel_digest(wheel), "serve": serve, "onnxruntime": specs, "python": f"{device.python} {version}"}
    state = ssh(device, f"cat {MARKER} 2>/dev/null || true", timeout=60).strip()
    try:
        have = json.loads(state) if state else {}
    except ValueError:
        have = {}
    same = all(have.get(k) == want[k] for k in ("wheel", "onnxruntime", "python"))
    if same and (have.get("serve") or not serve):
        bad = ssh(device, f"{VENV}/bin/python -", stdin=_RECORD_CHECK.encode(), timeout=120).split()
        if bad and bad[0] == "0":
            progress(f"{device.host}: edge-slm {have.get('installed', '')} is installed (every file verified)")
            return VENV
        progress(
            f"{device.host}: {bad[0] if bad else 'some'} installed edge-slm files differ from the wheel: reinstalling"
        )
        ssh(device, f"rm -f {MARKER}", timeout=60)
    progress(f"{device.host}: installing edge-slm into ~/{VENV} (Python {version})")
    # The venv is ours: made again whole when another Python made it.
    fresh = "" if have.get("python") == want["python"] else f"rm -rf {VENV} && "
    make = f"{fresh}(test -x {VENV}/bin/python || {shlex.quote(device.python)} -m venv {VENV})"
    ssh(device, f"mkdir -p {HOME_DIR}/wheels && {make}", timeout=300)
    remote_wheel = f"{HOME_DIR}/wheels/{wheel.name}"
    copy(device, [wheel], f"{HOME_DIR}/wheels/")
    target = f"{remote_wheel}[serve]" if serve else remote_wheel
    errors = []
    for spec in specs:
        try:
            ssh(
                device,
                f"{VENV}/bin/pip install -q --disable-pip-version-check --force-reinstall --no-deps "
                f"{shlex.quote(remote_wheel)} && {VENV}/bin/pip install -q --disable-pip-version-check "
                f"{shlex.quote(target)} {shlex.quote(spec)}",
                timeout=1800,
            )
            break
        except RemoteError as exc:
            errors.append(f"{spec}: {str(exc).split(': ', 2)[-1][:160]}")
    else:
        raise RemoteError(
            f"{device.host}: no onnxruntime the profile lists installs for Python {version} "
            f"({'; '.join(errors)}): build for a profile that lists a version with a wheel for it"
        )
    installed = ssh(device, f"{VENV}/bin/python -c 'import onnxruntime; print(onnxruntime.__version__)'").strip()
    marker = json.dumps({**want, "installed": f"with onnxruntime {installed}"})
    ssh(device, f"cat > {MARKER}", stdin=marker.encode(), timeout=60)
    progress(f"{device.host}: installed edge-slm with onnxruntime {installed}")
    return VENV


def copy(device: Device, files: list[Path], remote_dir: str) -> None:
    """scp the files into `remote_dir` on the device; devices without the SFTP subsystem (which
    scp uses by default since OpenSSH 9) get the legacy protocol (-O)."""
    for legacy in ([], ["-O"]):
        proc = subprocess.run(
            [
                "scp",
                "-q",
                *legacy,
                *device.ssh_args(),
                "-P",
                str(device.port),
                "--",
                *map(str, files),
                f"{device.destination_scp}:{remote_dir}",
            ],
            capture_output=True,
            text=True,
        )
        if proc.returncode == 0:
            return
    raise RemoteError(f"{device.host}: copying failed: {proc.stderr.strip()[-300:]}")


def copy_bundle(device: Device, bundle: Path, manifest: dict, progress=lambda msg: None) -> str:
    """The bundle under bundles/<manifest hash>/ on the device, copying only files whose sha256
    differs there; returns its path relative to the device's home."""
    manifest_sha = sha256_file(bundle / MANIFEST)
    remote = f"{BUNDLES}/{manifest_sha[:16]}"
    listing = ssh(device, f"mkdir -p {remote} && cd {remote} && (sha256sum -- * 2>/dev/null || true)")
    present = {line.split()[1]: line.split()[0] for line in listing.splitlines() if len(line.split()) == 2}
    wanted = dict(manifest["files"], **{MANIFEST: {"sha256": manifest_sha}})
    missing = [name for name, info in wanted.items() if present.get(name) != info["sha256"]]
    if missing:
        progress(f"{device.host}: copying {len(missing)} of {len(wanted)} bundle files")
        copy(device, [bundle / name for name in missing], f"{remote}/")
    else:
        progress(f"{device.host}: the bundle is already there (checksums match)")
    return remote


SMOKE_TEXTS = ("turn off the kitchen lights", "will it rain in Lisbon tomorrow", "add oat milk to the shopping list")
SMOKE_TOKENS = 8
SMOKE_EVAL_TOKENS = 256  # verify --emulate's default for reduced precisions (at most the bundle's context)


def run_probe(device: Device, venv: str, probe: str, config: dict) -> dict:
    """`edge_slm.runtime.probe.<probe>` on `config` in the device's edge-slm venv."""
    target = f"edge_slm.runtime.probe:{probe}"
    return remote_worker(device, f"{venv}/bin/python", target, config, f"{device.host}: the smoke test", timeout=600)


def smoke_test(device: Device, venv: str, remote_bundle: str, bundle: Path, threads: int | None) -> dict:
    """The same probes on the device and on this machine, judged by the rule `edge-slm verify
    --emulate` uses: 8 greedy tokens of a fixed question (and, for a reduced precision, next-token
    statistics over the evaluation text) for a decoder, three texts' labels or vectors for an encoder."""
    manifest = read_manifest(bundle)
    profile = profile_from_dict(manifest["profile"])
    if manifest.get("family") == "encoder":
        config = {"threads": threads, "texts": list(SMOKE_TEXTS)}
        remote = run_probe(device, venv, "encoder_trace", {"bundle": remote_bundle, **config})
        verdict = encoder_agreement(encoder_trace(str(bundle), **config), remote, profile)
        return {"passed": verdict["passed"], "summary": verdict["summary"]}
    config = {"threads": threads, "tokens": SMOKE_TOKENS}
    remote = run_probe(device, venv, "greedy_trace", {"bundle": remote_bundle, **config})
    statistics = None
    if manifest["precision"] != "fp32":  # a reduced precision: its accuracy budget decides, as in verify
        config = {"threads": threads, "eval_tokens": SMOKE_EVAL_TOKENS}
        statistics = statistical_agreement(
            eval_trace(str(bundle), **config),
            run_probe(device, venv, "eval_trace", {"bundle": remote_bundle, **config}),
        )
    host = greedy_trace(str(bundle), threads=threads, tokens=SMOKE_TOKENS)
    verdict = greedy_agreement(host, remote, profile, manifest["precision"], statistics)
    return {
        **{k: verdict[k] for k in ("passed", "tokens_agreeing", "tokens", "text")},
        "summary": (
            f"{verdict['summary']}; {remote.get('decode_tokens_per_s') or 0:.1f} tok/s, "
            f"peak RSS {remote.get('peak_rss_mb') or 0:.0f} MB on the device"
        ),
        "decode_tokens_per_s": remote.get("decode_tokens_per_s"),
        "peak_rss_mb": remote.get("peak_rss_mb"),
    }


def _has_systemd(device: Device) -> bool:
    try:
        ssh(device, "command -v systemctl >/dev/null && systemctl --user show-environment >/dev/null 2>&1", timeout=60)
        return True
    except RemoteError:
        return False


def start_service(
    device: Device, venv: str, remote_bundle: str, listen: str, threads: int | None, progress=lambda msg: None
) -> str:
    """Start `edge-slm serve` on the device and wait for /health; returns how it runs."""
    host, _, port = listen.rpartition(":")
    serve = [f"$HOME/{venv}/bin/edge-slm", "serve", f"$HOME/{remote_bundle}", "--host", host, "--port", port]
    serve += ["--threads", str(threads)] if threads else []
    stop_service(device, quiet=True)
    if _has_systemd(device):
        unit = (
            f"[Unit]\nDescription=edge-slm serve ({remote_bundle})\nAfter=network-online.target\n\n"
            f"[Service]\nExecStart={' '.join(serve).replace('$HOME', '%h')}\nRestart=on-failure\nRestartSec=3\n\n"
            "[Install]\nWantedBy=default.target\n"
        )
        ssh(
            device,
            f"mkdir -p .config/systemd/user && cat > .config/systemd/user/{SERVICE}.service",
            stdin=unit.encode(),
        )
        ssh(
            device,
            f'(loginctl enable-linger "$USER" 2>/dev/null || true) && systemctl --user daemon-reload && '
            f"systemctl --user enable --now {SERVICE}.service",
            timeout=120,
        )
        how = f"a systemd user service ({SERVICE}.service, restarted on failure, started at boot)"
    else:
        ssh(
            device,
            # Only the server goes to the background, every stream redirected: ssh returns at once.
            f"cd || exit 1; nohup {' '.join(serve)} > {HOME_DIR}/serve.log 2>&1 < /dev/null & "
            f"echo $! > {HOME_DIR}/serve.pid",
            timeout=60,
        )
        how = f"detached (no systemd user session there): pid in ~/{HOME_DIR}/serve.pid, log in ~/{HOME_DIR}/serve.log"
    progress(f"{device.host}: started the server as {how}; waiting for /health")
    probe = (
        f"import time, urllib.request\nfor _ in range(240):\n try:\n"
        f"  urllib.request.urlopen('http://127.0.0.1:{port}/health', timeout=2).read(); print('ok'); break\n"
        f" except Exception:\n  time.sleep(0.5)\nelse:\n print('timeout')\n"
    )
    if ssh(device, f"{venv}/bin/python -", stdin=probe.encode(), timeout=180).strip() != "ok":
        tail = ssh(device, f"tail -n 3 {HOME_DIR}/serve.log 2>/dev/null || true").strip().replace("\n", " | ")
        raise RemoteError(f"{device.host}: the server did not answer /health within two minutes ({tail})")
    return how


def service_status(device: Device) -> str:
    script = (
        f"if systemctl --user is-active {SERVICE}.service >/dev/null 2>&1; then echo systemd active; "
        f"elif [ -f {HOME_DIR}/serve.pid ] && kill -0 $(cat {HOME_DIR}/serve.pid) 2>/dev/null; then "
        f"echo detached pid $(cat {HOME_DIR}/serve.pid); else echo stopped; fi"
    )
    return ssh(device, script, timeout=60).strip()


def stop_service(device: Device, quiet: bool = False) -> str:
    """Stop the server deploy started and wait until it has exited (SIGTERM, then SIGKILL after
    15 s), so "stopped" means the port is free; only a process whose command line is edge-slm
    serve is signalled, so a reused pid is never another program."""
    script = (
        f"(systemctl --user disable --now {SERVICE}.service >/dev/null 2>&1 || true); "
        f"if [ -f {HOME_DIR}/serve.pid ]; then pid=$(cat {HOME_DIR}/serve.pid); "
        f"if tr '\\0' ' ' < /proc/$pid/cmdline 2>/dev/null | grep -q 'edge-slm serve'; then kill $pid; "
        # An exited process that nobody reaped has an empty command line: that counts as gone.
        "for _ in $(seq 150); do [ -s /proc/$pid/cmdline ] || break; sleep 0.1; done; "
        "kill -9 $pid 2>/dev/null; fi; "
        f"rm -f {HOME_DIR}/serve.pid; fi; echo stopped"
    )
    return ssh(device, script, timeout=60).strip()


def deploy(
    device: Device,
    bundle: Path,
    serve: bool = False,
    listen: str = "127.0.0.1:8080",
    threads: int | None = None,
    progress=lambda msg: None,
) -> dict:
    """The whole path: wheel, venv, bundle, smoke test, and with `serve` the running service."""
    manifest = verify_bundle(bundle)
    with checkout_wheel(progress) as wheel:
        venv = ensure_venv(device, manifest, wheel, serve=serve, progress=progress)
    remote_bundle = copy_bundle(device, bundle, manifest, progress)
    progress(f"{device.host}: verifying every checksum on the device")
    ssh(device, f"cd && {venv}/bin/edge-slm inspect {remote_bundle} > /dev/null", timeout=600)
    smoke = smoke_test(device, venv, remote_bundle, bundle, threads)
    if not smoke["passed"]:
        raise RemoteError(f"{device.host}: the smoke test failed: {smoke['summary']}")
    result = {"host": device.host, "bundle": f"~/{remote_bundle}", "venv": f"~/{venv}", "smoke": smoke}
    if serve:
        result["service"] = start_service(device, venv, remote_bundle, listen, threads, progress)
        result["listen"] = listen
    return result
