"""Pruned encoder bundles against the unpruned ones (fp32 and int8) and against the fastest encoder
peer, in ONE run on the same texts and thread count: each round runs every bundle of a set and the
peer, each measurement in a fresh process (edge-slm's bench worker: warm-up, repetitions, mean and
spread), the order rotating from round to round; every speed is a ratio against the unpruned int8
bundle measured in the same round (the build machine is shared: the ratios hold better than the
absolute numbers).

    nice -n 5 .venv/bin/python benchmarks/encoder_pruning.py \\
        --classifier export/x86-laptop-classifier-fp32,export/x86-laptop-classifier,export/x86-laptop-classifier-pruned \\
        --embedder export/x86-laptop-embedder-fp32,export/x86-laptop-embedder,export/x86-laptop-embedder-pruned \\
        --name x86-vm

The peer is optimum's onnxruntime model (ORTModelForSequenceClassification for the classifier,
ORTModelForFeatureExtraction with mean pooling for the embedder) quantized by optimum's own dynamic
int8 quantizer for this CPU (AVX512-VNNI when it has it, else AVX2): the fastest peer of
`benchmarks/encoder_peers.py` (benchmarks/results/encoders/), exported from the same local model
folder the unpruned bundle was built from (no hub).

Accuracy, on data the models never trained on: a classifier's test accuracy on the shipped intents
test split, an embedder's retrieval top-1 on the shipped retrieval check (and the pruned
embedder's cosine to the unpruned fp32 bundle). Writes, under --out-dir: NAME.jsonl (records of the
bench schema with `bundle.base_model` / `bundle.pruned`: `edge-slm report` puts them side by
side), NAME.md (the summary tables with the machine and its CPU flags) and NAME.png (accuracy
against texts per second at batch 32, a point per bundle).

With `--interleaved N`, one more fresh process loads the fp32, int8 and pruned bundles of a set
(and any `--variant SET:LABEL=PATH`, another pruning of the same model) together and takes turns:
N rounds of, per bundle, a block of one-text calls and a pass over the texts at batch 32, the order
rotating from round to round, so that every ratio compares measurements about a second apart. A
shared host's slow spells then hit both sides of a ratio; across the separate processes above they
move ratios of one round by tens of percent. Written to NAME-interleaved.json (with the bundles and
their manifests' hashes) and tabled in NAME.md (median ratio and its quartiles).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

from edge_slm.core.atomic import atomic_file
from edge_slm.core.errors import EdgeSlmError
from edge_slm.core.worker import run_worker

REPO = Path(__file__).resolve().parent.parent  # the peer's worker imports benchmarks.encoder_pruning from here
ROLES = ("fp32", "int8", "pruned", "peer")
PEER = "optimum (onnxruntime int8)"


def prepare_peer(model_dir: Path, task: str, cache: Path) -> tuple[Path, str]:
    """optimum's export of the model folder and its own dynamic int8 quantization, made once
    (keyed by the folder's weights); the quantizer configuration named for the record."""
    from edge_slm.core.system import cpu_flags

    config_name = "avx512_vnni" if "avx512_vnni" in cpu_flags() else "avx2"
    weights = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("*.bin"))
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in weights)).hexdigest()[:16]
    out = cache / f"{task}-{digest}-{config_name}"
    if (out / "ready").is_file():
        return out, config_name
    from optimum.onnxruntime import ORTModelForFeatureExtraction, ORTModelForSequenceClassification, ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig
    from transformers import AutoTokenizer

    kind = ORTModelForSequenceClassification if task == "classification" else ORTModelForFeatureExtraction
    exported = out.with_name(out.name + "-fp32")
    kind.from_pretrained(str(model_dir), export=True).save_pretrained(str(exported))
    config = getattr(AutoQuantizationConfig, config_name)(is_static=False, per_channel=True)
    ORTQuantizer.from_pretrained(str(exported)).quantize(config, str(out))
    AutoTokenizer.from_pretrained(str(model_dir)).save_pretrained(str(out))
    (out / "ready").write_text("ok\n")
    return out, config_name


