"""Per-family parity record: each decoder family of tests/test_architectures.py built as the tests
build it (2 layers, hidden 64, random weights, the test tokenizer, sliding windows of 16), with
the numbers the tests only bound written down: the fp32 bundle's largest logit and present
key/value difference to torch (the build's validate stage), whether its greedy tokens for a prompt
longer than the window equal transformers' `generate` (16 new tokens), and the int8 and int4
builds' agreement with the fp32 graph (the accuracy gate's top-1 and mean KL).

    .venv/bin/python benchmarks/architectures_parity.py --work /tmp/parity \
        --out benchmarks/results/architectures/parity.jsonl --markdown benchmarks/results/architectures/parity.md
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def measure(family: str, work: Path, profile) -> dict:
    from test_architectures import FAMILIES, NEW_TOKENS, PROMPT, make_family_model, reference_tokens

    from edge_slm import runtime
    from edge_slm.builder.pipeline import build

    source, model, tokenizer = make_family_model(work / family / "model", family)
    prompt_ids = tokenizer(PROMPT).input_ids
    manifest = build(str(source), profile, work / family / "fp32", echo=lambda m: None)
    got = runtime.load(work / family / "fp32").generate(prompt_ids, max_new_tokens=NEW_TOKENS).token_ids
    want = reference_tokens(model, prompt_ids)
    record = {
        "family": family,
        "graph": manifest["graph"]["kind"],
        "nodes": manifest["graph"]["nodes"],
        "max_abs_diff": manifest["validation"]["max_abs_diff"],
        "prompt_tokens": len(prompt_ids),
        "greedy_equal": got == want,
        "greedy_tokens": len(want),
    }
    if FAMILIES[family][2] == "fused":
        for precision in ("int8", "int4"):
            built = build(
                str(source),
                profile,
                work / family / precision,
                echo=lambda m: None,
                precision=precision,
                allow_accuracy_loss=True,
            )
            accuracy = built["accuracy"]
            record[precision] = {"top1_agreement": accuracy["top1_agreement"], "mean_kl": accuracy["mean_kl"]}
    return record


def markdown(records: list[dict], when: str) -> str:
    lines = [
        f"Per-family parity, tiny random models (2 layers, hidden 64), x86-laptop profile; {when}.",
        "",
        "| family | graph | nodes | max abs diff: logits / present KV | greedy = transformers (tokens) "
        "| int8 top-1 / KL | int4 top-1 / KL |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        diff = r["max_abs_diff"]
        kv = max((v for k, v in diff.items() if k != "logits"), default=float("nan"))
        quant = [f"{r[p]['top1_agreement']:.3f} / {r[p]['mean_kl']:.1e}" if p in r else "" for p in ("int8", "int4")]
        lines.append(
            f"| {r['family']} | {r['graph']} | {r['nodes']} | {diff['logits']:.1e} / {kv:.1e} | "
            f"{'yes' if r['greedy_equal'] else 'NO'} ({r['greedy_tokens']}) | {quant[0]} | {quant[1]} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="Where the models and bundles go.")
    parser.add_argument("--out", type=Path, required=True, help="JSONL record, one line per family.")
    parser.add_argument("--markdown", type=Path, help="The table, written here too.")
    args = parser.parse_args()
    from conftest import write_profile
    from test_architectures import FAMILIES

    from edge_slm.core.targets import load_profile

    args.work.mkdir(parents=True, exist_ok=True)
    profile = load_profile(
        str(
            write_profile(
                args.work / "tiny.toml",
                "x86-laptop",
                "tiny-laptop",
                export={"context_length": 128},
                quantize={"precision": "fp32"},
            )
        )
    )
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    records = []
    for family in FAMILIES:
        records.append({**measure(family, args.work, profile), "when": when})
        print(json.dumps(records[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in records))
    if args.markdown:
        args.markdown.write_text(markdown(records, when))
    return 0 if all(r["greedy_equal"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
