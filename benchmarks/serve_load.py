"""Load on `edge-slm serve`, against `edge-slm generate` on the same bundle, in one run.

    .venv/bin/python benchmarks/serve_load.py export/x86-laptop [--clients 8] [--requests 20] [--threads 2]
        [--out benchmarks/results/serve/<host>.jsonl]
    .venv/bin/python benchmarks/serve_load.py export/x86-laptop --scaling --parallel 8 [--max-tokens 128]
    .venv/bin/python benchmarks/serve_load.py export/x86-laptop --agreement --parallel 4 [--agreement-prompts 100]

Three measurements, all on loopback:
1. single client: decode tok/s of a streamed chat reply (first content chunk to last) against the
   runtime's own `generate` in this process, same prompt and greedy settings, alternating;
2. prefix reuse: time to first token of a request with a fresh ~200-token system prompt, then of
   one sharing it (the server keeps the common prefix's KV cache);
3. N clients x M requests at once: failed, truncated and mixed-up answers (each compared with the
   greedy answer to its own question), request latency p50 / p99, tokens/s across clients, and the
   server's peak RSS from /metrics.
One record in the bench schema is appended to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_slm import runtime  # noqa: E402
from edge_slm.core.data import EVAL_TEXT  # noqa: E402
from edge_slm.runtime.bench import BenchRecord, BundleInfo, Settings, stats  # noqa: E402
from edge_slm.runtime.bench_results import DecoderResults  # noqa: E402

QUESTIONS = [
    "What is the capital of France?",
    "Name three colours.",
    "Why is the sky blue?",
    "What is a CPU?",
    "Give me a short greeting.",
    "What do bees make?",
    "Name a planet.",
    "What is two plus two?",
]


def serve_command(bundle: Path, port: int, threads: int, max_queue: int, parallel: int | None = None) -> list[str]:
    return [
        sys.executable,
        "-m",
        "edge_slm.cli",
        "serve",
        str(bundle),
        "--port",
        str(port),
        "--threads",
        str(threads),
        "--max-queue",
        str(max_queue),
        *(["--parallel", str(parallel)] if parallel else []),
    ]


def start_server(command: list[str], ready_url: str) -> subprocess.Popen:
    """Start a server and wait (up to two minutes) until `ready_url` answers 200."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(1200):
        try:
            if httpx.get(ready_url, timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"{command[0]} {' '.join(command[1:4])} did not become ready")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def stream_chat(http, base, messages, max_tokens, model=None):
    """(seconds to first content, decode tok/s after it, text, completion tokens)."""
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start, first, last, pieces, usage = time.perf_counter(), None, None, [], None
    async with http.stream("POST", base + "/v1/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                if choice["delta"].get("content"):
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    pieces.append(choice["delta"]["content"])
    tokens = usage["completion_tokens"] if usage else len(pieces)
    rate = (tokens - 1) / (last - first) if first and last and last > first and tokens > 1 else 0.0
    return (first - start) if first else float("nan"), rate, "".join(pieces), tokens


async def single_client(base, model, reps: int, max_tokens: int):
    """Decode tok/s of one client: streamed and timed by the client (its own CPU use included, on
    the same cores), the server's own timing of a non-streamed request, and `generate` here."""
    messages = [{"role": "user", "content": "Write a long story about a robot who learns to paint."}]
    streamed, served, direct = [], [], []
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0}
    async with httpx.AsyncClient(timeout=300) as http:
        await stream_chat(http, base, messages, 8)  # warm-up
        model.chat(messages, max_new_tokens=8, keep_cache=False, temperature=0.0)
        for _ in range(reps):
            streamed.append((await stream_chat(http, base, messages, max_tokens))[1])
            answer = (await http.post(base + "/v1/chat/completions", json=body)).json()
            served.append(answer["timings"]["predicted_per_second"])
            reply = model.chat(messages, max_new_tokens=max_tokens, keep_cache=False, temperature=0.0)
            direct.append(reply.decode_tokens_per_s)
    return streamed, served, direct