def peer_worker(**cfg) -> dict:
    """The peer timed by edge-slm's own timing functions (text in, logits or normalized vector out)."""
    import numpy as np
    import onnxruntime as ort
    from optimum.onnxruntime import ORTModelForFeatureExtraction, ORTModelForSequenceClassification
    from transformers import AutoTokenizer

    from edge_slm.runtime.bench_encoder import encoder_timings, peak_rss_mb

    start = time.perf_counter()
    options = ort.SessionOptions()
    options.intra_op_num_threads = cfg["threads"]
    directory = cfg["path"]
    file_name = sorted(p.name for p in Path(directory).glob("*.onnx"))[0]
    classify = cfg["task"] == "classification"
    kind = ORTModelForSequenceClassification if classify else ORTModelForFeatureExtraction
    model = kind.from_pretrained(directory, file_name=file_name, session_options=options)
    tokenizer = AutoTokenizer.from_pretrained(directory)

    def encode(texts, batch):
        rows = []
        for first in range(0, len(texts), batch):
            inputs = tokenizer(
                texts[first : first + batch], padding=True, truncation=True, max_length=256, return_tensors="np"
            )
            output = model(**inputs)
            if classify:
                rows.append(output.logits)
                continue
            mask = inputs["attention_mask"][..., None].astype(np.float32)
            pooled = (output.last_hidden_state * mask).sum(1) / mask.sum(1)
            rows.append(pooled / np.linalg.norm(pooled, axis=1, keepdims=True))
        return np.concatenate(rows)

    load_s = time.perf_counter() - start
    timings = encoder_timings(encode, lambda text: len(tokenizer(text).input_ids), cfg["repetitions"], cfg["warmup"])
    check = encode(cfg["check_texts"], 32)
    return {"load_s": load_s, **timings, "peak_rss_mb": peak_rss_mb(), "check": np.asarray(check).tolist()}


def bundle_quality(bundle: str, reference: str | None, threads: int) -> dict:
    """Test accuracy (classifier) or retrieval top-1, and cosine to `reference` (embedder)."""
    from edge_slm import runtime
    from edge_slm.core.labelled import INTENTS_TEST, read_examples, read_retrieval
    from edge_slm.runtime.bench_encoder import encoder_accuracy
    from edge_slm.runtime.encoder_eval import unit

    measured = dict(encoder_accuracy(Path(bundle), threads) or {})
    model = runtime.load(bundle, threads=threads, verify=False)
    if model.task == "embedding" and reference:
        check = read_retrieval()
        texts = check.queries + check.passages + [e.text for e in read_examples(INTENTS_TEST)]
        theirs = runtime.load(reference, threads=threads, verify=False).embed(texts)
        measured["cosine_to_unpruned_fp32"] = float((unit(model.embed(texts)) * unit(theirs)).sum(1).mean())
    return {k: v for k, v in measured.items() if isinstance(v, (int, float, str))}


def check_texts(task: str) -> list[str]:
    from edge_slm.core.labelled import INTENTS_TEST, read_examples, read_retrieval

    if task == "classification":
        return [e.text for e in read_examples(INTENTS_TEST)]
    check = read_retrieval()
    return check.queries + check.passages


def peer_quality(task: str, output, labels: list[str]) -> dict:
    """The peer's accuracy from its outputs on `check_texts(task)`, as edge-slm's evaluation measures it."""
    import numpy as np

    from edge_slm.core.labelled import INTENTS_TEST, read_examples, read_retrieval
    from edge_slm.runtime.encoder_eval import best_passages

    output = np.asarray(output, dtype=np.float32)
    if task == "classification":
        truth = [e.label for e in read_examples(INTENTS_TEST)]
        got = [labels[i] for i in output.argmax(1)]
        return {"task": task, "examples": len(truth), "accuracy": float(np.mean([a == b for a, b in zip(got, truth)]))}
    n = len(read_retrieval().queries)
    top = best_passages(output[:n], output[n:])[:, 0]
    return {"task": task, "queries": n, "recall_at_1": float((top == np.arange(n)).mean())}


