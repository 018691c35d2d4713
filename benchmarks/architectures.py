"""Decode speed of every fused decoder family against a same-shape Llama, side by side in one run.

    .venv/bin/python benchmarks/architectures.py --work /tmp/architectures --rounds 30 \
        --out benchmarks/results/architectures/vm.jsonl --markdown benchmarks/results/architectures/vm.md

Each family gets a random model of one shape (hidden 256, 4 layers, 4 heads of 64, 2 KV heads, MLP
768, the test tokenizer's 300-token vocabulary, each family's own features as in
tests/test_architectures.py, sliding windows of 16), built by `edge-slm build` at int8 with the
x86-laptop profile (context 256; random weights, hence --allow-accuracy-loss). All bundles are
loaded in one process; after one warm-up each, every round runs pp128+tg64 (greedy, as `edge-slm
bench`) on each family's bundle and on the Llama bundle back to back, the pair's order and the
pairs' order reversing every round; within a round each side runs `--best-of` times, interleaved,
and its fastest run counts; each pair gives one ratio (the family's decode tok/s over
Llama's), and the record keeps every pair's samples (each side's fastest run) and ratio. The Llama bundle also runs in a second
session against itself (the noise floor), and the generic (optimum) graphs of the Llama and Qwen3
models against their fused graphs. Nodes per layer are counted in the fp32 fused graph (its last
layer). The machine is shared: compare ratios, not absolute rates.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

SHAPE = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
HEAD_DIM = 64
PROMPT_TOKENS, GEN_TOKENS = 128, 64


def family_settings() -> dict[str, tuple[str, dict]]:
    """The families of tests/test_architectures.py at the benchmark's shape (heads of 64 everywhere)."""
    from test_architectures import FAMILIES

    families = {"llama": ("LlamaConfig", {})}
    for name, (config_class, settings, graph) in FAMILIES.items():
        if graph != "fused" or name == "llama-head24":
            continue
        settings = {**settings, "num_attention_heads": 4, "num_key_value_heads": 2}
        if "head_dim" in settings or name in ("gemma", "gemma2", "gemma3_text", "qwen3"):
            settings["head_dim"] = HEAD_DIM
        if name == "smollm3":
            settings["no_rope_layers"] = [1, 1, 1, 0]
        if name == "gemma3_text":
            settings["layer_types"] = ["sliding_attention"] * 3 + ["full_attention"]
        families[name] = (config_class, settings)
    return families


def make_model(directory: Path, config_class: str, settings: dict):
    import torch
    import transformers
    from conftest import make_tokenizer
    from transformers import AutoModelForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(directory)
    common = dict(
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        **SHAPE,
    )
    config = getattr(transformers, config_class)(**{**common, **settings})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    model.save_pretrained(directory, safe_serialization=True)
    return model


def nodes_per_layer(model, profile, out: Path) -> dict:
    """Nodes of the last layer in the fp32 fused graph (the first has no residual Add to make
    where a family has no pre-norm), and their op types."""
    import onnx

    from edge_slm.builder.decoder.export import export

    exported = export(model, profile, out)
    nodes = onnx.load(str(exported.onnx_path), load_external_data=False).graph.node
    last = model.config.num_hidden_layers - 1
    layer = [n for n in nodes if n.name.startswith((f"l{last}.", f"present.{last}."))]
    ops: dict[str, int] = {}
    for n in layer:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return {"graph": exported.graph, "nodes_per_layer": len(layer), "total_nodes": len(nodes), "layer_ops": ops}


def build_all(work: Path, families: dict, generic: list[str]) -> tuple[dict, dict]:
    import dataclasses

    from conftest import write_profile

    from edge_slm.builder.pipeline import build
    from edge_slm.core.targets import load_profile

    work.mkdir(parents=True, exist_ok=True)
    fused_path = write_profile(work / "fused.toml", "x86-laptop", "arch-bench", export={"context_length": 256})
    generic_path = write_profile(
        work / "generic.toml", "x86-laptop", "arch-bench-generic", export={"context_length": 256, "graph": "generic"}
    )
    fused, generic_profile = load_profile(str(fused_path)), load_profile(str(generic_path))
    fp32 = dataclasses.replace(fused, quantize=dataclasses.replace(fused.quantize, precision="fp32"))
    bundles, counts = {}, {}
    for name, (config_class, settings) in families.items():
        source = work / name / "model"
        model = make_model(source, config_class, settings)
        counts[name] = nodes_per_layer(model, fp32, work / name / "fp32-graph")
        for kind, profile in [("fused", fused), ("generic", generic_profile)]:
            if kind == "generic" and name not in generic:
                continue
            out = work / name / f"int8-{kind}"
            if not (out / "manifest.json").is_file():
                manifest = build(str(source), profile, out, echo=lambda m: None, allow_accuracy_loss=True)
                assert manifest["graph"]["kind"] == kind, (name, kind, manifest["graph"]["kind"])
            bundles[f"{name} {kind}"] = out
        print(f"built {name}: {counts[name]['nodes_per_layer']} nodes per layer", file=sys.stderr)
    return bundles, counts


