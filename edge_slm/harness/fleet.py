"""Deploy to a fleet of devices described by an Ansible inventory, through the `edge_slm` role
shipped in harness/ansible/ (ansible-core and ansible-runner, the `fleet` extra).

    edge-slm deploy [BUNDLE] --inventory inventory.yml [--limit PATTERN] [--serial N|P%] [--serve]
    edge-slm deploy --inventory inventory.yml --status | --stop
    python -m edge_slm.harness.fleet prepare --out DIR BUNDLE...     # deploy.yml's first play
    python -m edge_slm.harness.fleet smoke-check REFERENCE < device output

The control machine's part happens here, before any device is touched: every bundle is verified
(a damaged one is refused), the edge-slm wheel of this checkout is built once, onnxruntime's
versions are read from each bundle's profile, and the smoke test's reference output is computed
with the bundle on this machine. The role does the rest host by host (see its tasks/main.yml);
this module then turns Ansible's events into a recap and one line per failed host.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_slm.core.bundle import MANIFEST, verify_bundle
from edge_slm.core.errors import EdgeSlmError
from edge_slm.core.hashing import sha256_file
from edge_slm.core.manifest import DecoderManifest, EncoderManifest, Manifest
from edge_slm.harness import deploy as single

ANSIBLE_DIR = Path(__file__).resolve().parent / "ansible"
DEPLOY_PLAYBOOK = ANSIBLE_DIR / "deploy.yml"
SERVICE_PLAYBOOK = ANSIBLE_DIR / "service.yml"
BENCH_PLAYBOOK = ANSIBLE_DIR / "bench.yml"
SMOKE_PROMPT = "The capital of France is"
SMOKE_TOKENS = 8


# -- the control machine's part ---------------------------------------------------------------------
def smoke_reference(bundle: Path, manifest: Manifest) -> dict:
    """What the device must print for the smoke test, computed here with the same bundle: the same
    checks as `edge-slm deploy --host` (deploy.smoke_test and encoder_smoke_test), which run the
    device side themselves over SSH; here Ansible runs it, so the reference is kept as data."""
    from edge_slm import runtime

    model = runtime.load(bundle)
    if isinstance(manifest, DecoderManifest):
        host = model.generate(SMOKE_PROMPT, max_new_tokens=SMOKE_TOKENS, temperature=0.0)
        ties = [False] * len(host.token_ids)
        if manifest.precision != "fp32":
            logp = model.logprobs(host.prompt_token_ids + host.token_ids)[len(host.prompt_token_ids) - 1 :]
            top = np.sort(logp, axis=-1)[:, -2:]
            ties = [bool(t[1] - t[0] < single.NEAR_TIE_NATS) for t in top[: len(ties)]]
        return {
            "command": "generate",
            "args": [SMOKE_PROMPT, "-n", str(SMOKE_TOKENS), "--temperature", "0", "--json"],
            "reference": {"kind": "tokens", "token_ids": host.token_ids, "near_ties": ties},
        }
    if isinstance(manifest, EncoderManifest):
        texts = list(single.SMOKE_TEXTS)
        if model.task == "classification":
            labels = [r.label for r in model.classify(texts)]
            return {
                "command": "classify",
                "args": [*texts, "--json"],
                "reference": {"kind": "labels", "labels": labels},
            }
        vectors = model.embed(texts).tolist()
        return {"command": "embed", "args": texts, "reference": {"kind": "vectors", "vectors": vectors}}
    raise EdgeSlmError(f"{bundle}: deploy has no smoke test for a {type(manifest).__name__} bundle")


def smoke_verdict(reference: dict, output: str) -> tuple[bool, str]:
    """Compare the device's output of the smoke command with the reference: greedy tokens identical
    (for a quantized bundle, up to the first place where this machine's top two logits are nearly
    tied), the same labels, or embeddings with a cosine of at least deploy.MIN_SMOKE_COSINE."""
    lines = [line for line in output.strip().splitlines() if line.strip()]
    try:
        if reference["kind"] == "tokens":
            device = json.loads(lines[-1])
            ids, want = [int(t) for t in device["token_ids"]], reference["token_ids"]
            agree = next((n for n, (a, b) in enumerate(zip(want, ids)) if a != b), min(len(want), len(ids)))
            passed = ids == want or (agree < len(want) and reference["near_ties"][agree])
            return passed, (
                f"{agree}/{len(want)} greedy tokens as on this machine ({device.get('text', '')!r}), "
                f"{device.get('decode_tokens_per_s') or 0:.1f} tok/s on the device"
            )
        rows = [json.loads(line) for line in lines[-len(single.SMOKE_TEXTS) :]]
        if len(rows) != len(single.SMOKE_TEXTS):
            raise ValueError
        if reference["kind"] == "labels":
            labels = [str(r["label"]) for r in rows]
            agree = sum(a == b for a, b in zip(reference["labels"], labels))
            return agree == len(labels), f"{agree}/{len(labels)} labels as on this machine ({', '.join(labels)})"
        got, want = np.array(rows, dtype=np.float64), np.array(reference["vectors"], dtype=np.float64)
        if got.shape != want.shape:
            return False, f"the device returned vectors of shape {got.shape}, this machine {want.shape}"
        cosine = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
        return bool(
            cosine.min() >= single.MIN_SMOKE_COSINE
        ), f"embeddings' cosine to this machine's >= {cosine.min():.4f}"
    except (ValueError, KeyError, IndexError, TypeError):
        return False, f"the smoke test printed no result ({output[-120:]!r})"


def prepare(bundles: list[str], out: Path, progress=lambda msg: None) -> dict:
    """Everything the role needs from this machine, keyed by each bundle path as the inventory
    writes it; written to `out` (the wheel, the smoke references) and returned."""
    checked = {}
    for given in dict.fromkeys(bundles):
        path = Path(given).expanduser().resolve()
        checked[given] = (path, verify_bundle(path))  # a damaged bundle stops everything here
    out.mkdir(parents=True, exist_ok=True)
    prepared = {"bundles": {}}
    for given, (path, manifest) in checked.items():
        name = sha256_file(path / MANIFEST)[:16]
        smoke = smoke_reference(path, manifest)
        reference = out / f"smoke-{name}.json"
        reference.write_text(json.dumps(smoke.pop("reference")))
        files = {n: {"sha256": info.sha256, "bytes": info.bytes} for n, info in manifest.files.items()}
        files[MANIFEST] = {"sha256": sha256_file(path / MANIFEST)}
        prepared["bundles"][given] = {
            "path": str(path),
            "name": name,
            "files": files,
            "onnxruntime": single.onnxruntime_specs(manifest),
            "target": manifest.profile.name,
            "smoke": {**smoke, "reference": str(reference)},
        }
    with single.checkout_wheel(progress) as wheel:
        kept = out / wheel.name
        shutil.copyfile(wheel, kept.with_suffix(".part"))
        os.replace(kept.with_suffix(".part"), kept)
    prepared["wheel"] = str(kept)
    prepared["wheel_digest"] = single.wheel_digest(kept)
    return prepared


def inventory_bundles(inventory: Path) -> dict[str, str | None]:
    """Each host of the inventory and its `edge_slm_bundle` (None where it names none)."""
    proc = subprocess.run(
        [_ansible_bin("ansible-inventory"), "-i", str(inventory), "--list"], capture_output=True, text=True
    )
    if proc.returncode:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        raise EdgeSlmError(f"{inventory}: Ansible cannot read this inventory ({tail}): check its YAML or INI")
    data = json.loads(proc.stdout)
    hostvars = data.get("_meta", {}).get("hostvars", {})
    hosts = set(hostvars)
    for group in data.values():
        if isinstance(group, dict):
            hosts.update(group.get("hosts", []))
    if not hosts:
        raise EdgeSlmError(f"{inventory}: no hosts in this inventory")
    return {h: hostvars.get(h, {}).get("edge_slm_bundle") for h in sorted(hosts)}


# -- running Ansible ---------------------------------------------------------------------------------
@dataclass
class FleetRun:
    recap: dict[str, dict[str, int]] = field(default_factory=dict)  # host -> ok, changed, ...
    failures: dict[str, str] = field(default_factory=dict)  # host -> "task: reason"
    messages: dict[str, str] = field(default_factory=dict)  # host -> what a "Report it" task said
    rc: int = 0

    def recap_lines(self) -> list[str]:
        keys = ("ok", "changed", "unreachable", "failed", "skipped", "rescued", "ignored")
        width = max((len(h) for h in self.recap), default=0)
        return [f"{h:<{width}} : " + " ".join(f"{k}={c[k]}" for k in keys) for h, c in sorted(self.recap.items())]


def _ansible_bin(name: str) -> str:
    """The Ansible command installed beside this Python (the venv's), else the one on PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise EdgeSlmError(f"{name} is not installed: pip install 'edge-slm[fleet]' on this machine")
    return found


def _reason(event: str, res: dict) -> str:
    """One line from an Ansible result: the role's own message, else the command's last error line."""
    text = str(res.get("msg") or "").strip().removeprefix("Task failed: ")
    if event == "runner_on_unreachable":
        if "Permission denied" in text:
            return f"authentication refused: {text.splitlines()[-1]}"
        return f"unreachable: {text.splitlines()[-1] if text else 'no answer'}"
    for key in ("stderr", "module_stderr", "stdout"):
        lines = str(res.get(key) or "").strip().splitlines()
        if lines and (not text or text.startswith(("non-zero return code", "MODULE FAILURE"))):
            text = lines[-1]
            break
    return " ".join(text.split()) or "failed"


def run_playbook(
    playbook: Path, inventory: Path, extravars: dict, limit: str | None = None, forks: int = 5
) -> FleetRun:
    """The playbook through ansible-runner; Ansible's output is replaced by the recap and reasons."""
    from edge_slm.commands.extras import require_extra

    require_extra("fleet", "deploy --inventory")
    import ansible_runner

    result = FleetRun()

    def on_event(event: dict) -> bool:
        data, kind = event.get("event_data", {}), event.get("event", "")
        host, res = data.get("host"), data.get("res") or {}
        if kind in ("runner_on_failed", "runner_on_unreachable") and not data.get("ignore_errors"):
            result.failures[host] = f"{data.get('task', '?')}: {_reason(kind, res)}"
        elif kind == "runner_on_ok" and data.get("task") == "Report it":
            result.messages[host] = str(res.get("msg", "")).strip()
        return True

    with tempfile.TemporaryDirectory(prefix="edge-slm-ansible-") as private:
        run = ansible_runner.run(
            private_data_dir=private,
            playbook=str(playbook),
            inventory=str(Path(inventory).resolve()),
            extravars=extravars,
            limit=limit,
            forks=forks,
            quiet=True,
            event_handler=on_event,
            # ansible-runner finds ansible-playbook on PATH: the one installed beside this Python first.
            envvars={
                "ANSIBLE_NOCOLOR": "1",
                "ANSIBLE_RETRY_FILES_ENABLED": "0",
                "PATH": f"{Path(_ansible_bin('ansible-playbook')).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            },
        )
        stats = run.stats or {}
        for key, name in (
            ("ok", "ok"),
            ("changed", "changed"),
            ("dark", "unreachable"),
            ("failures", "failed"),
            ("skipped", "skipped"),
            ("rescued", "rescued"),
            ("ignored", "ignored"),
        ):
            for host, count in (stats.get(key) or {}).items():
                result.recap.setdefault(
                    host, dict.fromkeys(("ok", "changed", "unreachable", "failed", "skipped", "rescued", "ignored"), 0)
                )
                result.recap[host][name] = count
        result.rc = run.rc
        failed = {h for h, c in result.recap.items() if c["failed"] or c["unreachable"]}
        result.failures = {h: why for h, why in result.failures.items() if h in failed}
        if run.rc and not result.failures and not result.recap:
            tail = (run.stdout.read().strip().splitlines() or ["no output"])[-1]
            result.failures["ansible-playbook"] = tail
    return result


def deploy_fleet(
    inventory: Path,
    bundle: Path | None = None,
    serve: bool = False,
    limit: str | None = None,
    serial: str | None = None,
    max_fail_percentage: int | None = None,
    forks: int = 5,
    progress=lambda msg: None,
    overrides: dict | None = None,
) -> FleetRun:
    """Verify the bundles and prepare on this machine, then run deploy.yml over the inventory."""
    hosts = inventory_bundles(inventory)
    if bundle is not None:
        bundles = [str(bundle)]
    else:
        missing = [h for h, b in hosts.items() if not b]
        if missing:
            raise EdgeSlmError(
                f"{inventory}: {', '.join(missing[:3])} name no edge_slm_bundle: set it in the inventory "
                "or give a BUNDLE for every host"
            )
        bundles = [b for b in hosts.values() if b]
    with tempfile.TemporaryDirectory(prefix="edge-slm-fleet-") as work:
        prepared = prepare(bundles, Path(work), progress)
        extravars = {"edge_slm_prepared": prepared, "edge_slm_serve": serve, **(overrides or {})}
        if bundle is not None:
            extravars["edge_slm_bundle"] = str(bundle)
        if serial:
            extravars["edge_slm_serial"] = serial
        if max_fail_percentage is not None:
            extravars["edge_slm_max_fail_percentage"] = max_fail_percentage
        progress(f"running the edge_slm role on {len(hosts)} host(s) of {inventory}")
        return run_playbook(DEPLOY_PLAYBOOK, inventory, extravars, limit, forks)


def bench_fleet(
    inventory: Path,
    bench_args: list[str],
    limit: str | None = None,
    forks: int = 5,
    progress=lambda msg: None,
) -> tuple[FleetRun, dict[tuple[str, str], list[dict]]]:
    """`edge-slm bench` on every host through bench.yml; returns the run and, per (target, host),
    the records it brought back, each checked (a host whose reply is not valid records fails)."""
    from edge_slm.runtime.bench import record_problem

    hosts = inventory_bundles(inventory)
    missing = [h for h, b in hosts.items() if not b]
    if missing:
        raise EdgeSlmError(f"{inventory}: {', '.join(missing[:3])} name no edge_slm_bundle: set it in the inventory")
    with tempfile.TemporaryDirectory(prefix="edge-slm-fleet-") as work:
        prepared = prepare([b for b in hosts.values() if b], Path(work) / "prepared", progress)
        results = Path(work) / "results"
        extravars = {
            "edge_slm_prepared": prepared,
            "edge_slm_bench_args": bench_args,
            "edge_slm_results_dir": str(results),
        }
        progress(f"benchmarking on {len(hosts)} host(s) of {inventory}")
        run = run_playbook(BENCH_PLAYBOOK, inventory, extravars, limit, forks)
        found = {}
        for path in sorted(results.glob("*/*.jsonl")):
            records = []
            for number, line in enumerate(path.read_text().splitlines(), 1):
                try:
                    record = json.loads(line) if line.strip() else None
                except ValueError:
                    record, problem = None, "not JSON"
                else:
                    problem = record_problem(record) if record is not None else None
                if problem:
                    run.failures[path.stem] = f"its benchmark's line {number} is not a valid record: {problem}"
                    records = []
                    break
                if record is not None:
                    record["remote"] = {"host": path.stem, "inventory": str(inventory)}
                    records.append(record)
            if records:
                found[(path.parent.name, path.stem)] = records
    return run, found


def service_fleet(inventory: Path, action: str, limit: str | None = None, forks: int = 5) -> FleetRun:
    """`status` or `stop` of the server deploy started, on every host of the inventory."""
    inventory_bundles(inventory)  # one line for an inventory Ansible cannot read
    return run_playbook(SERVICE_PLAYBOOK, inventory, {"edge_slm_action": action}, limit, forks)


def _main(argv: list[str]) -> int:
    """The two steps deploy.yml runs on the control machine (see the module docstring)."""
    if argv[:1] == ["prepare"] and len(argv) >= 4 and argv[1] == "--out":
        try:
            prepared = prepare(argv[3:], Path(argv[2]).expanduser(), lambda m: print(m, file=sys.stderr))
        except EdgeSlmError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(json.dumps(prepared))
        return 0
    if argv[:1] == ["smoke-check"] and len(argv) == 2:
        passed, summary = smoke_verdict(json.loads(Path(argv[1]).read_text()), sys.stdin.read())
        print(f"smoke test: {summary}", file=sys.stdout if passed else sys.stderr)
        if not passed:
            print(f"the smoke test failed: {summary}", file=sys.stderr)
        return 0 if passed else 1
    print(__doc__.split("\n\n")[1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