def interleaved_worker(bundles: dict, threads: int, rounds: int, block: int) -> dict:
    """Every bundle of `bundles` (role -> path) loaded in this one process and timed in turn, round
    after round: seconds per one-text call (a block of `block` calls of the 16-token text) and per
    pass over the benchmark texts at batch 32."""
    from edge_slm import runtime
    from edge_slm.runtime.bench_encoder import text_of_tokens, throughput_texts, timed

    models = {role: runtime.load(path, threads=threads, verify=False) for role, path in bundles.items()}
    calls = {role: (m.embed if m.task == "embedding" else m.classify) for role, m in models.items()}
    first = next(iter(models.values())).graph
    text, texts = text_of_tokens(lambda t: first.token_counts([t])[0], 16), throughput_texts()

    def one_text(call) -> tuple[float, float]:
        """The block's mean seconds per call, and its median call: a shared host's hiccups (the
        same milliseconds whichever bundle they hit) weigh on the mean, pulling every ratio
        toward 1; the median is the p50 latency `edge-slm bench` reports."""
        seconds = timed(lambda: call([text], batch_size=1), block, warmup=0)
        return sum(seconds) / block, statistics.median(seconds)

    def batch32(call) -> float:
        start = time.perf_counter()
        call(texts, batch_size=32)
        return time.perf_counter() - start

    for call in calls.values():  # warm-up: onnxruntime's first runs allocate and tune
        one_text(call), batch32(call)
    roles, measured = list(calls), []
    for number in range(rounds):
        order = roles[number % len(roles) :] + roles[: number % len(roles)]  # no bundle always follows the same one
        this_round = {}
        for role in order:
            mean, median = one_text(calls[role])
            this_round[role] = {"one_text_s": mean, "one_text_p50_s": median, "batch32_s": batch32(calls[role])}
        measured.append({role: this_round[role] for role in roles})
    return {
        "rounds": measured,
        "texts": len(texts),
        "block": block,
        "threads": threads,
        "bundles": {
            role: {"path": str(path), "manifest_sha256": _manifest_hash(path)} for role, path in bundles.items()
        },
        "onnxruntime": _onnxruntime_version(),
    }


def _manifest_hash(bundle) -> str:
    from edge_slm.core.hashing import sha256_file

    return sha256_file(Path(bundle) / "manifest.json")


