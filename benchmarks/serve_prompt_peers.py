"""Long prompts and memory with 4 slots busy: `edge-slm serve --parallel 4` against llama-cpp-python's
OpenAI server on the same model, alternating servers in one run, measured by the same client code.

    .venv/bin/python benchmarks/serve_prompt_peers.py /work/cmp/new-x86 --llama-python /tmp/llama-venv/bin/python \
        [--rounds 3] [--reps 3] [--threads 2] [--prompt-tokens 1024] [--gen 64] [--split] \
        [--out benchmarks/results/serve/prompt-peers-x86.jsonl]

Per server, in this order: time to first streamed token of a fresh `--prompt-tokens` prompt on
/v1/completions (`--reps` prompts, each starting differently so that no server reuses a cached
prefix), then 4 such prompts at once (`--gen` tokens each) so that 4 slots are busy, then the server
process's peak RSS (VmHWM, /proc) and its RSS now.

llama-cpp-python's server runs one request at a time (one `Llama`, one sequence, behind a lock;
its settings have no parallel slots), so it is measured twice: `llama.cpp n_ctx 2048` (one
sequence of the context each of our slots has: the time-to-first-token peer) and `llama.cpp n_ctx
8192` (the KV cache 4 slots of 2,048 tokens take in llama.cpp's server, `-np 4 -c 8192`, served
one request at a time: the memory peer). The 4 requests at once are queued by it and answered one
after another (`--interrupt_requests False`: by default a new request cuts the running stream), and
it runs with `--logits_all False` (its default computes and keeps the logits of every prompt
position, which no request here reads). The model is the default model's GGUF requantized to Q8_0 (serve_peers.q8_0_gguf).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve_load import free_port, serve_command, start_server  # noqa: E402
from serve_peers import peak_rss_mb, q8_0_gguf  # noqa: E402

from edge_slm import runtime  # noqa: E402
from edge_slm.core.data import EVAL_TEXT  # noqa: E402
from edge_slm.core.system import cpu_flags, cpu_model  # noqa: E402
from edge_slm.runtime.bench import stats  # noqa: E402


def prompts(tokenizer, count: int, tokens: int) -> list[str]:
    """`count` texts of `tokens` tokens (by the bundle's tokenizer) from the eval text, each starting
    with its own number and at another word, so that no two share more than a token or two."""
    words = EVAL_TEXT.read_text(encoding="utf-8").split()
    out = []
    for i in range(count):
        start = (i * 211) % len(words)
        text = f"Passage {i + 1}. " + " ".join(words[start:] + words[:start])
        ids = tokenizer.encode(text, add_special_tokens=False).ids[:tokens]
        out.append(tokenizer.decode(ids))
    return out


def status_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def first_token(http, base: str, model: str, prompt: str, max_tokens: int) -> tuple[float, int]:
    """(ms to the first streamed chunk, chunks) of one streamed completion."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    start, first, chunks = time.perf_counter(), None, 0
    async with http.stream("POST", base + "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise SystemExit(f"{base}: {response.status_code} {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            # The first chunk with a choice: its first token's text, or the end (a first token that
            # is the end of text, which neither server sends as text).
            for _ in json.loads(line[6:]).get("choices", []):
                first = first or time.perf_counter()
                chunks += 1
    return ((first or float("nan")) - start) * 1e3, chunks


async def measure(base: str, model: str, texts: list[str], reps: int, busy: int, gen: int) -> dict:
    """`reps` first-token times (none with reps 0), then `busy` requests at once (none with 0)."""
    row = {}
    async with httpx.AsyncClient(timeout=1800) as http:
        # Warm-up on a short prompt.
        await http.post(
            base + "/v1/completions", json={"model": model, "prompt": texts[0][:200], "max_tokens": 1, "temperature": 0}
        )
        if reps:
            row["ttft_ms"] = stats([(await first_token(http, base, model, texts[1 + r], 4))[0] for r in range(reps)])
        if busy:
            started = time.perf_counter()
            together = await asyncio.gather(
                *(first_token(http, base, model, texts[1 + reps + n], gen) for n in range(busy))
            )
            row.update(busy_ttft_ms=stats([t for t, _ in together]), busy_seconds=time.perf_counter() - started)
            # The last busy prompt again (cached: cheap), for this server's count of its tokens.
            body = {"model": model, "prompt": texts[-1], "max_tokens": 1, "temperature": 0}
            answer = (await http.post(base + "/v1/completions", json=body)).json()
            row["prompt_tokens_counted"] = answer["usage"]["prompt_tokens"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--llama-python", required=True, help="A Python with llama-cpp-python[server] installed.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--systems", default="edge-slm,llama.cpp n_ctx 2048,llama.cpp n_ctx 8192")
    parser.add_argument(
        "--split",
        action="store_true",
        help="llama.cpp n_ctx 2048 measures only the first token, n_ctx 8192 only the 4 busy requests (a loaded "
        "machine: half the time)",
    )
    parser.add_argument("--gen", type=int, default=64, help="tokens of each busy request")
    parser.add_argument("--serve-args", default="", help="extra edge-slm serve options (e.g. '--prefill-chunk 512')")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    model = runtime.load(args.bundle, threads=args.threads)
    gguf = q8_0_gguf(args.llama_python)
    systems = args.systems.split(",")
    rows = []
    for round_ in range(1, args.rounds + 1):
        # Fresh prompts every round (no server ever sees one twice); the order rotates per round.
        texts = prompts(model.tokenizer, 1 + args.reps + args.parallel, args.prompt_tokens)
        texts = [f"[{round_}] {t}" for t in texts]
        order = systems[round_ % len(systems) :] + systems[: round_ % len(systems)]
        for system in order:
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            if system == "edge-slm":
                command = serve_command(args.bundle, port, args.threads, 8, args.parallel) + args.serve_args.split()
                name, ready = model.manifest.target, base + "/health"
            else:
                n_ctx = int(system.rsplit(" ", 1)[1])
                command = [
                    args.llama_python,
                    *("-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port)),
                    *("--n_threads", str(args.threads), "--n_threads_batch", str(args.threads)),
                    *("--n_ctx", str(n_ctx)),
                    # Its leanest and fastest for this: the server's default (True) computes and keeps
                    # logits for every prompt position.
                    *("--logits_all", "False"),
                    # Its default cuts a running stream when another request arrives; these queue.
                    *("--interrupt_requests", "False"),
                ]
                name, ready = str(gguf), base + "/v1/models"
            proc = start_server(command, ready)
            load_before = os.getloadavg()[0]
            try:
                reps = 0 if args.split and system.endswith("8192") else args.reps
                busy = 0 if args.split and system.endswith("2048") else args.parallel
                row = asyncio.run(measure(base, name, texts, reps, busy, args.gen))
                row["peak_rss_mb"] = peak_rss_mb(proc.pid)
                row["rss_now_mb"] = status_mb(proc.pid, "VmRSS")
            finally:
                proc.terminate()
                proc.wait(timeout=30)
            row.update(system=system, round=round_, load_average_1m=[load_before, os.getloadavg()[0]])
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items()}, default=str), flush=True)
    summary = {}
    for system in systems[1:]:
        for key, pick in (("ttft_ms", lambda r: r["ttft_ms"]["p50"]), ("peak_rss_mb", lambda r: r["peak_rss_mb"])):
            ratios = [
                pick(ours) / pick(theirs)
                for ours in rows
                if ours["system"] == systems[0]
                for theirs in rows
                if theirs["system"] == system and theirs["round"] == ours["round"] and key in theirs
            ]
            if not ratios:
                continue
            summary[f"{key} {systems[0]} / {system}"] = {
                "median": statistics.median(ratios),
                "min": min(ratios),
                "max": max(ratios),
                "rounds": ratios,
            }
    for key, value in summary.items():
        print(f"{key}: {value['median']:.2f} (rounds {', '.join(f'{r:.2f}' for r in value['rounds'])})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        flags = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "fma"})
        with open(args.out, "a", encoding="utf-8") as handle:
            for row in rows:
                record = {"schema": "edge-slm-serve-prompt-peers/1", "bundle": str(args.bundle), **row}
                record.update(
                    threads=args.threads, parallel=args.parallel, prompt_tokens=args.prompt_tokens, gen=args.gen
                )
                record.update(serve_args=args.serve_args, cpu=cpu_model(), cpu_flags=flags, gguf=gguf.name)
                handle.write(json.dumps(record) + "\n")
            handle.write(json.dumps({"schema": "edge-slm-serve-prompt-peers/1", "summary": summary}) + "\n")


if __name__ == "__main__":
    main()