async def prefix_reuse(base, model, reps: int, name=None):
    text = EVAL_TEXT.read_text(encoding="utf-8").split()
    first, second = [], []
    async with httpx.AsyncClient(timeout=300) as http:
        for rep in range(reps):
            words = text[rep * 150 : rep * 150 + 150]  # a fresh system prompt of ~200 tokens each time
            system = {"role": "system", "content": " ".join(words)}
            ttft1, *_ = await stream_chat(http, base, [system, {"role": "user", "content": QUESTIONS[0]}], 4, name)
            ttft2, *_ = await stream_chat(http, base, [system, {"role": "user", "content": QUESTIONS[1]}], 4, name)
            first.append(ttft1 * 1e3)
            second.append(ttft2 * 1e3)
    prompt_tokens = len(model.encode_chat([system, {"role": "user", "content": QUESTIONS[0]}]))
    return first, second, prompt_tokens


async def many_clients(base, model, clients: int, requests: int, max_tokens: int):
    expected = {
        q: model.chat([{"role": "user", "content": q}], max_new_tokens=max_tokens, keep_cache=False, temperature=0.0)
        for q in QUESTIONS
    }
    latencies, failed, truncated, mixed, tokens = [], 0, 0, 0, 0

    async def one_client(n, http):
        nonlocal failed, truncated, mixed, tokens
        for r in range(requests):
            q = QUESTIONS[(n + r) % len(QUESTIONS)]
            body = {"messages": [{"role": "user", "content": q}], "max_tokens": max_tokens, "temperature": 0}
            t0 = time.perf_counter()
            try:
                response = await http.post(base + "/v1/chat/completions", json=body)
            except httpx.HTTPError:
                failed += 1
                continue
            latencies.append((time.perf_counter() - t0) * 1e3)
            if response.status_code != 200:
                failed += 1
                continue
            answer = response.json()
            choice = answer["choices"][0]
            want = expected[q]
            if choice["message"]["content"] != want.text:
                mixed += 1
            if answer["usage"]["completion_tokens"] != len(want.token_ids):
                truncated += 1
            tokens += answer["usage"]["completion_tokens"]

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients)) as http:
        await asyncio.gather(*(one_client(n, http) for n in range(clients)))
    seconds = time.perf_counter() - started
    return {
        "latency_ms": stats(latencies),
        "failed": failed,
        "truncated": truncated,
        "mixed_up": mixed,
        "requests": clients * requests,
        "tokens_per_s_all_clients": tokens / seconds,
        "seconds": seconds,
    }


async def one_round(base, clients: int, max_tokens: int, offset: int):
    """`clients` streamed chats at once, one each: tokens/s across them, latency and TTFT per request."""
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients)) as http:

        async def one(n):
            messages = [{"role": "user", "content": LONG_ASKS[(offset + n) % len(LONG_ASKS)]}]
            t0 = time.perf_counter()
            ttft, _, _, tokens = await stream_chat(http, base, messages, max_tokens)
            return ttft * 1e3, (time.perf_counter() - t0) * 1e3, tokens

        started = time.perf_counter()
        results = await asyncio.gather(*(one(n) for n in range(clients)))
    seconds = time.perf_counter() - started
    return sum(r[2] for r in results) / seconds, [r[0] for r in results], [r[1] for r in results]


LONG_ASKS = [
    "Write a long story about a robot who learns to paint.",
    "Explain in detail how a bicycle works.",
    "Describe a day in the life of a lighthouse keeper.",
    "Write a long letter to a friend about your garden.",
    "Explain why the seasons change, step by step.",
    "Tell a long story about a cat who sails the sea.",
    "Describe how bread is made, from wheat to loaf.",
    "Write a long essay about the history of clocks.",
]