def _onnxruntime_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def interleaved_table(measured: dict) -> list[str]:
    """Median ratio to the unpruned int8 bundle over the rounds, with its quartiles: texts/s at
    batch 32, one text's mean time over its block and (in files that have it) its median call."""
    first = next(iter(measured.values()))["rounds"][0]
    keys = ["batch32_s", "one_text_s", *(["one_text_p50_s"] if "one_text_p50_s" in first["int8"] else [])]
    header = [
        "b32 vs unpruned int8",
        "one text (block mean) vs unpruned int8",
        "one text (median call) vs unpruned int8",
    ]
    lines = [
        f"Interleaved in one process ({len(next(iter(measured.values()))['rounds'])} rounds, each a block of "
        "one-text calls and a pass at batch 32 per bundle, in turn): ratio to the unpruned int8 bundle of the "
        "same round, median (quartiles).",
        "",
        "| set | bundle | " + " | ".join(header[: len(keys)]) + " |",
        "|---|---|" + "---|" * len(keys),
    ]
    for name, result in measured.items():
        for role in result["rounds"][0]:
            cells = []
            for key in keys:
                ratios = [r["int8"][key] / r[role][key] for r in result["rounds"]]
                # inclusive: the quartiles stay within the measured ratios, however few the rounds
                q1, median, q3 = (
                    statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
                )
                cells.append(f"{median:.2f}x ({q1:.2f}-{q3:.2f})")
            label = {"fp32": "unpruned fp32", "int8": "unpruned int8", "pruned": "pruned int8"}.get(role, role)
            lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classifier", help="FP32,INT8,PRUNED_INT8 bundles of the classifier")
    parser.add_argument("--embedder", help="FP32,INT8,PRUNED_INT8 bundles of the embedder")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-peer", action="store_true", help="Leave the peer out.")
    parser.add_argument(
        "--interleaved", type=int, default=0, metavar="N", help="Also N interleaved rounds in one process (0: none)."
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="SET:LABEL=PATH",
        help="Another pruned bundle of SET (classifier or embedder), timed only in the interleaved process.",
    )
    parser.add_argument("--peer-cache", default=str(Path.home() / ".cache/edge-slm/peers/encoder-pruning"))
    parser.add_argument("--out-dir", default=str(REPO / "benchmarks/results/encoder-pruning"))
    parser.add_argument(
        "--name", required=True, help="File names under --out-dir: NAME.jsonl, NAME.md, NAME.png, NAME-interleaved.json"
    )
    parser.add_argument("--summarize", action="store_true", help="Only remake NAME.md and NAME.png from NAME.jsonl.")
    args = parser.parse_args()
    if args.summarize:
        summarize(Path(args.out_dir) / f"{args.name}.jsonl", args)
        return

    from edge_slm import runtime
    from edge_slm.runtime.bench import BundleInfo
    from edge_slm.runtime.bench_encoder import encoder_record

    sets = {}
    for name in ("classifier", "embedder"):
        if getattr(args, name):
            paths = getattr(args, name).split(",")
            if len(paths) != 3:
                sys.exit(f"--{name}: give three bundles, FP32,INT8,PRUNED_INT8 (got {len(paths)})")
            sets[name] = dict(zip(ROLES, paths))
    if not sets:
        sys.exit("give --classifier and/or --embedder bundles")
    variants: dict = {}
    for given in args.variant:
        name, _, rest = given.partition(":")
        label, _, path = rest.partition("=")
        if name not in sets or not label or not path or label in ROLES:
            sys.exit(f"--variant {given}: give SET:LABEL=PATH with SET one of {', '.join(sets)} and a new LABEL")
        variants.setdefault(name, {})[label] = path
    if variants and args.interleaved <= 0:
        sys.exit("--variant bundles are timed only in the interleaved process: give --interleaved N too")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records_path = out_dir / f"{args.name}.jsonl"
    if args.interleaved <= 0 and _interleaved_path(records_path).is_file():
        sys.exit(
            f"{_interleaved_path(records_path)}: from an earlier run of this NAME; remove it, or give --interleaved N"
        )

    infos, quality, peers = {}, {}, {}
    for name, bundles in sets.items():
        for role in ("fp32", "int8", "pruned"):
            manifest = runtime.load(bundles[role], verify=False).manifest
            infos[(name, role)] = BundleInfo.of(Path(bundles[role]), manifest, None)
            reference = bundles["fp32"] if role == "pruned" else None
            quality[(name, role)] = bundle_quality(bundles[role], reference, args.threads)
            print(f"{name} {role}: {quality[(name, role)]}", file=sys.stderr)
        unpruned = runtime.load(bundles["int8"], verify=False)
        if not args.no_peer:
            source = Path(unpruned.manifest.source.details["path"])
            path, config_name = prepare_peer(source, unpruned.task, Path(args.peer_cache))
            base = infos[(name, "int8")]
            infos[(name, "peer")] = BundleInfo(
                path=str(path),
                manifest_sha256=None,
                target=base.target,
                precision="int8",
                graph=f"optimum-{config_name}",
                size_bytes=sum(p.stat().st_size for p in path.glob("*.onnx")),
                parameters=base.parameters,
                family="encoder",
                base_model=base.base_model,
            )
            peers[name] = {"path": str(path), "task": unpruned.task, "labels": list(getattr(unpruned, "labels", []))}

    speed: dict = {}
    roles = [r for r in ROLES if r != "peer" or not args.no_peer]
    for round_number in range(args.rounds):
        order = roles[round_number % len(roles) :] + roles[: round_number % len(roles)]  # rotating: no fixed slot
        for name, bundles in sets.items():
            for role in order:
                cfg = {"threads": args.threads, "repetitions": args.repetitions, "warmup": args.warmup}
                try:
                    if role == "peer":
                        peer = peers[name]
                        cfg |= {"path": peer["path"], "task": peer["task"], "check_texts": check_texts(peer["task"])}
                        env = {**os.environ, "PYTHONPATH": str(REPO)}
                        raw = run_worker("benchmarks.encoder_pruning:peer_worker", cfg, env=env, what=PEER)
                        quality[(name, role)] = peer_quality(peer["task"], raw.pop("check"), peer["labels"])
                    else:
                        cfg["bundle"] = bundles[role]
                        raw = run_worker("edge_slm.runtime.bench_encoder:measure_encoder", cfg, what=bundles[role])
                except EdgeSlmError as exc:
                    sys.exit(str(exc))
                extra = {**quality[(name, role)], "set": name, "role": role, "round": round_number + 1}
                system = PEER if role == "peer" else "edge-slm"
                record = encoder_record(
                    infos[(name, role)], args.threads, args.repetitions, args.warmup, raw, extra, system=system
                )
                with open(records_path, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(record) + "\n")
                speed.setdefault((name, role), []).append(raw)
                print(
                    f"round {round_number + 1} {name} {role}: b32 {raw['texts_per_s_b32']['mean']:.0f} texts/s, "
                    f"b1@16 {raw['latency_ms_16']['p50']:.2f} ms",
                    file=sys.stderr,
                )
    if args.interleaved > 0:
        measured = {}
        for name, bundles in sets.items():
            cfg = {
                "bundles": {**{role: bundles[role] for role in ("fp32", "int8", "pruned")}, **variants.get(name, {})},
                "threads": args.threads,
                "rounds": args.interleaved,
                "block": 50,
            }
            print(f"{name}: {args.interleaved} interleaved rounds in one process", file=sys.stderr)
            try:
                measured[name] = run_worker(
                    "benchmarks.encoder_pruning:interleaved_worker",
                    cfg,
                    env={**os.environ, "PYTHONPATH": str(REPO)},
                    what="the interleaved measurement",
                )
            except EdgeSlmError as exc:
                sys.exit(str(exc))
        with atomic_file(_interleaved_path(records_path)) as tmp:
            Path(tmp).write_text(json.dumps(measured, indent=1) + "\n", encoding="utf-8")
    summarize(records_path, args)


