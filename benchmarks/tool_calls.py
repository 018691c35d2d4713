"""Smart-home tool calls from a decoder bundle, unconstrained vs constrained by the tool-call schema.

    .venv/bin/python benchmarks/tool_calls.py export/x86-laptop --out benchmarks/results/tool-calls/vm.jsonl

For each held-out command of edge_slm/data/smarthome/eval.jsonl the model gets the tool set (as
signatures in the system message), the prompt-tuning set's examples as earlier chat turns, and the
command; it answers with one call {"name": ..., "arguments": {...}}, greedy. Unconstrained, the
first JSON object of its own text is the call; constrained, the schema "a call of one of the tools,
its arguments valid under that function's parameters" masks every token. Scored per command: a
JSON object at all, a valid call (names a tool, its arguments valid under the tool's schema), the
right function, the right arguments (the whole object equal) and the share of expected argument
keys with the right value.

The cost: the tool set's grammar compile time, and decode speed with and without the mask on the
same prompts in one process, alternating (a warm-up first; the spread over repetitions). One JSON
record per run (schema `edge-slm-tool-calls/1`), appended to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import jsonschema

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_slm import runtime  # noqa: E402
from edge_slm.core.data import DATA_DIR  # noqa: E402
from edge_slm.runtime.bench import machine  # noqa: E402
from edge_slm.runtime.grammar import GrammarState, compile_constraint, tool_call_schema  # noqa: E402

SMARTHOME = DATA_DIR / "smarthome"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def signature(function: dict) -> str:
    """`set_lights(room, on: true|false)`: a function as one short line the model can read."""
    parts = []
    properties = function["parameters"]["properties"]
    for key, spec in properties.items():
        if "enum" in spec and key not in ("room", "door"):
            kind = "|".join(spec["enum"])
        elif spec.get("type") == "integer":
            kind = f"{spec.get('minimum', '')}-{spec.get('maximum', '')}"
        elif spec.get("type") == "boolean":
            kind = "true|false"
        else:
            kind = ""
        optional = "" if key in function["parameters"].get("required", []) else "?"
        parts.append(f"{key}{optional}" + (f": {kind}" if kind else ""))
    return f"{function['name']}({', '.join(parts)}): {function['description']}"


def system_message(tools: list[dict]) -> str:
    functions = [t["function"] for t in tools]
    rooms = functions[0]["parameters"]["properties"]["room"]["enum"]
    doors = next(f for f in functions if f["name"] == "lock_door")["parameters"]["properties"]["door"]["enum"]
    return (
        "You control a smart home. Answer each command with one JSON call: "
        '{"name": <function>, "arguments": {...}}.\nFunctions:\n'
        + "\n".join(signature(f) for f in functions)
        + f"\nRooms: {', '.join(rooms)}.\nDoors: {', '.join(doors)}."
    )


def messages_for(command: str, tools: list[dict], examples: list[dict]) -> list[dict]:
    messages = [{"role": "system", "content": system_message(tools)}]
    for example in examples:
        messages += [
            {"role": "user", "content": example["text"]},
            {"role": "assistant", "content": json.dumps(example["call"])},
        ]
    return messages + [{"role": "user", "content": command}]


def first_json_object(text: str):
    """The model's own output as a call: the first JSON value that starts at a "{"."""
    decoder = json.JSONDecoder()
    at = text.find("{")
    while at != -1:
        try:
            return decoder.raw_decode(text, at)[0]
        except json.JSONDecodeError:
            at = text.find("{", at + 1)
    return None


def score(call, expected: dict, parameters: dict) -> dict:
    valid = (
        isinstance(call, dict)
        and set(call) == {"name", "arguments"}
        and call["name"] in parameters
        and isinstance(call["arguments"], dict)
    )
    if valid:
        try:
            jsonschema.validate(call["arguments"], parameters[call["name"]])
        except jsonschema.ValidationError:
            valid = False
    right_function = valid and call["name"] == expected["name"]
    want = expected["arguments"]
    got = call["arguments"] if right_function else {}
    return {
        "json": call is not None,
        "valid": valid,
        "function": right_function,
        "arguments": right_function and got == want,
        "keys": sum(got.get(k, object()) == v for k, v in want.items()) / len(want) if want else float(right_function),
    }


