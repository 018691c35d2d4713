"""Pruned encoder bundles against the unpruned ones, side by side in one run: rounds alternate the
bundles, each measurement runs in a fresh process (edge-slm's bench worker: warm-up, repetitions,
mean and spread), and every speed is a ratio against the unpruned bundle of the same pair in the
same round (the build machine is shared: the ratios hold better than the absolute numbers).

    nice -n 10 .venv/bin/python benchmarks/encoder_pruning.py \\
        --pair classifier=export/x86-laptop-classifier,export/x86-laptop-classifier-pruned \\
        --pair embedder=export/x86-laptop-embedder,export/x86-laptop-embedder-pruned \\
        --fp32 classifier=export/x86-laptop-classifier-fp32 --fp32 embedder=export/x86-laptop-embedder-fp32 \\
        --out benchmarks/results/encoder-pruning/HOST.jsonl

Accuracy, on data the models never trained on: a classifier's test accuracy on the shipped intents
test split (against the unpruned fp32 bundle's when `--fp32` names it); an embedder's retrieval
top-1 on the shipped retrieval check and the mean cosine of its vectors to the unpruned bundle's
(and to the unpruned fp32 bundle's, the gate's reference, when `--fp32` names it), on the
retrieval check's queries and passages and the intents test split.
Records are the bench schema (`edge-slm report` reads them, with the machine and its CPU flags);
the summary table is printed as Markdown.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from edge_slm.core.errors import EdgeSlmError
from edge_slm.core.worker import run_worker


def accuracy(bundle: str, reference: str | None, threads: int) -> dict:
    """Test accuracy (classifier) or retrieval top-1 and cosine to `reference` (embedder)."""
    import numpy as np

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
        measured["cosine_to_unpruned"] = float((unit(model.embed(texts)) * unit(theirs)).sum(1).mean())
    return {k: v for k, v in measured.items() if not isinstance(v, np.ndarray)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pair", action="append", required=True, help="NAME=UNPRUNED_BUNDLE,PRUNED_BUNDLE")
    parser.add_argument("--fp32", action="append", default=[], help="NAME=the unpruned fp32 bundle (accuracy only)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from edge_slm import runtime
    from edge_slm.runtime.bench import BundleInfo
    from edge_slm.runtime.bench_encoder import encoder_record

    pairs = {}
    for item in args.pair:
        name, _, paths = item.partition("=")
        unpruned, _, pruned = paths.partition(",")
        pairs[name] = {"unpruned": unpruned, "pruned": pruned}
    fp32 = dict(item.partition("=")[::2] for item in args.fp32)
    quality = {}
    for name, bundles in pairs.items():
        quality[(name, "unpruned")] = accuracy(bundles["unpruned"], None, args.threads)
        quality[(name, "pruned")] = accuracy(bundles["pruned"], bundles["unpruned"], args.threads)
        if name in fp32:
            quality[(name, "fp32")] = accuracy(fp32[name], None, args.threads)
            if "cosine_to_unpruned" in quality[(name, "pruned")]:  # the gate's reference is the fp32 model
                against = accuracy(bundles["pruned"], fp32[name], args.threads)
                quality[(name, "pruned")]["cosine_to_fp32"] = against["cosine_to_unpruned"]
    speed: dict = {}
    for round_number in range(args.rounds):
        for name, bundles in pairs.items():
            for role in ("unpruned", "pruned"):  # alternating within the round: the same load for both
                bundle = bundles[role]
                cfg = {
                    "bundle": bundle,
                    "threads": args.threads,
                    "repetitions": args.repetitions,
                    "warmup": args.warmup,
                }
                try:
                    raw = run_worker("edge_slm.runtime.bench_encoder:measure_encoder", cfg, what=bundle)
                except EdgeSlmError as exc:
                    sys.exit(str(exc))
                info = BundleInfo.of(Path(bundle), runtime.load(bundle, verify=False).manifest, None)
                extra = {**quality[(name, role)], "pair": name, "role": role, "round": round_number + 1}
                record = encoder_record(info, args.threads, args.repetitions, args.warmup, raw, extra)
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                with open(args.out, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(record) + "\n")
                speed.setdefault((name, role), []).append(raw)
                print(
                    f"round {round_number + 1} {name} {role}: b32 {raw['texts_per_s_b32']['mean']:.0f} texts/s, "
                    f"b1@16 {raw['latency_ms_16']['p50']:.2f} ms",
                    file=sys.stderr,
                )
    print(markdown(pairs, speed, quality))


def markdown(pairs: dict, speed: dict, quality: dict) -> str:
    """One row per pair: each bundle's speed (mean over rounds, spread), the ratios, the accuracy."""
    lines = [
        "| model | texts/s b32 unpruned | texts/s b32 pruned | speed-up b32 | b1@16 ms unpruned | b1@16 ms pruned "
        "| speed-up b1 | accuracy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in pairs:
        base, mine = speed[(name, "unpruned")], speed[(name, "pruned")]
        b32 = [m["texts_per_s_b32"]["mean"] / b["texts_per_s_b32"]["mean"] for b, m in zip(base, mine)]
        b1 = [b["latency_ms_16"]["p50"] / m["latency_ms_16"]["p50"] for b, m in zip(base, mine)]

        def cell(runs, key, field):
            values = [r[key][field] for r in runs]
            spread = f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else ""
            return f"{statistics.mean(values):.1f}{spread}"

        lines.append(
            f"| {name} | {cell(base, 'texts_per_s_b32', 'mean')} | {cell(mine, 'texts_per_s_b32', 'mean')} "
            f"| {statistics.mean(b32):.2f}x ({min(b32):.2f}-{max(b32):.2f}) | {cell(base, 'latency_ms_16', 'p50')} "
            f"| {cell(mine, 'latency_ms_16', 'p50')} | {statistics.mean(b1):.2f}x ({min(b1):.2f}-{max(b1):.2f}) "
            f"| {_accuracy(name, quality)} |"
        )
    return "\n".join(lines)


def _accuracy(name: str, quality: dict) -> str:
    pruned, unpruned, fp32 = quality[(name, "pruned")], quality[(name, "unpruned")], quality.get((name, "fp32"))
    if "accuracy" in pruned:
        text = f"test accuracy {100 * pruned['accuracy']:.1f}% (unpruned int8 {100 * unpruned['accuracy']:.1f}%"
        return text + (f", unpruned fp32 {100 * fp32['accuracy']:.1f}%)" if fp32 else ")")
    return (
        f"retrieval top-1 {100 * pruned['recall_at_1']:.1f}% (unpruned int8 {100 * unpruned['recall_at_1']:.1f}%"
        + (f", unpruned fp32 {100 * fp32['recall_at_1']:.1f}%)" if fp32 else ")")
        + f", cosine to unpruned int8 {pruned.get('cosine_to_unpruned', float('nan')):.4f}"
        + (f" (fp32 {pruned['cosine_to_fp32']:.4f})" if "cosine_to_fp32" in pruned else "")
    )


if __name__ == "__main__":
    main()
