"""edge-slm serve against llama-cpp-python's OpenAI server on the same model, one after the other
in one run, measured by the same client code (benchmarks/serve_load.py).

    .venv/bin/python benchmarks/serve_peers.py export/x86-laptop --llama-python /tmp/llama-venv/bin/python \
        [--rounds 2] [--threads 2] [--out benchmarks/serve/<host>-peers.jsonl]

llama.cpp runs the default model's own GGUF requantized to Q8_0 (llama.cpp's quantizer, as close
to the int8 bundle as llama.cpp gets), with the bundle's context length. Per server: one client's
streamed decode rate, time to first token fresh and with a shared ~200-token prefix, 8 clients x
10 requests (failures, latency), and the server process's peak RSS (VmHWM).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve_load import QUESTIONS, free_port, prefix_reuse, serve_command, start_server, stream_chat  # noqa: E402

from edge_slm import runtime  # noqa: E402
from edge_slm.builder.decoder.load import default_gguf_path  # noqa: E402
from edge_slm.core.cache import cache_root  # noqa: E402

QUANTIZE = """
import sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
params.allow_requantize = True
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params))
"""


def q8_0_gguf(llama_python: str) -> Path:
    out = cache_root() / "peers" / "smollm2-135m-q8_0.gguf"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        subprocess.run(
            [llama_python, "-c", QUANTIZE, str(default_gguf_path()), str(tmp)], check=True, capture_output=True
        )
        tmp.replace(out)
    return out


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def load(base: str, model: str, clients: int, requests: int) -> dict:
    latencies, failed, tokens = [], 0, 0

    async def one(n, http):
        nonlocal failed, tokens
        for r in range(requests):
            body = {
                "model": model,
                "messages": [{"role": "user", "content": QUESTIONS[(n + r) % len(QUESTIONS)]}],
                "max_tokens": 16,
                "temperature": 0,
            }
            t0 = time.perf_counter()
            response = await http.post(base + "/v1/chat/completions", json=body)
            latencies.append((time.perf_counter() - t0) * 1e3)
            if response.status_code != 200:
                failed += 1
            else:
                tokens += response.json()["usage"]["completion_tokens"]

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as http:
        await asyncio.gather(*(one(n, http) for n in range(clients)))
    ordered = sorted(latencies)
    return {
        "failed": failed,
        "p50_ms": ordered[len(ordered) // 2],
        "p99_ms": ordered[int(0.99 * (len(ordered) - 1))],
        "tok_s_all": tokens / (time.perf_counter() - started),
    }


async def measure(base: str, model_name: str, model, reps: int) -> dict:
    messages = [{"role": "user", "content": "Write a long story about a robot who learns to paint."}]
    rates = []
    async with httpx.AsyncClient(timeout=300) as http:
        await stream_chat(http, base, messages, 8, model_name)
        for _ in range(reps):
            rates.append((await stream_chat(http, base, messages, 64, model_name))[1])
    first, second, _ = await prefix_reuse(base, model, reps, model_name)
    return {
        "decode_tok_s": statistics.median(rates),
        "ttft_ms": statistics.median(first),
        "ttft_shared_ms": statistics.median(second),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--llama-python", required=True, help="A Python with llama-cpp-python[server] installed.")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    model = runtime.load(args.bundle, threads=args.threads)
    context = model.context_length
    gguf = q8_0_gguf(args.llama_python)
    rows = []
    for round_ in range(1, args.rounds + 1):
        for system in ("edge-slm", "llama.cpp"):
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            if system == "edge-slm":
                command = serve_command(args.bundle, port, args.threads, 8)
                name = model.manifest.target
            else:
                command = [
                    args.llama_python,
                    "-m",
                    "llama_cpp.server",
                    "--model",
                    str(gguf),
                    "--port",
                    str(port),
                    "--n_threads",
                    str(args.threads),
                    "--n_ctx",
                    str(context),
                    "--chat_format",
                    "chatml",
                ]
                name = str(gguf)
            # edge-slm says when its model is loaded; llama.cpp's server answers once it is.
            proc = start_server(command, base + ("/health" if system == "edge-slm" else "/v1/models"))
            try:
                row = asyncio.run(measure(base, name, model, args.reps))
                row.update(asyncio.run(load(base, name, 8, 10)))
                row["peak_rss_mb"] = peak_rss_mb(proc.pid)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
            row.update(system=system, round=round_)
            rows.append(row)
            print(json.dumps(row), flush=True)
    for key in ("decode_tok_s", "ttft_ms", "ttft_shared_ms", "p50_ms", "peak_rss_mb"):
        ours = statistics.median(r[key] for r in rows if r["system"] == "edge-slm")
        theirs = statistics.median(r[key] for r in rows if r["system"] == "llama.cpp")
        print(f"{key}: edge-slm {ours:.1f}, llama.cpp {theirs:.1f}, ratio {ours / theirs:.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps({"schema": "edge-slm-serve-peers/1", "bundle": str(args.bundle), **row}) + "\n")


if __name__ == "__main__":
    main()