def run_commands(model, commands, tools, examples, constraint, max_new_tokens: int) -> tuple[list[dict], list[dict]]:
    parameters = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    rows, speeds = [], []
    for item in commands:
        ids = model.encode_chat(messages_for(item["text"], tools, examples))
        result = model.generate(
            ids, max_new_tokens=max_new_tokens, keep_cache=True, constraint=constraint, stop=["\n", "<|im_end|>"]
        )
        if constraint is None:
            call = first_json_object(result.text)
        else:  # valid by construction, unless max_new_tokens cut it: then it counts as invalid
            try:
                call = json.loads(result.text)
            except json.JSONDecodeError:
                call = None
        rows.append({"text": item["text"], "output": result.text, **score(call, item["call"], parameters)})
        if len(result.token_ids) > 2:
            speeds.append(result.decode_tokens_per_s)
    return rows, speeds


def mask_times_us(model, constraint, outputs: list[str]) -> list[float]:
    """The grammar's own cost per token, apart from the model: the mask (computed and unpacked to
    a boolean per token) and the parser's step, replayed over the constrained outputs."""
    times = []
    for text in outputs:
        state = GrammarState(constraint, model.grammar_tokenizer(), model.session.vocab_size)
        for token in model.encode(text):
            start = time.perf_counter()
            allowed = state.allowed()
            if not allowed[token]:
                break  # a tokenization other than the model's: the rest is not the model's path
            state.advance(token)
            times.append((time.perf_counter() - start) * 1e6)
    return times


def summary(values: list[float]) -> dict:
    return {
        "median": round(statistics.median(values), 2),
        "min": round(min(values), 2),
        "p90": round(statistics.quantiles(values, n=10, method="inclusive")[-1], 2) if len(values) > 1 else values[0],
        "max": round(max(values), 2),
        "n": len(values),
    }


def percent(rows: list[dict], key: str) -> float:
    return round(100 * sum(float(r[key]) for r in rows) / len(rows), 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, default=0, help="Only the first N held-out commands (0: all).")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--speed-repetitions", type=int, default=5)
    parser.add_argument("--speed-commands", type=int, default=8, help="Commands per speed repetition.")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--outputs", type=Path, help="Write every command's outputs and scores here (JSONL).")
    args = parser.parse_args()

    tools = json.loads((SMARTHOME / "tools.json").read_text())
    examples = read_jsonl(SMARTHOME / "prompt.jsonl")
    commands = read_jsonl(SMARTHOME / "eval.jsonl")
    if args.limit:
        commands = commands[: args.limit]
    model = runtime.load(args.bundle, threads=args.threads)

    compile_ms = []
    for _ in range(5):
        start = time.perf_counter()
        constraint = compile_constraint(schema=tool_call_schema(tools))
        compile_ms.append((time.perf_counter() - start) * 1e3)
    start = time.perf_counter()
    model.grammar_tokenizer()  # llguidance's view of the tokenizer, built once
    tokenizer_ms = (time.perf_counter() - start) * 1e3

    results, constrained_outputs = {}, []
    for mode, used in (("unconstrained", None), ("constrained", constraint)):
        rows, _ = run_commands(model, commands, tools, examples, used, args.max_new_tokens)
        results[mode] = {
            "json_pct": percent(rows, "json"),
            "valid_pct": percent(rows, "valid"),
            "function_pct": percent(rows, "function"),
            "arguments_pct": percent(rows, "arguments"),
            "argument_keys_pct": percent(rows, "keys"),
        }
        print(f"{mode}: {results[mode]}", file=sys.stderr)
        if used is not None:
            constrained_outputs = [row["output"] for row in rows]
        if args.outputs:
            with args.outputs.open("a") as out:
                for row in rows:
                    out.write(json.dumps({"mode": mode, **row}) + "\n")

    # Speed: the same commands with and without the mask, alternating, after a warm-up of each.
    sample = commands[: args.speed_commands]
    for used in (None, constraint):
        run_commands(model, sample[:2], tools, examples, used, args.max_new_tokens)
    speeds = {"unconstrained": [], "constrained": []}
    for repetition in range(args.speed_repetitions):
        order = (("unconstrained", None), ("constrained", constraint))
        for mode, used in order if repetition % 2 == 0 else order[::-1]:
            _, tok_s = run_commands(model, sample, tools, examples, used, args.max_new_tokens)
            speeds[mode].append(statistics.median(tok_s))
    ratio = [c / u for c, u in zip(speeds["constrained"], speeds["unconstrained"])]
    record = {
        "schema": "edge-slm-tool-calls/1",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "bundle": str(args.bundle),
        "precision": model.manifest["precision"],
        "threads": args.threads,
        "machine": machine(),
        "commands": len(commands),
        "prompt_examples": len(examples),
        "tools": len(tools),
        "decoding": "greedy",
        **results,
        "grammar_compile_ms": summary(compile_ms),
        "grammar_tokenizer_ms": round(tokenizer_ms, 1),
        "mask_and_step_us": summary(mask_times_us(model, constraint, constrained_outputs)),
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
