"""Interleaved A/B speed of two bundles in one process: the ratio, robust to a noisy machine.

    .venv/bin/python benchmarks/ab.py export/x86-laptop export/x86-laptop-fp32 --pairs 12 --threads 2 \
        --out benchmarks/ab/x86-laptop.jsonl

`edge-slm bench` measures one bundle per fresh process; on a shared machine the speed drifts by
10% between minutes, which is as large as the differences being judged. Here both bundles are
loaded once and run the same workload (pp128+tg64 of eval.txt, greedy, as `edge-slm bench`)
alternately, A-B then B-A, after one warm-up each; every pair gives one ratio A/B of decode and of
prefill speed, and the summary reports their median with the range. One JSON record per run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_slm import runtime  # noqa: E402
from edge_slm.runtime.bench import greedy_steps, machine, prompt_ids, timed_runs  # noqa: E402


def one_run(model, ids: list[int], gen_tokens: int) -> dict:
    timings = timed_runs(*greedy_steps(model.session), ids, gen_tokens, repetitions=1, warmup=0)
    return {"decode_tok_s": timings["decode_tok_s"]["mean"], "prefill_tok_s": timings["prefill_tok_s"]["mean"]}


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle_a", type=Path)
    parser.add_argument("bundle_b", type=Path)
    parser.add_argument("--pairs", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--b-all-logits",
        action="store_true",
        help="B computes the LM head for every prompt position (as before logits_to_keep); A and B may be one bundle.",
    )
    args = parser.parse_args()

    models = [runtime.load(args.bundle_a, threads=args.threads), runtime.load(args.bundle_b, threads=args.threads)]
    if args.b_all_logits:
        models[1].session.keeps_logits = False
    ids = prompt_ids(models[0], args.prompt_tokens)
    for model in models:  # warm-up: first-run allocations and prepacking stay out of the figures
        one_run(model, ids, args.gen_tokens)
    runs: list[list[dict]] = [[], []]
    for pair in range(args.pairs):
        order = (0, 1) if pair % 2 == 0 else (1, 0)
        for which in order:
            runs[which].append(one_run(models[which], ids, args.gen_tokens))
        print(
            f"pair {pair + 1}/{args.pairs}: decode {runs[0][-1]['decode_tok_s']:.1f} vs "
            f"{runs[1][-1]['decode_tok_s']:.1f} tok/s",
            file=sys.stderr,
        )
    ratios = {kind: summary([a[kind] / b[kind] for a, b in zip(*runs)]) for kind in ("decode_tok_s", "prefill_tok_s")}
    speeds = {
        name: {kind: summary([r[kind] for r in rs]) for kind in ("decode_tok_s", "prefill_tok_s")}
        for name, rs in zip(("a", "b"), runs)
    }
    record = {
        "schema": "edge-slm-ab/1",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "a": str(args.bundle_a),
        "b": str(args.bundle_b) + (" (LM head on every prompt position)" if args.b_all_logits else ""),
        "precision_a": models[0].manifest.precision,
        "precision_b": models[1].manifest.precision,
        "threads": args.threads,
        "workload": f"pp{args.prompt_tokens}+tg{args.gen_tokens}",
        "pairs": args.pairs,
        "speeds": speeds,
        "ratio_a_over_b": ratios,
        "machine": machine(),
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            f.write(json.dumps(record) + "\n")
    d, p = ratios["decode_tok_s"], ratios["prefill_tok_s"]
    print(
        f"{args.bundle_a} / {args.bundle_b}, {args.threads} threads, {args.pairs} interleaved pairs: "
        f"decode {speeds['a']['decode_tok_s']['median']:.1f} vs {speeds['b']['decode_tok_s']['median']:.1f} tok/s, "
        f"ratio {d['median']:.2f}x (range {d['min']:.2f}-{d['max']:.2f}); "
        f"prefill ratio {p['median']:.2f}x (range {p['min']:.2f}-{p['max']:.2f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
