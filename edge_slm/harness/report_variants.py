"""The report's section for bundles of one base model: pruned against unpruned, int8 against fp32
(`edge_slm.runtime.bench_variants` groups the records and makes the rows): one table per base
model and one plot of accuracy against texts per second at batch 32, a point per bundle."""

from __future__ import annotations

import html
from pathlib import Path

from edge_slm.runtime.bench_results import results_of
from edge_slm.runtime.bench_variants import COLUMNS, score, variant, variant_groups, variant_rows

TITLE = "Pruned and unpruned, int8 and fp32"
PLOT = "encoder-variants.png"


def variants_section(records: list[dict], out: Path) -> tuple[list[str], list[str], list[Path]]:
    """(Markdown lines, HTML parts, files written) of the section; all empty when no group exists."""
    groups = variant_groups(records)
    if not groups:
        return [], [], []
    header = [h for _, h in COLUMNS]
    md = [f"## {TITLE}", ""]
    body = [f"<h2>{html.escape(TITLE)}</h2>"]
    for (_, host, threads), group in groups.items():
        rows = variant_rows(group)
        caption = f"{rows[0]['model']} on {host}, {threads} threads"
        md += [f"{caption}:", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        md += ["| " + " | ".join(row[k] for k, _ in COLUMNS) + " |" for row in rows] + [""]
        cells = lambda values, tag: "".join(f"<{tag}>{html.escape(v)}</{tag}>" for v in values)  # noqa: E731
        body += [f"<p>{html.escape(caption)}:</p><table><tr>{cells(header, 'th')}</tr>"]
        body += [f"<tr>{cells([row[k] for k, _ in COLUMNS], 'td')}</tr>" for row in rows] + ["</table>"]
    plot = variants_plot(groups, out / PLOT)
    md += [f"![accuracy against texts per second]({plot.name})", ""]
    return md, body, [plot]


def variants_plot(groups: dict, path: Path) -> Path:
    """Accuracy against texts per second (batch 32, mean ± std), one panel per base model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.4), squeeze=False)
    for ax, ((_, host, threads), group) in zip(axes[0], groups.items()):
        kind = "accuracy"
        for r in group:
            value, kind = score(r)
            if value is None:
                continue
            rate = results_of(r).texts_per_s_b32
            ax.errorbar(
                rate.mean,
                100 * value,
                xerr=rate.std,
                fmt="o" if r["system"] == "edge-slm" else "s",
                color=("#d8643b" if r["bundle"].get("pruned") else "#3b7dd8") if r["system"] == "edge-slm" else "#999",
                capsize=3,
                markersize=7,
            )
            ax.annotate(variant(r), (rate.mean, 100 * value), fontsize=8, xytext=(5, 4), textcoords="offset points")
        model = str(group[0]["bundle"]["base_model"].get("ref") or "?").rstrip("/").rsplit("/", 1)[-1]
        ax.set_title(f"{model} ({host}, {threads} threads)", fontsize=10)
        ax.set_xlabel("texts per second, batch 32 (higher is better)")
        ax.set_ylabel(f"{kind} % (higher is better)")
        ax.margins(0.25)
    fig.suptitle("accuracy against speed: unpruned (blue), pruned (orange), peers (grey)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
