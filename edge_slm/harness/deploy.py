"""Put a bundle on a device over SSH and keep it running there.

    edge-slm deploy BUNDLE --host user@device [--port 22] [--identity KEY] [--serve [--listen HOST:PORT]]
    edge-slm deploy --host user@device --status | --stop

On the device everything lives under ~/.local/share/edge-slm/: a virtual environment (so that
Debian 12 and Raspberry Pi OS Bookworm, whose system Python is externally managed, need no
`--break-system-packages`) with the edge-slm wheel built from this checkout (the runtime set, plus
the serve extra with `--serve`) and onnxruntime pinned to a version the bundle's profile lists;
bundles under bundles/<manifest hash>/, each staged beside the others (files already on the device
hard-linked, the rest copied) and renamed into place whole, never rewritten in place; then verified
on the device by the device's own edge-slm. A smoke test runs the same probe on the device and
here (8 greedy tokens, or three texts through an encoder) and judges them by the rule of
`edge-slm verify --emulate`. With `--serve` the server runs as a systemd user service where the device
has systemd, else detached, recorded with its pid and start time; deploy waits until /health
answers from the process it started, then points `current` at the bundle and removes the previous
one. One deploy at a time per device (a lock held through an SSH session); see device_service.py.
`edge-slm bench --host` installs through the same venv.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

from edge_slm.core.bundle import MANIFEST, read_manifest, verify_bundle
from edge_slm.core.capabilities import version_tuple
from edge_slm.core.device_scripts import RECORD_CHECK, STAGE_SCRIPT
from edge_slm.core.hashing import sha256_file
from edge_slm.core.manifest import DecoderManifest, EncoderManifest, Manifest, Seq2SeqManifest
from edge_slm.harness.agreement import encoder_agreement, greedy_agreement, statistical_agreement
from edge_slm.harness.device_service import (
    HOME_DIR,
    check_port,
    device_lock,
    recorded_server,
    service_status,  # noqa: F401 (deploy's interface: --status)
    start_server,
    stop_service,
)
from edge_slm.harness.ssh import Device, RemoteError, remote_worker, ssh
from edge_slm.runtime.probe import encoder_trace, eval_trace, greedy_trace

VENV = f"{HOME_DIR}/venv"
BUNDLES = f"{HOME_DIR}/bundles"
MARKER = f"{VENV}/.edge-slm-install.json"
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


def onnxruntime_specs(manifest: Manifest) -> list[str]:
    """pip requirements for onnxruntime, newest first, from the versions the bundle's profile says
    the device runs ("1.27.0" exactly, "1.32" any 1.32.x); none listed: the newest on the index."""
    ordered = sorted(manifest.profile.runtime.onnxruntime_versions, key=version_tuple, reverse=True)
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


def ensure_venv(device: Device, manifest: Manifest, wheel: Path, serve: bool = False, progress=lambda msg: None) -> str:
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
        bad = ssh(device, f"{VENV}/bin/python -", stdin=RECORD_CHECK.encode(), timeout=120).split()
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


def _bundle_script(device: Device, action: str, **args) -> dict:
    payload = json.dumps({"action": action, "bundles": BUNDLES, **args})
    out = ssh(
        device, f"{shlex.quote(device.python)} - {shlex.quote(payload)}", stdin=STAGE_SCRIPT.encode(), timeout=900
    )
    try:
        return json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise RemoteError(f"{device.host}: the device's answer to '{action}' was not understood ({out[-120:]!r})")


def copy_bundle(
    device: Device, bundle: Path, manifest: Manifest, progress=lambda msg: None, keep_replaced: bool = False
) -> str:
    """The bundle under bundles/<manifest hash>/ on the device; returns its path relative to the
    device's home. A folder that is already whole is used as it is. Otherwise a new folder is
    staged beside it: files the device has already (same sha256, in any bundle folder) hard-linked,
    the others copied, the copies checked, then renamed into place. No file under bundles/ is ever
    written in place, so a server reading (memory-mapping) a bundle never sees it change. A damaged
    folder of the same name is renamed aside and removed by `sweep_bundles` (now, unless
    `keep_replaced`: deploy removes it once the new server is up)."""
    manifest_sha = sha256_file(bundle / MANIFEST)
    name = manifest_sha[:16]
    remote = f"{BUNDLES}/{name}"
    wanted = {name: {"sha256": info.sha256, "bytes": info.bytes} for name, info in manifest.files.items()}
    wanted[MANIFEST] = {"sha256": manifest_sha}
    token = f"{socket.gethostname()[:20]}-{os.getpid()}-{secrets.token_hex(3)}"
    staged = _bundle_script(device, "stage", name=name, files=wanted, token=token)
    if staged["present"]:
        progress(f"{device.host}: the bundle is already there (checksums match)")
        return remote
    missing = staged["missing"]
    staging = f".staging-{name}-{token}"
    if missing:
        progress(
            f"{device.host}: copying {len(missing)} of {len(wanted)} bundle files"
            + (f" ({staged['linked']} already on the device, linked)" if staged["linked"] else "")
        )
        try:
            copy(device, [bundle / n for n in missing], f"{BUNDLES}/{staging}/")
        except RemoteError:
            sweep_bundles(device, remove=(staging,))
            raise
    else:
        progress(f"{device.host}: every bundle file is on the device already ({staged['linked']} linked, none copied)")
    published = _bundle_script(device, "publish", name=name, files=wanted, token=token, copied=missing)
    if published["bad"]:
        raise RemoteError(
            f"{device.host}: {', '.join(published['bad'][:3])} differ from the manifest after copying: "
            "check the device's storage, then deploy again"
        )
    if not keep_replaced:
        sweep_bundles(device)
    return remote


def sweep_bundles(device: Device, remove: tuple[str, ...] = ()) -> None:
    """Remove bundle folders set aside by `copy_bundle` and the versioned folders named in `remove`."""
    _bundle_script(device, "sweep", name="", files={}, token="", remove=list(remove))


SMOKE_TEXTS = ("turn off the kitchen lights", "will it rain in Lisbon tomorrow", "add oat milk to the shopping list")
SMOKE_TOKENS = 8
SMOKE_EVAL_TOKENS = 256  # verify --emulate's default for reduced precisions (at most the bundle's context)


def run_probe(device: Device, venv: str, probe: str, config: dict) -> dict:
    """`edge_slm.runtime.probe.<probe>` on `config` in the device's edge-slm venv."""
    target = f"edge_slm.runtime.probe:{probe}"
    return remote_worker(device, f"{venv}/bin/python", target, config, f"{device.host}: the smoke test", timeout=600)