def scaling(args) -> dict:
    """Tokens/s of 1, 2, 4, 8 concurrent clients on one `--parallel` server, in alternating rounds
    (the machine is shared: ratios within a round, their median), then how often greedy answers of
    4 concurrent clients differ from the same prompts run alone by `generate` in this process."""
    port, solo_port = free_port(), free_port()
    base, solo_base = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{solo_port}"
    server = start_server(serve_command(args.bundle, port, args.threads, 16, args.parallel), base + "/health")
    # The one-request engine (--parallel 1), idle while the other runs: one client alone on it.
    solo_server = start_server(serve_command(args.bundle, solo_port, args.threads, 16, 1), solo_base + "/health")
    counts = (1, 2, 4, 8)
    rates = {c: [] for c in counts}
    solo_rates = []
    ttft, latency = {c: [] for c in counts}, {c: [] for c in counts}
    try:
        asyncio.run(one_round(base, 1, 8, 0))  # warm-up
        asyncio.run(one_round(solo_base, 1, 8, 0))
        for rep in range(args.reps):
            solo_rates.append(asyncio.run(one_round(solo_base, 1, args.max_tokens, rep))[0])
            for c in counts:
                rate, firsts, totals = asyncio.run(one_round(base, c, args.max_tokens, rep))
                rates[c].append(rate)
                ttft[c] += firsts
                latency[c] += totals
        prompts = agreement_prompts(args.agreement_prompts)
        batched = asyncio.run(greedy_answers(base, prompts, 4, 32))
        metrics = httpx.get(base + "/metrics").text
        rss = next(
            float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("edge_slm_peak_rss_megabytes")
        )
    finally:
        for proc in (server, solo_server):
            proc.terminate()
            proc.wait(timeout=30)
    differ = len(answers_differing(args, prompts, batched))
    one = rates[1]
    return {
        "parallel": args.parallel,
        "max_tokens": args.max_tokens,
        "rounds": args.reps,
        "tokens_per_s": {c: stats(rates[c]) for c in counts},
        "vs_one_client": {c: statistics.median(r / o for r, o in zip(rates[c], one)) for c in counts},
        "parallel_1_server_tokens_per_s": stats(solo_rates),
        "vs_parallel_1_server": {c: statistics.median(r / o for r, o in zip(rates[c], solo_rates)) for c in counts},
        "ttft_ms": {c: stats(ttft[c]) for c in counts},
        "latency_ms": {c: stats(latency[c]) for c in counts},
        "peak_rss_mb": rss,
        "greedy_differs_from_solo": f"{differ}/{len(prompts)}",
    }


def agreement_prompts(count: int) -> list[str]:
    """`count` prompts of 12 words from the eval text (it holds about 150 such)."""
    words = EVAL_TEXT.read_text(encoding="utf-8").split()
    if count * 12 > len(words):
        raise SystemExit(f"the eval text has {len(words)} words: at most {len(words) // 12} prompts of 12")
    return [" ".join(words[i * 12 : i * 12 + 12]) for i in range(count)]


def answers_differing(args, prompts: list[str], batched: list[str]) -> list[int]:
    """Indexes of the prompts whose batched greedy answer is not the one `chat` gives alone here."""
    model = runtime.load(args.bundle, threads=args.threads)
    solo = [model.chat([{"role": "user", "content": p}], max_new_tokens=32, keep_cache=False).text for p in prompts]
    return [i for i, (a, b) in enumerate(zip(batched, solo)) if a != b]


