"""The report's section for bundles of one base model: pruned against unpruned, int8 against fp32
(`edge_slm.runtime.bench_variants` groups the records and makes the rows): one table per base
model and, per family, one plot of accuracy against speed, a point per bundle (encoders: accuracy
against texts per second at batch 32; decoders: perplexity on eval.txt against decode tokens per
second)."""

from __future__ import annotations

import html
from pathlib import Path

from edge_slm.runtime.bench_results import record_family, results_of
from edge_slm.runtime.bench_variants import (
    FAMILIES,
    columns_of,
    model_name,
    perplexity,
    score,
    variant,
    variant_groups,
    variant_rows,
)

TITLE = "Pruned and unpruned, int8 and fp32"
PLOTS = {"encoder": "encoder-variants.png", "decoder": "decoder-variants.png"}
PLOT = PLOTS["encoder"]


def variants_section(records: list[dict], out: Path) -> tuple[list[str], list[str], list[Path]]:
    """(Markdown lines, HTML parts, files written) of the section; all empty when no group exists."""
    groups = variant_groups(records)
    if not groups:
        return [], [], []
    md = [f"## {TITLE}", ""]
    body = [f"<h2>{html.escape(TITLE)}</h2>"]
    plots = []
    for family in FAMILIES:
        mine = {key: group for key, group in groups.items() if record_family(group[0]) == family}
        for (_, host, threads), group in mine.items():
            rows, columns = variant_rows(group), columns_of(group)
            header = [h for _, h in columns]
            caption = f"{rows[0]['model']} ({family}) on {host}, {threads} threads"
            md += [f"{caption}:", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            md += ["| " + " | ".join(row[k] for k, _ in columns) + " |" for row in rows] + [""]
            cells = lambda values, tag: "".join(f"<{tag}>{html.escape(v)}</{tag}>" for v in values)  # noqa: E731
            body += [f"<p>{html.escape(caption)}:</p><table><tr>{cells(header, 'th')}</tr>"]
            body += [f"<tr>{cells([row[k] for k, _ in columns], 'td')}</tr>" for row in rows] + ["</table>"]
        if mine:
            plot = variants_plot(mine, out / PLOTS[family])
            md += [f"![{AXES[family][1]} against {AXES[family][0]}]({plot.name})", ""]
            plots.append(plot)
    return md, body, plots


# Per family: (the x axis, the y axis) of the plot; what "better" means differs.
AXES = {
    "encoder": ("texts per second, batch 32 (higher is better)", "accuracy"),
    "decoder": ("decode tokens per second (higher is better)", "perplexity on eval.txt (lower is better)"),
}


def _encoder_point(record: dict) -> tuple | None:
    value, kind = score(record)
    rate = results_of(record).texts_per_s_b32
    return None if value is None else (rate.mean, rate.std, 100 * value, f"{kind} % (higher is better)")


def _decoder_point(record: dict) -> tuple | None:
    rate, value = results_of(record).decode_tok_s, perplexity(record)
    return None if value is None else (rate.mean, rate.std, value, AXES["decoder"][1])


# Per family: (speed, its spread, accuracy, the accuracy's axis label) of a record, None without
# accuracy. Records are JSON, not typed manifests: the family string keys the table.
POINTS = {"encoder": _encoder_point, "decoder": _decoder_point}


def _point(record: dict) -> tuple | None:
    return POINTS[record_family(record)](record)


def variants_plot(groups: dict, path: Path) -> Path:
    """Accuracy against speed (mean ± std), one panel per base model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.4), squeeze=False)
    for ax, ((_, host, threads), group) in zip(axes[0], groups.items()):
        family = record_family(group[0])
        ylabel = AXES[family][1]
        for r in group:
            point = _point(r)
            if point is None:
                continue
            speed, spread, value, ylabel = point
            ax.errorbar(
                speed,
                value,
                xerr=spread,
                fmt="o" if r["system"] == "edge-slm" else "s",
                color=("#d8643b" if r["bundle"].get("pruned") else "#3b7dd8") if r["system"] == "edge-slm" else "#999",
                capsize=3,
                markersize=7,
            )
            ax.annotate(variant(r), (speed, value), fontsize=8, xytext=(5, 4), textcoords="offset points")
        ax.set_title(f"{model_name(group[0])} ({host}, {threads} threads)", fontsize=10)
        ax.set_xlabel(AXES[family][0])
        ax.set_ylabel(ylabel)
        ax.margins(0.25)
    fig.suptitle("accuracy against speed: unpruned (blue), pruned (orange), peers (grey)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