def translation_smoke_test(device: Device, venv: str, remote_bundle: str, bundle: Path, threads: int | None) -> dict:
    """Three greedy translations on the device against this machine's: identical for fp32; for
    int8, another CPU's kernels may change a word, so chrF against this machine >= the build gate's."""
    from edge_slm import runtime

    model = runtime.load(bundle)
    args = ["translate", remote_bundle, *SMOKE_TEXTS, "--json", "--beams", "1"]
    args += ["--threads", str(threads)] if threads else []
    out = ssh(device, f"cd && {venv}/bin/edge-slm " + " ".join(shlex.quote(a) for a in args), timeout=600)
    try:
        device_texts = [str(json.loads(line)["translation"]) for line in out.strip().splitlines()[-len(SMOKE_TEXTS) :]]
        if len(device_texts) != len(SMOKE_TEXTS):
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise RemoteError(f"{device.host}: the smoke test printed no result ({out[-120:]!r})") from None
    from sacrebleu.metrics import CHRF

    host_texts = model.translate(list(SMOKE_TEXTS), beams=1)
    same = sum(a == b for a, b in zip(host_texts, device_texts))
    chrf = CHRF().corpus_score(device_texts, [host_texts]).score
    passed = same == len(SMOKE_TEXTS) or (model.manifest.precision != "fp32" and chrf >= _min_chrf(model.manifest))
    summary = f"{same}/{len(SMOKE_TEXTS)} translations as on this machine (chrF {chrf:.1f})"
    return {"passed": bool(passed), "summary": summary}


def _min_chrf(manifest) -> float:
    """The build gate's chrF budget for the bundle's precision, from the profile it recorded
    (`[seq2seq.<precision>]`; bundles built before that table: its default)."""
    from edge_slm.core.targets import TranslationBudget

    section = manifest.profile.recorded.get("seq2seq")
    budget = section.get(manifest.precision) if isinstance(section, dict) else None
    return float((budget or {}).get("min_chrf", TranslationBudget().min_chrf))


def smoke_test(device: Device, venv: str, remote_bundle: str, bundle: Path, threads: int | None) -> dict:
    """A decoder's probes on the device and on this machine, judged by the rule `edge-slm verify
    --emulate` uses: 8 greedy tokens of a fixed question and, for a reduced precision, next-token
    statistics over the evaluation text."""
    manifest = read_manifest(bundle)
    profile = manifest.profile.as_profile()
    config = {"threads": threads, "tokens": SMOKE_TOKENS}
    remote = run_probe(device, venv, "greedy_trace", {"bundle": remote_bundle, **config})
    statistics = None
    if manifest.precision != "fp32":  # a reduced precision: its accuracy budget decides, as in verify
        config = {"threads": threads, "eval_tokens": SMOKE_EVAL_TOKENS}
        statistics = statistical_agreement(
            eval_trace(str(bundle), **config),
            run_probe(device, venv, "eval_trace", {"bundle": remote_bundle, **config}),
        )
    host = greedy_trace(str(bundle), threads=threads, tokens=SMOKE_TOKENS)
    verdict = greedy_agreement(host, remote, profile, manifest.precision, statistics)
    return {
        **{k: verdict[k] for k in ("passed", "tokens_agreeing", "tokens", "text")},
        "summary": (
            f"{verdict['summary']}; {remote.get('decode_tokens_per_s') or 0:.1f} tok/s, "
            f"peak RSS {remote.get('peak_rss_mb') or 0:.0f} MB on the device"
        ),
        "decode_tokens_per_s": remote.get("decode_tokens_per_s"),
        "peak_rss_mb": remote.get("peak_rss_mb"),
    }


