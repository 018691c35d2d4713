"""What the request fields of issue #24 cost per token: decode speed of `Model.stream` with
greedy decoding against greedy with `top_logprobs=20`, and sampling (temperature and top_p, as
before) against sampling with every new field set (logit_bias, presence/frequency/repetition
penalties, top_k, min_p).

    .venv/bin/python benchmarks/sampling_cost.py /work/cmp/new-x86 --rounds 8 --threads 2 \
        --out benchmarks/results/sampling/cost-x86.jsonl

All three run in one process on one loaded bundle, alternating (the order rotates every round),
after one warm-up each; each round gives each variant's decode tok/s over `--gen-tokens` tokens
(the prompt's time excluded), and its ratio to its baseline's run of the same round. The summary is
the median ratio with its range. Apart from the graph, the median time of one token's choice
(the sampler alone, and `top_logprobs=20` alone) on the model's real distribution. One JSON
record per run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_slm import runtime  # noqa: E402
from edge_slm.core.system import machine  # noqa: E402
from edge_slm.runtime.bench import prompt_ids  # noqa: E402
from edge_slm.runtime.sampling import Sampler, SamplingConfig, likeliest_tokens  # noqa: E402

SAMPLED = {"temperature": 0.8, "top_p": 0.95, "seed": 1}  # what sampling was before issue #24's fields
VARIANTS = {
    "greedy": {},
    "greedy+top_logprobs20": {"top_logprobs": 20},
    "sampled": SAMPLED,
    "sampled+every_field": {
        **SAMPLED,
        "top_k": 40,
        "min_p": 0.05,
        "repetition_penalty": 1.1,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.5,
        "logit_bias": {i: -100.0 if i % 2 else 5.0 for i in range(100, 400)},
    },
}
BASELINE_OF = {"greedy+top_logprobs20": "greedy", "sampled": "greedy", "sampled+every_field": "sampled"}


def decode_rate(model, ids: list[int], gen_tokens: int, options: dict) -> float:
    """Tokens after the first over their time (the prompt and first token excluded); the end of
    the text is ignored so that every run makes `gen_tokens` tokens."""
    saved, model.eos_ids = model.eos_ids, set()
    try:
        stamps = []
        for _ in model.stream(ids, max_new_tokens=gen_tokens, **options):
            stamps.append(time.perf_counter())
    finally:
        model.eos_ids = saved
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def sampler_ms(model, ids: list[int], repeats: int = 200) -> dict:
    """Median time of one token's choice (and of `top_logprobs=20`) on the model's real logits of
    the prompt's last position: the per-token cost, apart from the graph's run."""
    logits = model.session.logprobs(ids)[-1].astype(np.float32)  # log-softmaxed: the same ranking and spread
    history = list(ids)
    calls = {
        name: Sampler(SamplingConfig.of(**{k: v for k, v in options.items() if k != "top_logprobs"}))
        for name, options in VARIANTS.items()
    }
    timings = {}
    for name, sampler in calls.items():
        timings[name] = _median_ms(lambda s=sampler: s(logits, history), repeats)
    timings["top_logprobs20_only"] = _median_ms(lambda: likeliest_tokens(logits, 20), repeats)
    return timings


def _median_ms(call, repeats: int) -> float:
    for _ in range(10):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return round(1e3 * statistics.median(times), 4)


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    model = runtime.load(args.bundle, threads=args.threads)
    ids = prompt_ids(model, args.prompt_tokens)
    names = list(VARIANTS)
    for name in names:  # warm-up
        decode_rate(model, ids, args.gen_tokens, VARIANTS[name])
    rates: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(args.rounds):
        order = names[round_ % len(names) :] + names[: round_ % len(names)]
        for name in order:
            rates[name].append(decode_rate(model, ids, args.gen_tokens, VARIANTS[name]))
        print(
            f"round {round_ + 1}/{args.rounds}: " + ", ".join(f"{n} {rates[n][-1]:.1f}" for n in names), file=sys.stderr
        )
    per_token = sampler_ms(model, ids)
    ratios = {
        f"{name}/{base}": summary([a / b for a, b in zip(rates[name], rates[base])])
        for name, base in BASELINE_OF.items()
    }
    record = {
        "schema": "edge-slm-sampling-cost/2",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "bundle": str(args.bundle),
        "precision": model.manifest.precision,
        "threads": args.threads,
        "workload": f"pp{args.prompt_tokens}+tg{args.gen_tokens}",
        "rounds": args.rounds,
        "decode_tok_s": {name: summary(values) for name, values in rates.items()},
        "ratios": ratios,
        "sampler_ms_per_token": per_token,
        "machine": machine(),
        "note": "shared 2-core machine: other developers' jobs ran at the same time",
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
    print("one token's choice: " + ", ".join(f"{k} {v:.3f} ms" for k, v in per_token.items()))
    for pair, ratio in ratios.items():
        name, base = pair.split("/")
        print(
            f"{name}: {statistics.median(rates[name]):.1f} vs {base} {statistics.median(rates[base]):.1f} tok/s, "
            f"ratio {ratio['median']:.3f} (range {ratio['min']:.3f}-{ratio['max']:.3f}, {ratio['n']} rounds)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