def _interleaved_path(records_path: Path) -> Path:
    return records_path.with_name(f"{records_path.stem}-interleaved.json")


def summarize(records_path: Path, args) -> None:
    """NAME.md and NAME.png from the records of NAME.jsonl (what a run wrote: `--summarize` redoes
    them without measuring again)."""
    from edge_slm.runtime.bench import BundleInfo

    records = [json.loads(line) for line in records_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    sets, speed, quality, infos = {}, {}, {}, {}
    for r in records:
        name, role = r["accuracy"]["set"], r["accuracy"]["role"]
        sets.setdefault(name, {})[role] = r["bundle"]["path"]
        speed.setdefault((name, role), []).append(r["results"])
        quality[(name, role)] = {k: v for k, v in r["accuracy"].items() if k not in ("set", "role", "round")}
        infos[(name, role)] = BundleInfo(**r["bundle"])
    roles = [role for role in ROLES if any((name, role) in speed for name in sets)]
    args.rounds = max(r["accuracy"]["round"] for r in records)
    args.threads, args.warmup = records[-1]["settings"]["threads"], records[-1]["settings"]["warmup"]
    args.repetitions = records[-1]["settings"]["repetitions"]
    text = markdown(sets, roles, speed, quality, infos, args, records[-1])
    interleaved = _interleaved_path(records_path)
    if interleaved.is_file():
        measured = json.loads(interleaved.read_text("utf-8"))
        # Only a file of the same bundles: one left from an earlier run of NAME is not this run's.
        stale = [
            name
            for name, result in measured.items()
            if "bundles" in result
            and any(
                result["bundles"].get(role, {}).get("path") != path
                for role, path in sets.get(name, {}).items()
                if role != "peer"
            )
        ]
        if stale:
            sys.exit(
                f"{interleaved}: measured other bundles than {records_path.name} for {', '.join(stale)}; remove it or rerun"
            )
        text += "\n" + "\n".join(interleaved_table(measured))
    (records_path.with_suffix(".md")).write_text(text, encoding="utf-8")
    plot(sets, roles, speed, quality, records_path.with_suffix(".png"))
    print(text)


def _spread(values: list[float], digits: int) -> str:
    spread = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.{digits}f}{spread}"


def _ratios(values: list[float]) -> str:
    # The median too: a slow spell under the baseline of one round lifts the mean of the ratios
    # more than a slow spell under the other bundle lowers it.
    return (
        f"{statistics.mean(values):.2f}x ({min(values):.2f}-{max(values):.2f}; median {statistics.median(values):.2f}x)"
    )


def _score(quality: dict) -> float | None:
    return quality.get("accuracy", quality.get("recall_at_1"))