def agreement(args) -> dict:
    """Only the greedy agreement: `--agreement-prompts` prompts, 4 at a time on a `--parallel`
    server, against the same prompts run alone by `chat` in this process."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start_server(serve_command(args.bundle, port, args.threads, 16, args.parallel), base + "/health")
    try:
        prompts = agreement_prompts(args.agreement_prompts)
        batched = asyncio.run(greedy_answers(base, prompts, 4, 32))
    finally:
        server.terminate()
        server.wait(timeout=30)
    differ = answers_differing(args, prompts, batched)
    return {
        "parallel": args.parallel,
        "clients": 4,
        "max_tokens": 32,
        "greedy_differs_from_solo": f"{len(differ)}/{len(prompts)}",
        "differing_prompts": differ,
    }


async def greedy_answers(base, prompts, clients: int, max_tokens: int) -> list[str]:
    """Each prompt's greedy answer, `clients` requests in flight at once."""
    answers: list[str] = [""] * len(prompts)
    todo = iter(range(len(prompts)))
    async with httpx.AsyncClient(timeout=600) as http:

        async def worker():
            for i in todo:
                body = {
                    "messages": [{"role": "user", "content": prompts[i]}],
                    "max_tokens": max_tokens,
                    "temperature": 0,
                }
                answers[i] = (await http.post(base + "/v1/chat/completions", json=body)).json()["choices"][0][
                    "message"
                ]["content"]

        await asyncio.gather(*(worker() for _ in range(clients)))
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--parallel", type=int, default=None, help="the server's --parallel [the profile's]")
    parser.add_argument("--scaling", action="store_true", help="only the 1/2/4/8-client sweep and greedy agreement")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--agreement-prompts", type=int, default=100, help="prompts of the greedy agreement check")
    parser.add_argument("--agreement", action="store_true", help="only the greedy agreement of batched and solo")
    args = parser.parse_args()
    if args.scaling or args.agreement:
        if args.agreement:
            result = agreement(args)
            print(f"batched greedy answers differing from solo: {result['greedy_differs_from_solo']}")
        else:
            result = scaling(args)
            summary = ", ".join(f"{c} clients {r:.2f}x" for c, r in result["vs_parallel_1_server"].items())
            print(f"tokens/s against one client on a --parallel 1 server (median of rounds): {summary}")
        cpu = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
        result["cpu_flags"] = [f for f in ("avx512_vnni", "avx_vnni", "avx2") if f in cpu]
        result["bundle"] = str(args.bundle)
        result["threads"] = args.threads
        result["load_average_1m_5m_15m"] = list(os.getloadavg())  # the machine is shared
        print(json.dumps(result, indent=1))
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with open(args.out, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(result) + "\n")
        return
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start_server(serve_command(args.bundle, port, args.threads, args.clients, args.parallel), base + "/health")
    try:
        model = runtime.load(args.bundle, threads=args.threads)
        streamed, served, direct = asyncio.run(single_client(base, model, args.reps, 64))
        first, second, prompt_tokens = asyncio.run(prefix_reuse(base, model, args.reps))
        load = asyncio.run(many_clients(base, model, args.clients, args.requests, 16))
        metrics = httpx.get(base + "/metrics").text
        rss = next(
            float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("edge_slm_peak_rss_megabytes")
        )
    finally:
        server.terminate()
        server.wait(timeout=30)
    ratio = statistics.median(s / d for s, d in zip(served, direct))
    streamed_ratio = statistics.median(s / d for s, d in zip(streamed, direct))
    ttft_ratio = statistics.median(b / a for a, b in zip(first, second))
    manifest = model.manifest
    record = BenchRecord(
        system="edge-slm serve",
        test=f"serve-c{args.clients}x{args.requests}",
        bundle=BundleInfo.of(args.bundle, manifest, None),
        settings=Settings(
            threads=args.threads,
            prompt_tokens=prompt_tokens,
            gen_tokens=64,
            repetitions=args.reps,
            warmup=1,
            provider="CPUExecutionProvider",
            cpu_arena=True,
        ),
        versions={},
        results=DecoderResults.of(
            {
                "decode_tok_s": stats(served),
                "streamed_decode_tok_s": stats(streamed),
                "streamed_vs_generate": streamed_ratio,
                "generate_decode_tok_s": stats(direct),
                "server_vs_generate": ratio,
                "ttft_ms": stats(first),
                "ttft_shared_prefix_ms": stats(second),
                "shared_prefix_ttft_ratio": ttft_ratio,
                "prefill_tok_s": stats([prompt_tokens / (t / 1e3) for t in first]),
                "peak_rss_mb": rss,
                **load,
            }
        ),
    ).to_dict()
    print(
        f"single client: server {statistics.mean(served):.1f} tok/s (its own timing), streamed to the client "
        f"{statistics.mean(streamed):.1f}, generate {statistics.mean(direct):.1f} tok/s; server/generate median "
        f"{ratio:.3f}, streamed/generate {streamed_ratio:.3f}"
    )
    print(
        f"prefix reuse: first {statistics.median(first):.0f} ms, shared {statistics.median(second):.0f} ms "
        f"(ratio {ttft_ratio:.2f}) for a {prompt_tokens}-token prompt"
    )
    print(
        f"{args.clients} clients x {args.requests}: {load['failed']} failed, {load['truncated']} truncated, "
        f"{load['mixed_up']} mixed up; latency p50 {load['latency_ms']['p50']:.0f} ms p99 "
        f"{load['latency_ms']['p99']:.0f} ms; {load['tokens_per_s_all_clients']:.1f} tok/s across clients; "
        f"peak RSS {rss:.0f} MB"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
