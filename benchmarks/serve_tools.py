"""Smart-home tool calls as a client of `edge-slm serve` gets them: the held-out commands sent with
the tool set as OpenAI `tools`, scored from the reply's `tool_calls`; the server's grammars'
compile time; decode speed with and without the tool-call grammar through the server.

    .venv/bin/python benchmarks/serve_tools.py export/x86-laptop --out benchmarks/results/tool-calls/serve-vm.jsonl

Each command goes in a conversation whose earlier turns are the first --shots examples of
edge_slm/data/smarthome/prompt.jsonl (a command, then the assistant's call as `tool_calls`), with
all 13 functions in `tools`; greedy, one client, so the server reuses the cached prefix (the tool
descriptions and the examples) and runs only the command. Two modes: `tool_choice: "auto"` (the
model may answer in text: then it made no call) and `"required"` with `parallel_tool_calls: false`.
Scored as benchmarks/tool_calls.py scores: a valid call, the right function, the right arguments.

Speed: the same conversations with `"required"` (the grammar masks every token) and, as the
baseline, the identical prompt sent without `tools` (the server's own tool description pasted
into the system message: the same prompt tokens, no grammar), alternating per repetition after a
warm-up of each; the server's `timings.predicted_per_second`, median per repetition, and the
ratio of each repetition's pair. One record (schema `edge-slm-serve-tool-calls/1`) appended to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_load import free_port, serve_command, start_server  # noqa: E402
from tool_calls import SMARTHOME, percent, read_jsonl, score, summary  # noqa: E402

from edge_slm.runtime.bench import machine  # noqa: E402
from edge_slm.serve import tools as serve_tools  # noqa: E402


def conversation(command: str, examples: list[dict]) -> list[dict]:
    messages = []
    for n, example in enumerate(examples):
        call = example["call"]
        function = {"name": call["name"], "arguments": json.dumps(call["arguments"])}
        messages += [
            {"role": "user", "content": example["text"]},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": f"call_{n}", "type": "function", "function": function}],
            },
        ]
    return messages + [{"role": "user", "content": command}]


def ask(http: httpx.Client, messages: list[dict], max_tokens: int, **fields) -> dict:
    body = {"messages": messages, "temperature": 0, "max_tokens": max_tokens, **fields}
    answer = http.post("/v1/chat/completions", json=body)
    answer.raise_for_status()
    return answer.json()


def first_call(reply: dict):
    calls = reply["choices"][0]["message"].get("tool_calls") or []
    if not calls:
        return None
    try:
        return {"name": calls[0]["function"]["name"], "arguments": json.loads(calls[0]["function"]["arguments"])}
    except json.JSONDecodeError:  # cut by max_tokens
        return None


def compile_times(tools: list[dict], repetitions: int = 7) -> dict:
    """The server's grammars for the tool set, compiled afresh (the server caches them per tool set)."""
    text = json.dumps(tools)
    cases = {
        "required": lambda: serve_tools._tool_grammar.__wrapped__(text, False, True),
        "required_one_call": lambda: serve_tools._tool_grammar.__wrapped__(text, False, False),
        "auto": lambda: serve_tools._tool_grammar.__wrapped__(text, True, True),
        "json_object": lambda: serve_tools._schema_constraint.__wrapped__('{"type": "object"}'),
    }
    out = {}
    for name, compile_once in cases.items():
        compile_once()  # warm-up
        times = []
        for _ in range(repetitions):
            start = time.perf_counter()
            compile_once()
            times.append((time.perf_counter() - start) * 1e3)
        out[name] = summary(times)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--shots", type=int, default=4, help="Examples of prompt.jsonl as earlier turns.")
    parser.add_argument("--limit", type=int, default=0, help="Only the first N held-out commands (0: all).")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--speed-repetitions", type=int, default=5)
    parser.add_argument("--speed-commands", type=int, default=8)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    tools = json.loads((SMARTHOME / "tools.json").read_text())
    parameters = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    examples = read_jsonl(SMARTHOME / "prompt.jsonl")[: args.shots]
    commands = read_jsonl(SMARTHOME / "eval.jsonl")
    if args.limit:
        commands = commands[: args.limit]
    compiled = compile_times(tools)
    print(f"grammar compile ms: {compiled}", file=sys.stderr)

    port = free_port()
    command = serve_command(args.bundle, port, args.threads, 8, args.parallel)
    base = f"http://127.0.0.1:{port}"
    server = start_server(command, base + "/health")
    try:
        http = httpx.Client(base_url=base, timeout=300)
        template = json.loads((args.bundle / "generation.json").read_text())["chat_template"]
        results, prompt_tokens = {}, 0
        modes = {
            "auto": {"tools": tools},
            "required": {"tools": tools, "tool_choice": "required", "parallel_tool_calls": False},
        }
        for mode, fields in modes.items():
            rows = []
            for item in commands:
                reply = ask(http, conversation(item["text"], examples), args.max_tokens, **fields)
                prompt_tokens = max(prompt_tokens, reply["usage"]["prompt_tokens"])
                rows.append(score(first_call(reply), item["call"], parameters))
            results[mode] = {
                "called_pct": percent(rows, "json"),
                "valid_pct": percent(rows, "valid"),
                "function_pct": percent(rows, "function"),
                "arguments_pct": percent(rows, "arguments"),
                "argument_keys_pct": percent(rows, "keys"),
            }
            print(f"{mode}: {results[mode]}", file=sys.stderr)

        # Speed: the grammar against the same prompt without it.
        structure = serve_tools.structure({"tools": tools})
        sample = commands[: args.speed_commands]

        def pasted(text: str) -> list[dict]:
            rendered, _ = serve_tools.prompt_messages(conversation(text, examples), structure, template, [])
            return rendered

        def run(constrained: bool) -> float:
            speeds = []
            for item in sample:
                if constrained:
                    reply = ask(http, conversation(item["text"], examples), args.max_tokens, **modes["required"])
                else:
                    reply = ask(http, pasted(item["text"]), args.max_tokens)
                if reply["usage"]["completion_tokens"] > 2:
                    speeds.append(reply["timings"]["predicted_per_second"])
            return statistics.median(speeds)

        run(False), run(True)  # warm-up
        speeds = {"unconstrained": [], "constrained": []}
        for repetition in range(args.speed_repetitions):
            order = (False, True) if repetition % 2 == 0 else (True, False)
            for constrained in order:
                speeds["constrained" if constrained else "unconstrained"].append(run(constrained))
        ratio = [c / u for c, u in zip(speeds["constrained"], speeds["unconstrained"])]
    finally:
        server.terminate()
        server.wait(timeout=30)
    record = {
        "schema": "edge-slm-serve-tool-calls/1",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "bundle": str(args.bundle),
        "threads": args.threads,
        "parallel": args.parallel,
        "machine": machine(),
        "commands": len(commands),
        "shots": len(examples),
        "tools": len(tools),
        "prompt_tokens_max": prompt_tokens,
        "decoding": "greedy",
        **results,
        "grammar_compile_ms": compiled,
        "decode_tok_s": {mode: summary(values) for mode, values in speeds.items()},
        "constrained_over_unconstrained_decode": summary(ratio),
    }
    print(json.dumps(record, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as out:
            out.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