def encoder_smoke_test(device: Device, venv: str, remote_bundle: str, bundle: Path, threads: int | None) -> dict:
    """An encoder's labels or vectors for three texts on the device and here, against the
    profile's encoder gate (the rule `verify --emulate` uses)."""
    config = {"threads": threads, "texts": list(SMOKE_TEXTS)}
    remote = run_probe(device, venv, "encoder_trace", {"bundle": remote_bundle, **config})
    verdict = encoder_agreement(
        encoder_trace(str(bundle), **config), remote, read_manifest(bundle).profile.as_profile()
    )
    return {"passed": verdict["passed"], "summary": verdict["summary"]}


def switch_server(
    device: Device, venv: str, remote_bundle: str, listen: str, threads: int | None, progress=lambda msg: None
) -> str:
    """Replace the server deploy started (if any) by one serving `remote_bundle`: the port checked
    first (the old server keeps serving meanwhile), the old one stopped, the new one started and
    waited for; `current` points at the new bundle only once it is up, and the old bundle's folder
    goes only then. When the new one does not come up, the old one is started again."""
    check_port(device, listen)
    previous = recorded_server(device)
    if previous:
        progress(f"{device.host}: switching the server from ~/{previous['bundle']} to ~/{remote_bundle}")
    stop_service(device, quiet=True)
    try:
        how = start_server(device, venv, remote_bundle, listen, threads, progress)
    except RemoteError as exc:
        if not previous:
            raise
        try:
            start_server(device, venv, previous["bundle"], previous["listen"], previous.get("threads"), progress)
        except RemoteError as again:
            raise RemoteError(f"{exc}; starting the previous server again failed too: {again}") from None
        raise RemoteError(f"{exc}; the previous server (~/{previous['bundle']}) serves again") from None
    _point_current_at(device, remote_bundle)
    old = previous["bundle"].rpartition("/")[2] if previous else ""
    if old != remote_bundle.rpartition("/")[2] and re.fullmatch(r"[0-9a-f]{16}", old):
        sweep_bundles(device, remove=(old,))
    return how


def _point_current_at(device: Device, remote_bundle: str) -> None:
    """~/.local/share/edge-slm/current -> the bundle being served (see `STAGE_SCRIPT`)."""
    _bundle_script(device, "current", name=remote_bundle.rpartition("/")[2], files={}, token="")


# The bundle's manifest type -> its smoke test on the device; a new family adds its entry.
SMOKE_TESTS = {
    DecoderManifest: smoke_test,
    EncoderManifest: encoder_smoke_test,
    Seq2SeqManifest: translation_smoke_test,
}


def deploy(
    device: Device,
    bundle: Path,
    serve: bool = False,
    listen: str = "127.0.0.1:8080",
    threads: int | None = None,
    progress=lambda msg: None,
) -> dict:
    """The whole path: wheel, venv, bundle, smoke test, and with `serve` the running service; one
    deploy at a time per device (`device_lock`)."""
    manifest = verify_bundle(bundle)
    with device_lock(device, f"deploy of {bundle.name}"):
        if serve:
            check_python(device)
            check_port(device, listen)  # before minutes of work; checked again just before the switch
        with checkout_wheel(progress) as wheel:
            venv = ensure_venv(device, manifest, wheel, serve=serve, progress=progress)
        remote_bundle = copy_bundle(device, bundle, manifest, progress, keep_replaced=True)
        progress(f"{device.host}: verifying every checksum on the device")
        ssh(device, f"cd && {venv}/bin/edge-slm inspect {remote_bundle} > /dev/null", timeout=600)
        smoke = SMOKE_TESTS[type(manifest)](device, venv, remote_bundle, bundle, threads)
        if not smoke["passed"]:
            raise RemoteError(f"{device.host}: the smoke test failed: {smoke['summary']}")
        result = {"host": device.host, "bundle": f"~/{remote_bundle}", "venv": f"~/{venv}", "smoke": smoke}
        if serve:
            result["service"] = switch_server(device, venv, remote_bundle, listen, threads, progress)
            result["listen"] = listen
        sweep_bundles(device)
    return result
