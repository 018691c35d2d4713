"""A bounded soak of `edge-slm serve` on 127.0.0.1: ordinary, streaming, abandoning and hostile
clients at once for `--minutes`, and the server's memory and latency before and after.

    .venv/bin/python benchmarks/serve_soak.py BUNDLE [--minutes 10] [--clients 6] [--threads 2]
        [--out benchmarks/results/serve/soak-<host>.jsonl]

Each client loops over one kind of request until the time is up:
- chat: a short greedy chat reply, read whole;
- stream: the same, streamed to `[DONE]`;
- abandon: a long reply the client hangs up on after 0.2 s (non-streamed), or after the first
  chunk (streamed): the server must free the model at once;
- large: a 1.5 MB body of 300 messages (taken, encoded, refused for the context), a 3 MB body
  (413), JSON nested 1,000 deep, a lone surrogate (400 each).
Before and after: the server's RSS (from /proc) and the latency of 10 probe requests (a 12-token
greedy chat reply; median and fastest) with the server otherwise idle. One JSON line is appended to --out:
the counts of every (kind, status), the connection errors, and the numbers before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_load import free_port, start_server  # noqa: E402

CHAT = "/v1/chat/completions"
PROBE = {
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
    "max_tokens": 12,
    "temperature": 0,
}
KINDS = ("chat", "stream", "abandon", "large")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def probe(http: httpx.AsyncClient, base: str, pid: int, reps: int = 10) -> dict:
    """The server idle: its RSS, and the latency of `reps` probe requests (median and fastest: on a
    shared machine the fastest says more about the server), with the load average beside them."""
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        response = await http.post(base + CHAT, json=PROBE)
        response.raise_for_status()
        times.append((time.perf_counter() - started) * 1e3)
    return {
        "rss_mb": round(rss_mb(pid), 1),
        "probe_ms_median": round(statistics.median(times), 1),
        "probe_ms_min": round(min(times), 1),
        "load_average_1m": os.getloadavg()[0],
    }


def hostile_bodies() -> list[tuple[bytes, int]]:
    """(body, the status it must get)."""
    many = {"messages": [{"role": "user", "content": "word " * 1000} for _ in range(300)]}  # 1.5 MB
    huge = {"messages": [{"role": "user", "content": "x" * 60_000} for _ in range(50)]}  # 3 MB
    deep = b'{"messages": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    surrogate = b'{"messages": [{"role": "user", "content": "\\ud800"}]}'
    return [(json.dumps(many).encode(), 400), (json.dumps(huge).encode(), 413), (deep, 400), (surrogate, 400)]


async def client(kind: str, n: int, base: str, until: float, counts: dict, wrong: list) -> None:
    bodies = hostile_bodies()
    question = {"messages": [{"role": "user", "content": f"Tell me about item {n}."}], "temperature": 0}
    async with httpx.AsyncClient(timeout=120, headers={"content-type": "application/json"}) as http:
        i = 0
        while time.monotonic() < until:
            i += 1
            try:
                if kind == "chat":
                    status = (await http.post(base + CHAT, json={**question, "max_tokens": 16})).status_code
                elif kind == "stream":
                    async with http.stream(
                        "POST", base + CHAT, json={**question, "max_tokens": 16, "stream": True}
                    ) as r:
                        status = r.status_code
                        async for line in r.aiter_lines():
                            if line == "data: [DONE]":
                                break
                elif kind == "abandon" and i % 2:
                    try:
                        r = await http.post(base + CHAT, json={**question, "max_tokens": 10_000}, timeout=0.2)
                        status = f"answered {r.status_code}"
                    except httpx.TimeoutException:
                        status = "hung up"
                elif kind == "abandon":
                    async with http.stream(
                        "POST", base + CHAT, json={**question, "max_tokens": 10_000, "stream": True}
                    ) as r:
                        status = r.status_code
                        async for line in r.aiter_lines():
                            if line.startswith("data: {"):
                                break  # leaving the block closes the connection mid-stream
                else:
                    body, expected = bodies[i % len(bodies)]
                    status = (await http.post(base + CHAT, content=body)).status_code
                    if status != expected:
                        wrong.append(f"{kind}: body {i % len(bodies)} got {status}, expected {expected}")
            except httpx.HTTPError as exc:
                status = f"error {type(exc).__name__}"
                wrong.append(f"{kind}: {type(exc).__name__} {exc!r} after {time.monotonic() - until:+.1f} s")
            key = f"{kind} {status}"
            counts[key] = counts.get(key, 0) + 1


async def soak(base: str, pid: int, minutes: float, clients: int) -> dict:
    async with httpx.AsyncClient(timeout=120) as http:
        await probe(http, base, pid, 2)  # warm-up
        before = await probe(http, base, pid)
        counts: dict[str, int] = {}
        wrong: list[str] = []
        until = time.monotonic() + minutes * 60
        await asyncio.gather(*(client(KINDS[n % len(KINDS)], n, base, until, counts, wrong) for n in range(clients)))
        await asyncio.sleep(1)  # abandoned generations end between two tokens
        after = await probe(http, base, pid)
        health = (await http.get(base + "/health")).json()["status"]
        peak = next(
            float(line.split()[1])
            for line in (await http.get(base + "/metrics")).text.splitlines()
            if line.startswith("edge_slm_peak_rss_megabytes ")
        )
    return {
        "before": before,
        "after": after,
        "peak_rss_mb": peak,
        "health_after": health,
        "counts": dict(sorted(counts.items())),
        "wrong_status": wrong[:20],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    port = free_port()
    command = [sys.executable, "-m", "edge_slm.cli", "serve", str(args.bundle), "--port", str(port)]
    proc = start_server([*command, "--threads", str(args.threads)], f"http://127.0.0.1:{port}/health")
    try:
        result = asyncio.run(soak(f"http://127.0.0.1:{port}", proc.pid, args.minutes, args.clients))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    record = {
        "schema": "edge-slm-serve-soak/1",
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "bundle": str(args.bundle),
        "minutes": args.minutes,
        "clients": args.clients,
        "threads": args.threads,
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        **result,
    }
    out = args.out or Path(__file__).parent / "results" / "serve" / f"soak-{platform.node()}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