def markdown(sets, roles, speed, quality, infos, args, last_record) -> str:
    """One table per set: each bundle's speed (mean over rounds ± their spread), its ratios to the
    unpruned int8 bundle of the same round (mean, min-max, median), its accuracy and the points against fp32."""
    machine = last_record["machine"]
    lines = [
        f"Measured by `benchmarks/encoder_pruning.py` on {last_record['host']}: {machine['cpu']} "
        f"({machine['arch']}, {machine['cores']} cores, flags {' '.join(machine['flags'])}), {args.threads} threads, "
        f"{args.rounds} rounds rotating the order, each measurement a fresh process ({args.warmup} warm-up + "
        f"{args.repetitions} runs); onnxruntime {last_record['versions'].get('onnxruntime')}.",
        "",
    ]
    for name in sets:
        base = speed[(name, "int8")]
        reference = _score(quality[(name, "fp32")])
        kind = "test accuracy" if "accuracy" in quality[(name, "fp32")] else "retrieval top-1"
        lines += [
            f"### {name}",
            "",
            f"| bundle | removed | params (M) | texts/s b32 | one text @16 ms p50 | b32 vs unpruned int8 "
            f"| one text vs unpruned int8 | {kind} | vs unpruned fp32 (points) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for role in roles:
            runs, info = speed[(name, role)], infos[(name, role)]
            b32 = [m["texts_per_s_b32"]["mean"] / b["texts_per_s_b32"]["mean"] for b, m in zip(base, runs)]
            b1 = [b["latency_ms_16"]["p50"] / m["latency_ms_16"]["p50"] for b, m in zip(base, runs)]
            score = _score(quality[(name, role)])
            pruned = info.pruned or {}
            removed = "-"
            if pruned:
                ffn = pruned.get("ffn_channels") or {}
                removed = (
                    f"layers {','.join(map(str, pruned['removed_layers']))}, {pruned['removed_heads']} heads, "
                    f"FFN {ffn.get('before')}->{ffn.get('after')}"
                )
            extra = quality[(name, role)].get("cosine_to_unpruned_fp32")
            label = {"fp32": "unpruned fp32", "int8": "unpruned int8", "pruned": "pruned int8", "peer": PEER}[role]
            lines.append(
                f"| {label} | {removed} | {info.parameters / 1e6:.1f} "
                f"| {_spread([r['texts_per_s_b32']['mean'] for r in runs], 0)} "
                f"| {_spread([r['latency_ms_16']['p50'] for r in runs], 2)} | {_ratios(b32)} | {_ratios(b1)} "
                f"| {'-' if score is None else f'{100 * score:.1f}%'}"
                f"{f' (cosine to fp32 {extra:.4f})' if extra is not None else ''} "
                f"| {'-' if score is None or reference is None else f'{100 * (score - reference):+.1f}'} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(sets, roles, speed, quality, path: Path) -> None:
    """Accuracy against texts per second at batch 32 (mean over rounds ± spread), one panel per set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"fp32": "#3b7dd8", "int8": "#1b4f9c", "pruned": "#d8643b", "peer": "#999999"}
    fig, axes = plt.subplots(1, len(sets), figsize=(6 * len(sets), 4.4), squeeze=False)
    for ax, name in zip(axes[0], sets):
        for role in roles:
            score = _score(quality[(name, role)])
            if score is None:
                continue
            rates = [r["texts_per_s_b32"]["mean"] for r in speed[(name, role)]]
            spread = statistics.stdev(rates) if len(rates) > 1 else 0
            ax.errorbar(statistics.mean(rates), 100 * score, xerr=spread, fmt="o", color=colours[role], capsize=3)
            label = PEER if role == "peer" else f"{'pruned int8' if role == 'pruned' else 'unpruned ' + role}"
            # The peer and the fp32 bundle often sit at the int8 bundle's accuracy, near each other:
            # their labels go below, on two lines.
            below = {"peer": -12, "fp32": -22}.get(role, 5)
            ax.annotate(
                label,
                (statistics.mean(rates), 100 * score),
                fontsize=8,
                xytext=(5, below),
                textcoords="offset points",
            )
        kind = "test accuracy" if "accuracy" in quality[(name, "fp32")] else "retrieval top-1"
        ax.set_title(name, fontsize=10), ax.margins(0.3)
        ax.set_xlabel("texts per second, batch 32 (higher is better)"), ax.set_ylabel(f"{kind} %")
    fig.suptitle("accuracy against speed, one run", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
