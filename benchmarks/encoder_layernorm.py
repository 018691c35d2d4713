"""The same encoder bundles built with each residual add + LayerNorm fused into onnxruntime's
SkipLayerNormalization and left apart (Add + LayerNormalization, `[encoder] fuse_skip_layer_norm
= false`), timed in ONE run: each round measures every bundle in a fresh process (edge-slm's bench
worker: warm-up, repetitions), the pair's order alternating; each ratio is unfused over fused from
the same round (the machine is shared: ratios hold better than absolute numbers).

    # the fused twin of a bundle: the same build with a profile that fuses
    sed 's/^fuse_skip_layer_norm = false/fuse_skip_layer_norm = true/' targets/x86-laptop.toml > /tmp/fused.toml
    .venv/bin/edge-slm build --target /tmp/fused.toml --model all-minilm-l6-v2 --out /tmp/embedder-fused
    nice -n 5 .venv/bin/python benchmarks/encoder_layernorm.py --name x86-vm \\
        --pair embedder=/tmp/embedder-fused,export/x86-laptop-embedder ...

Writes NAME.jsonl (bench records; their free-form `accuracy` field says {set, layer_norm: fused /
unfused, round}) and NAME.md under --out-dir.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from edge_slm.core.errors import EdgeSlmError
from edge_slm.core.worker import run_worker

REPO = Path(__file__).resolve().parent.parent
METRICS = (
    ("texts_per_s_b32", "mean", "texts/s at batch 32", True),
    ("latency_ms_16", "p50", "one text (16 tokens), ms", False),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pair", action="append", required=True, help="NAME=FUSED_BUNDLE,UNFUSED_BUNDLE")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out-dir", default=str(REPO / "benchmarks/results/encoder-layernorm"))
    parser.add_argument("--name", required=True)
    args = parser.parse_args()

    from edge_slm import runtime
    from edge_slm.core.system import cpu_flags
    from edge_slm.runtime.bench import BundleInfo
    from edge_slm.runtime.bench_encoder import encoder_record

    pairs = {}
    for item in args.pair:
        name, _, paths = item.partition("=")
        bundles = paths.split(",")
        if not name or len(bundles) != 2:
            sys.exit(f"--pair {item!r}: give NAME=FUSED_BUNDLE,UNFUSED_BUNDLE")
        pairs[name] = dict(zip(("fused", "unfused"), bundles))
    manifests = {}
    for bundles in pairs.values():
        for kind, path in bundles.items():
            manifest = runtime.load(path, verify=False).manifest
            ops = manifest.graph.op_counts
            if ("SkipLayerNormalization" in ops) != (kind == "fused"):
                sys.exit(f"{path}: its graph is not {kind} (op counts {dict(ops)})")
            manifests[path] = manifest
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records_path = out_dir / f"{args.name}.jsonl"
    records_path.write_text("")
    speed: dict = {}
    for round_number in range(args.rounds):
        for name, bundles in pairs.items():
            order = ("fused", "unfused") if round_number % 2 == 0 else ("unfused", "fused")
            for kind in order:
                path = bundles[kind]
                cfg = {"bundle": path, "threads": args.threads, "repetitions": args.repetitions, "warmup": args.warmup}
                try:
                    raw = run_worker("edge_slm.runtime.bench_encoder:measure_encoder", cfg, what=path)
                except EdgeSlmError as exc:
                    sys.exit(str(exc))
                info = BundleInfo.of(Path(path), manifests[path], None)
                extra = {"set": name, "layer_norm": kind, "round": round_number + 1}
                record = encoder_record(info, args.threads, args.repetitions, args.warmup, raw, extra)
                with open(records_path, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(record) + "\n")
                speed.setdefault((name, kind), []).append(raw)
                print(
                    f"round {round_number + 1} {name} {kind}: b32 {raw['texts_per_s_b32']['mean']:.0f} texts/s, "
                    f"one text {raw['latency_ms_16']['p50']:.2f} ms",
                    file=sys.stderr,
                )
    lines = [
        f"# Residual add + LayerNorm: fused (SkipLayerNormalization) against unfused, `{args.name}`",
        "",
        f"CPU flags: {' '.join(sorted(cpu_flags() & {'avx2', 'fma', 'avx512f', 'avx512_vnni', 'avx_vnni', 'avx512_bf16', 'amx_int8', 'asimddp', 'i8mm'}))}; "
        f"{args.threads} threads, {args.rounds} rounds alternating the order, {args.warmup} warm-up + "
        f"{args.repetitions} runs per measurement, each in a fresh process. Speed: mean over the rounds +- their "
        "spread; ratio: unfused against fused of the same round, mean (lowest-highest).",
        "",
        "| bundle | " + " | ".join(f"{label} fused | unfused | ratio" for _, _, label, _ in METRICS) + " |",
        "|---|" + "---|---|---|" * len(METRICS),
    ]
    for name in pairs:
        cells = []
        for key, stat, _, higher_is_better in METRICS:
            fused = [r[key][stat] for r in speed[(name, "fused")]]
            unfused = [r[key][stat] for r in speed[(name, "unfused")]]
            ratios = [(u / f) if higher_is_better else (f / u) for f, u in zip(fused, unfused)]
            cells += [
                _spread(fused),
                _spread(unfused),
                f"**{statistics.mean(ratios):.2f}x** ({min(ratios):.2f}-{max(ratios):.2f})",
            ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    (out_dir / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _spread(values: list[float]) -> str:
    digits = 0 if statistics.mean(values) > 100 else 2
    return f"{statistics.mean(values):.{digits}f} +- {statistics.pstdev(values):.{digits}f}"


if __name__ == "__main__":
    main()
