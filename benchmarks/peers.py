"""The same workload as `edge-slm bench` on the peers, written as records of the same schema.

    .venv/bin/python benchmarks/peers.py --system llama.cpp --python /path/to/llama-venv/bin/python \
        --gguf smollm2-q8_0.gguf --precision q8_0 --target x86-laptop --out benchmarks/results/x86-laptop/HOST.jsonl
    .venv/bin/python benchmarks/peers.py --system transformers --target x86-laptop --out ...

llama.cpp runs through llama-cpp-python (compiles llama.cpp, about 5 minutes; keep it in its own
virtual environment), transformers eager on the fp32 weights of the default model. Both get the
same prompt ids (`--prompt-tokens` of edge_slm/data/eval.txt, tokenized by the bundle's
tokenizer), greedy decoding, thread count, warm-up and repetitions as `edge-slm bench`. Not part
of the default install or CI.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from edge_slm.core.errors import EdgeSlmError
from edge_slm.core.worker import run_worker

REPO = Path(__file__).resolve().parent.parent  # the workers import benchmarks.peers from here


def worker_llama(**cfg) -> dict:
    import numpy as np
    from llama_cpp import Llama

    t = time.perf_counter()
    llm = Llama(
        model_path=cfg["gguf"],
        n_threads=cfg["threads"],
        n_threads_batch=cfg["threads"],
        # The same KV capacity as the edge-slm run it is compared with (`--context`).
        n_ctx=cfg["context"] or cfg["prompt_tokens"] + cfg["gen_tokens"] + 8,
        n_batch=512,
        verbose=False,
    )
    load_s = time.perf_counter() - t

    def prefill(ids):
        llm.reset()
        llm.eval(ids)
        return int(np.argmax(llm.scores[llm.n_tokens - 1]))

    def step(token):
        llm.eval([token])
        return int(np.argmax(llm.scores[llm.n_tokens - 1]))

    return _loop(cfg, prefill, step, load_s)


def worker_torch(**cfg) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from edge_slm.builder.decoder.load import load

    torch.set_num_threads(cfg["threads"])
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(load(None).path, dtype="float32", attn_implementation="eager").eval()
    load_s = time.perf_counter() - t
    state = {}

    @torch.no_grad()
    def prefill(ids):
        out = model(torch.tensor([ids]), use_cache=True)
        state["cache"] = out.past_key_values
        return int(out.logits[0, -1].argmax())

    @torch.no_grad()
    def step(token):
        out = model(torch.tensor([[token]]), past_key_values=state["cache"], use_cache=True)
        state["cache"] = out.past_key_values
        return int(out.logits[0, -1].argmax())

    return _loop(cfg, prefill, step, load_s)


def _loop(cfg, prefill, step, load_s) -> dict:
    # The same loop and statistics as `edge-slm bench`, imported from the repository's package
    # (its bench module needs only the standard library, so the llama.cpp venv can import it).
    from edge_slm.runtime.bench import peak_rss_mb, timed_runs

    timings = timed_runs(prefill, step, cfg["ids"], cfg["gen_tokens"], cfg["repetitions"], cfg["warmup"])
    return {"load_s": load_s, **timings, "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--system", choices=["llama.cpp", "transformers"], required=True)
    parser.add_argument("--python", default=sys.executable, help="The interpreter that has the peer installed.")
    parser.add_argument("--gguf", help="llama.cpp: the GGUF file to run.")
    parser.add_argument("--precision", default="fp32", help="How the peer's weights are stored (q8_0, f32, ...).")
    parser.add_argument("--target", default="x86-laptop")
    parser.add_argument("--bundle", default="export/x86-laptop", help="A bundle whose tokenizer makes the prompt ids.")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", default="2")
    parser.add_argument("--context", type=int, default=None, help="llama.cpp's n_ctx [prompt + generated tokens].")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from edge_slm import __version__, runtime
    from edge_slm.builder.decoder.load import load
    from edge_slm.runtime.bench import BenchRecord, BundleInfo, Settings, git_commit, prompt_ids, test_name
    from edge_slm.runtime.bench_results import DecoderResults

    model = runtime.load(args.bundle)
    ids = prompt_ids(model, args.prompt_tokens)
    parameters = model.manifest.model.parameters  # the same model as the peer runs
    fp32_dir = load(None).path
    size = (
        Path(args.gguf).stat().st_size if args.gguf else sum(p.stat().st_size for p in fp32_dir.glob("*.safetensors"))
    )
    for threads in [int(t) for t in args.threads.split(",")]:
        cfg = {
            "system": args.system,
            "gguf": args.gguf,
            "threads": threads,
            "ids": ids,
            "prompt_tokens": args.prompt_tokens,
            "gen_tokens": args.gen_tokens,
            "repetitions": args.repetitions,
            "warmup": args.warmup,
            "context": args.context,
        }
        # The llama.cpp venv imports llama_cpp, numpy and this repository's edge_slm package only.
        env = {"PATH": "/usr/bin:/bin"} if args.system == "llama.cpp" else dict(os.environ)
        worker = "worker_llama" if args.system == "llama.cpp" else "worker_torch"
        try:
            raw = run_worker(
                f"benchmarks.peers:{worker}",
                cfg,
                python=args.python,
                env={**env, "PYTHONPATH": str(REPO)},
                what=args.system,
            )
        except EdgeSlmError as exc:
            sys.exit(str(exc))
        record = BenchRecord(
            system=args.system,
            test=test_name(args.prompt_tokens, args.gen_tokens),
            bundle=BundleInfo(
                path=args.gguf or str(fp32_dir),
                manifest_sha256=None,
                target=args.target,
                precision=args.precision,
                graph=args.system,
                size_bytes=size,
                parameters=parameters,
            ),
            settings=Settings(
                threads=threads,
                prompt_tokens=args.prompt_tokens,
                gen_tokens=args.gen_tokens,
                repetitions=args.repetitions,
                warmup=args.warmup,
                provider=args.system,
                cpu_arena=None,
                context=args.context,
            ),
            versions={"edge_slm": __version__, "git_commit": git_commit()},
            results=DecoderResults.of(raw),
        ).to_dict()
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        r = DecoderResults.of(raw)
        print(
            f"{args.system} {args.precision} {threads}t: tg {r.decode_tok_s.mean:.1f} ± {r.decode_tok_s.std:.1f} tok/s, "
            f"pp {r.prefill_tok_s.mean:.0f} tok/s, first token {r.ttft_ms.mean:.0f} ms",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
