"""The pruning trade-off table and plot (issue #6): pruned models' records + their int8 bundles' bench records.

    # 1. prune (and recover) each setting, 2. build its int8 bundle, 3. bench them side by side with
    #    the unpruned int8 bundle (one `edge-slm bench` run each, --reference the unpruned fp32 bundle)
    .venv/bin/edge-slm prune --out /tmp/pruned/layers8 --layers 8 --recover-steps 1000 --recover-minutes 8
    .venv/bin/edge-slm build --target x86-laptop --model /tmp/pruned/layers8 --out export/x86-laptop-layers8 \
        --allow-accuracy-loss   # these settings measured +93% to +109% perplexity: over the default +15% gate
    .venv/bin/edge-slm bench export/x86-laptop-layers8 --threads 2 --reference export/x86-laptop-fp32 \
        --out benchmarks/results/pruning/vm.jsonl
    .venv/bin/python benchmarks/pruning.py --results benchmarks/results/pruning/vm.jsonl \
        --pruned layers8=/tmp/pruned/layers8 ... --out benchmarks/results/pruning

Writes pruning.md (the table), pruning.json (the rows) and pruning.png (perplexity against decode
speed, before and after recovery). Rows are matched to bundles by their directory name suffix.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edge_slm.runtime.bench_results import results_of


def rows(results: Path, pruned: dict[str, Path]) -> list[dict]:
    records = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    by_bundle: dict[str, list[dict]] = {}
    for r in records:
        if r["bundle"]["precision"] == "int8" and r["settings"]["threads"] == 2:
            by_bundle.setdefault(Path(r["bundle"]["path"]).name, []).append(r)
    base = by_bundle.get("x86-laptop")
    if not base:
        raise SystemExit("no int8 record of the unpruned bundle export/x86-laptop in the results")
    base_tg = sum(results_of(r).decode_tok_s.mean for r in base) / len(base)
    table = [_row("unpruned", None, base, base_tg)]
    for name, directory in pruned.items():
        runs = by_bundle.get(f"x86-laptop-{name}")
        if not runs:
            raise SystemExit(f"no int8 record of export/x86-laptop-{name} in the results")
        record = json.loads((Path(directory) / "edge_slm_prune.json").read_text())
        table.append(_row(name, record, runs, base_tg))
    return table


def _row(name: str, record: dict | None, runs: list[dict], base_tg: float) -> dict:
    tg = [results_of(r).decode_tok_s.mean for r in runs]
    last = runs[-1]
    acc = last.get("accuracy") or {}
    row = {
        "setting": name,
        "parameters": last["bundle"]["parameters"],
        "int8_bundle_mb": last["bundle"]["size_bytes"] / 1e6,
        "decode_tok_s": sum(tg) / len(tg),
        "decode_runs": tg,
        "decode_vs_unpruned_int8": (sum(tg) / len(tg)) / base_tg,
        "ttft_ms": results_of(last).ttft_ms.mean,
        "int8_ppl": acc.get("perplexity"),
        "int8_top1_vs_unpruned_fp32": acc.get("top1_agreement"),
    }
    if record:
        ppl = record["perplexity"]
        row.update(
            {
                "parameters_before": record["parameters_before"],
                "fewer_parameters": 1 - record["parameters_after"] / record["parameters_before"],
                "fp32_ppl_unpruned": ppl["before"],
                "fp32_ppl_pruned": ppl["pruned"],
                "fp32_ppl_recovered": ppl.get("recovered"),
                "top1_pruned": record["top1_agreement"]["pruned"],
                "top1_recovered": record["top1_agreement"].get("recovered"),
                "recovery_steps": (record.get("recovery") or {}).get("steps_done"),
                "recovery_seconds": (record.get("recovery") or {}).get("seconds"),
            }
        )
    return row


def markdown(table: list[dict]) -> str:
    base_ppl = next((r["fp32_ppl_unpruned"] for r in table if "fp32_ppl_unpruned" in r), None)
    lines = [
        "| setting | parameters | fewer | int8 MB | decode tok/s (x unpruned int8) | first token ms | "
        "fp32 ppl pruned -> recovered (vs unpruned) | top-1 pruned -> recovered | int8 ppl / top-1 vs unpruned fp32 | recovery |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        if "fp32_ppl_pruned" in r:
            rec = r["fp32_ppl_recovered"]
            ppl = (
                f"{r['fp32_ppl_pruned']:.1f} -> {rec:.1f} ({100 * (rec / base_ppl - 1):+.0f}%)"
                if rec
                else f"{r['fp32_ppl_pruned']:.1f} (no recovery)"
            )
            top1 = f"{100 * r['top1_pruned']:.0f}% -> {100 * (r['top1_recovered'] or 0):.0f}%"
            fewer = f"{100 * r['fewer_parameters']:.1f}%"
            recovery = (
                f"{r['recovery_steps']} steps, {r['recovery_seconds'] / 60:.0f} min"
                if r.get("recovery_steps")
                else "none"
            )
        else:
            ppl, top1, fewer, recovery = f"{base_ppl:.2f}" if base_ppl else "-", "100%", "-", "-"
        int8 = (
            f"{r['int8_ppl']:.2f} / {100 * r['int8_top1_vs_unpruned_fp32']:.1f}%"
            if r.get("int8_ppl") and r.get("int8_top1_vs_unpruned_fp32") is not None
            else "-"
        )
        lines.append(
            f"| {r['setting']} | {r['parameters'] / 1e6:.1f}M | {fewer} | {r['int8_bundle_mb']:.0f} | "
            f"{r['decode_tok_s']:.1f} ({r['decode_vs_unpruned_int8']:.2f}x) | {r['ttft_ms']:.0f} | {ppl} | {top1} | "
            f"{int8} | {recovery} |"
        )
    return "\n".join(lines) + "\n"


def plot(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base_ppl = next((r["fp32_ppl_unpruned"] for r in table if "fp32_ppl_unpruned" in r), None)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in table:
        x = r["decode_vs_unpruned_int8"]
        if "fp32_ppl_pruned" in r:
            ax.scatter([x], [r["fp32_ppl_pruned"]], marker="x", color="grey")
            if r["fp32_ppl_recovered"]:
                ax.annotate(
                    "",
                    xy=(x, r["fp32_ppl_recovered"]),
                    xytext=(x, r["fp32_ppl_pruned"]),
                    arrowprops={"arrowstyle": "->", "color": "grey"},
                )
                ax.scatter([x], [r["fp32_ppl_recovered"]], color="C0")
            ax.annotate(
                f" {r['setting']} ({100 * r['fewer_parameters']:.0f}% fewer)",
                (x, r["fp32_ppl_recovered"] or r["fp32_ppl_pruned"]),
                fontsize=8,
            )
        else:
            ax.scatter([x], [base_ppl], color="C2")
            ax.annotate(" unpruned", (x, base_ppl), fontsize=8)
    if base_ppl:
        ax.axhline(base_ppl * 1.15, color="C3", linestyle="--", linewidth=1)
        ax.text(ax.get_xlim()[0], base_ppl * 1.15, " goal: +15% perplexity", color="C3", fontsize=8, va="bottom")
    ax.axvline(1.15, color="C3", linestyle=":", linewidth=1)
    ax.set_xlabel("int8 decode speed, x the unpruned int8 bundle (same run)")
    ax.set_ylabel("fp32 perplexity on eval.txt (x: pruned, dot: recovered)")
    ax.set_title("Structured pruning of SmolLM2-135M: speed against perplexity")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--pruned", nargs="+", required=True, help="name=directory of an `edge-slm prune` output")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    pruned = dict(item.split("=", 1) for item in args.pruned)
    table = rows(args.results, {k: Path(v) for k, v in pruned.items()})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pruning.json").write_text(json.dumps(table, indent=2) + "\n")
    (args.out / "pruning.md").write_text(markdown(table))
    plot(table, args.out / "pruning.png")
    print(markdown(table))


if __name__ == "__main__":
    main()
