"""Decode speed of an edge-slm bundle side by side with transformers eager and llama.cpp, in one run.

    .venv/bin/python benchmarks/peers_decode.py export/x86-laptop [--also export/x86-laptop-fp32] \
        [--llama-python /path/to/venv/bin/python --gguf model-f32.gguf] [--no-transformers] [--rounds 3] [--reps 3]

The machine is shared and noisy, so the systems take turns: each round runs every system once in
a fresh process (1 warm-up + `reps` measured generations), and the report gives mean ± stdev over
all measured generations plus each peer's ratio to edge-slm. Every system decodes the same prompt
ids greedily for exactly `--tokens` new tokens (end-of-turn ignored) on `--threads` threads.
Decode throughput excludes the first token. For edge-slm it also reports the share
of each decode step spent outside onnxruntime (sampling, bookkeeping, binding).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from edge_slm.core.errors import EdgeSlmError
from edge_slm.core.worker import run_worker

QUESTION = "What is the capital of France?"
REPO = Path(__file__).resolve().parent.parent  # the workers import benchmarks.peers_decode from here


def worker_edge(bundle: str, ids: list[int], reps: int, tokens: int, threads: int, gguf: str | None = None) -> dict:
    from edge_slm import runtime

    model = runtime.load(bundle, threads=threads, verify=False)
    model.eos_ids = set()
    session = model.session.session
    inside = []
    real_run = session.run_with_iobinding

    def timed_run(binding, *a):
        t = time.perf_counter()
        real_run(binding, *a)
        inside.append(time.perf_counter() - t)

    session.run_with_iobinding = timed_run
    samples = []
    for rep in range(reps + 1):
        inside.clear()
        t = time.perf_counter()
        result = model.generate(ids, max_new_tokens=tokens)
        total = time.perf_counter() - t
        if rep == 0:
            continue  # warm-up
        decode_total = total - result.ttft_ms / 1e3
        samples.append(
            {
                "ttft_ms": result.ttft_ms,
                "decode_tok_s": result.decode_tokens_per_s,
                "outside_ort_share": 1 - sum(inside[1:]) / decode_total,
                "text": result.text,
            }
        )
    return {"samples": samples}


def _peer(system: str, ids: list[int], reps: int, tokens: int, threads: int, gguf: str | None) -> dict:
    """llama.cpp and transformers through benchmarks/peers.py's workers: the same loop."""
    from benchmarks import peers

    cfg = {
        "system": system,
        "gguf": gguf,
        "threads": threads,
        "ids": ids,
        "prompt_tokens": len(ids),
        "gen_tokens": tokens,
        "repetitions": reps,
        "warmup": 1,
        "context": None,
    }
    raw = (peers.worker_llama if system == "llama.cpp" else peers.worker_torch)(**cfg)
    return {
        "samples": [
            {"ttft_ms": t, "decode_tok_s": d} for t, d in zip(raw["ttft_ms"]["samples"], raw["decode_tok_s"]["samples"])
        ]
    }


def worker_torch(bundle: str, **cfg) -> dict:
    return _peer("transformers", **cfg)


def worker_llama(bundle: str, **cfg) -> dict:
    return _peer("llama.cpp", **cfg)


WORKERS = {"edge-slm": "worker_edge", "transformers": "worker_torch", "llama.cpp": "worker_llama"}


def summarize(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):7.1f} ± {spread:5.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle")
    parser.add_argument("--llama-python", default=None, help="A python with llama-cpp-python installed.")
    parser.add_argument("--gguf", default=None, help="The GGUF llama.cpp runs (e.g. an F32 conversion).")
    parser.add_argument("--also", action="append", default=[], help="Another bundle to measure (repeatable).")
    parser.add_argument("--no-transformers", action="store_true", help="Skip transformers eager.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", dest="json_out", default=None, help="Write all samples here.")
    args = parser.parse_args()

    from edge_slm import runtime

    model = runtime.load(args.bundle, verify=False)
    ids = model.encode(model.render_chat([{"role": "user", "content": QUESTION}]))
    del model

    from edge_slm.core.bundle import read_manifest

    def label(bundle):
        return f"edge-slm {read_manifest(Path(bundle)).precision}"

    systems = {label(args.bundle): (sys.executable, "edge-slm", args.bundle)}
    for bundle in args.also:
        systems[label(bundle)] = (sys.executable, "edge-slm", bundle)
    if not args.no_transformers:
        systems["transformers fp32"] = (sys.executable, "transformers", args.bundle)
    if args.llama_python and args.gguf:
        systems[f"llama.cpp {Path(args.gguf).stem.rsplit('-', 1)[-1]}"] = (args.llama_python, "llama.cpp", args.bundle)
    results = {name: [] for name in systems}
    for round_ in range(args.rounds):
        for name, (python, worker, bundle) in systems.items():
            cfg = {"bundle": bundle, "ids": ids, "reps": args.reps, "tokens": args.tokens, "threads": args.threads}
            # the llama venv imports llama_cpp, numpy and this repository's edge_slm only
            env = {"PATH": "/usr/bin:/bin"} if worker == "llama.cpp" else dict(os.environ)
            try:
                results[name] += run_worker(
                    f"benchmarks.peers_decode:{WORKERS[worker]}",
                    {**cfg, "gguf": args.gguf},
                    python=python,
                    env={**env, "PYTHONPATH": str(REPO)},
                    what=name,
                )["samples"]
            except EdgeSlmError as exc:
                sys.exit(str(exc))
            print(f"round {round_ + 1}/{args.rounds}: {name} done", file=sys.stderr)

    first = next(iter(results))
    base = statistics.mean(s["decode_tok_s"] for s in results[first])
    print(
        f"\n{len(ids)}-token chat prompt, {args.tokens} greedy tokens, {args.threads} threads, "
        f"{args.rounds} rounds x {args.reps} runs each"
    )
    print(f"{'system':<18} {'decode tok/s':>16} {'first token ms':>17} {'system / ' + first:>24}")
    for name, samples in results.items():
        rate = [s["decode_tok_s"] for s in samples]
        print(
            f"{name:<18} {summarize(rate):>16} {summarize([s['ttft_ms'] for s in samples]):>17} "
            f"{statistics.mean(rate) / base:>23.2f}x"
        )
    for name, samples in results.items():
        if "outside_ort_share" in samples[0]:
            outside = [s["outside_ort_share"] for s in samples]
            print(
                f"{name}: decode step time outside onnxruntime {100 * statistics.mean(outside):.1f}% "
                f"(max {100 * max(outside):.1f}%); text {samples[0]['text'][:60]!r}"
            )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"prompt_ids": ids, "results": results}, indent=1))


if __name__ == "__main__":
    main()