def measure(bundles: dict, pairs: dict[str, str], rounds: int, threads: int, best_of: int = 1) -> dict:
    """`pairs` maps a bundle to the one it is compared with. Every round runs each pair back to
    back (A-B in even rounds, B-A in odd ones, the pairs in reversed order too), so a ratio
    compares two runs seconds apart. With `best_of` k, a pair's sample is each side's fastest of k
    runs interleaved A-B-A-B: a decode of 64 tokens of these models takes milliseconds, so one
    burst of another process's work would otherwise decide a ratio. Returns {bundle: [run, ...]}
    and {bundle: [ratio, ...]}."""
    from edge_slm import runtime
    from edge_slm.runtime.bench import greedy_steps, prompt_ids, timed_runs

    models = {name: runtime.load(path, threads=threads, verify=False) for name, path in bundles.items()}
    ids = prompt_ids(next(iter(models.values())), PROMPT_TOKENS)  # one tokenizer for all

    def once(model) -> dict:
        t = timed_runs(*greedy_steps(model.session), ids, GEN_TOKENS, repetitions=1, warmup=0)
        return {"decode_tok_s": t["decode_tok_s"]["mean"], "prefill_tok_s": t["prefill_tok_s"]["mean"]}

    for model in models.values():  # warm-up: allocations and prepacking stay out of the figures
        once(model)
    samples: dict[str, list[dict]] = {name: [] for name in models}
    pair_ratios: dict[str, list[float]] = {name: [] for name in pairs}
    order = list(pairs)
    for r in range(rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            tries: dict[str, list[dict]] = {name: [], pairs[name]: []}
            for _ in range(best_of):
                for which in (name, pairs[name]) if r % 2 == 0 else (pairs[name], name):
                    tries[which].append(once(models[which]))
            runs = {which: max(runs, key=lambda run: run["decode_tok_s"]) for which, runs in tries.items()}
            for which, run in runs.items():
                samples[which].append(run)
            pair_ratios[name].append(runs[name]["decode_tok_s"] / runs[pairs[name]]["decode_tok_s"])
        print(f"round {r + 1}/{rounds} done", file=sys.stderr)
    return samples, pair_ratios


def ratio_summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "samples": values}


def spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.0f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.0f}"


def markdown(record: dict) -> str:
    lines = [
        f"Decode of pp{PROMPT_TOKENS}+tg{GEN_TOKENS}, int8 (x86-laptop recipe), {record['threads']} threads, "
        f"{record['rounds']} alternating rounds (each side of a pair the fastest of {record.get('best_of', 1)} "
        f"interleaved runs) on a shared {record['machine']['cores']}-core "
        f"{record['machine']['cpu']} ({', '.join(record['machine']['flags'])}); {record['date']}.",
        "",
        "| family | nodes per layer (Llama +) | decode tok/s | / Llama (median, range) |",
        "|---|---|---|---|",
    ]
    base = record["families"]["llama"]["nodes_per_layer"]
    for name, row in record["families"].items():
        r = row["ratio_to_llama"]
        lines.append(
            f"| {name} | {row['nodes_per_layer']} ({row['nodes_per_layer'] - base:+d}) | {row['decode_tok_s']} | "
            f"{r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f}) |"
        )
    aa = record["same_bundle_again"]["ratio_to_llama"]
    lines.append(
        f"| llama, same bundle in a second session (noise floor) | - | {record['same_bundle_again']['decode_tok_s']} | "
        f"{aa['median']:.2f} ({aa['min']:.2f}-{aa['max']:.2f}) |"
    )
    lines += ["", "| model | generic decode tok/s | fused decode tok/s | generic / fused (median, range) |"]
    lines += ["|---|---|---|---|"]
    for name, row in record["generic_vs_fused"].items():
        r = row["ratio"]
        lines.append(
            f"| {name} | {row['generic_tok_s']} | {row['fused_tok_s']} | "
            f"{r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f}) |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="Where the models and bundles go (reused).")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--best-of", type=int, default=5, help="Interleaved runs per side of a pair; the fastest counts."
    )
    parser.add_argument("--generic", default="llama,qwen3", help="Models also built through the generic graph.")
    parser.add_argument("--out", type=Path, help="Append the record (JSONL) here.")
    parser.add_argument("--markdown", type=Path, help="Write the tables here.")
    args = parser.parse_args()

    from edge_slm.runtime.bench import git_commit, machine

    families = family_settings()
    generic = [g for g in args.generic.split(",") if g]
    bundles, counts = build_all(args.work, families, generic)
    # The noise floor: the Llama bundle in a second session against itself (an A/A pair).
    bundles["llama again"] = bundles["llama fused"]
    pairs = {"llama again": "llama fused"}
    pairs.update({f"{name} fused": "llama fused" for name in families if name != "llama"})
    pairs.update({f"{name} generic": f"{name} fused" for name in generic})
    samples, pair_ratios = measure(bundles, pairs, args.rounds, args.threads, args.best_of)
    pair_ratios["llama fused"] = [1.0] * args.rounds
    record = {
        "schema": "edge-slm-architectures/1",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "shape": {**SHAPE, "head_dim": HEAD_DIM, "vocab": 300, "context": 256},
        "workload": f"pp{PROMPT_TOKENS}+tg{GEN_TOKENS}",
        "precision": "int8",
        "threads": args.threads,
        "rounds": args.rounds,
        "best_of": args.best_of,
        "warmup": 1,
        "machine": machine(),
        "families": {
            name: {
                **counts[name],
                "decode_tok_s": spread([s["decode_tok_s"] for s in samples[f"{name} fused"]]),
                "ratio_to_llama": ratio_summary(pair_ratios[f"{name} fused"]),
            }
            for name in families
        },
        "same_bundle_again": {
            "decode_tok_s": spread([s["decode_tok_s"] for s in samples["llama again"]]),
            "ratio_to_llama": ratio_summary(pair_ratios["llama again"]),
        },
        "generic_vs_fused": {
            name: {
                "generic_tok_s": spread([s["decode_tok_s"] for s in samples[f"{name} generic"]]),
                "fused_tok_s": spread([s["decode_tok_s"] for s in samples[f"{name} fused"]]),
                "ratio": ratio_summary(pair_ratios[f"{name} generic"]),
            }
            for name in generic
        },
        "samples": samples,
    }
    text = markdown(record)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            f.write(json.dumps(record) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
