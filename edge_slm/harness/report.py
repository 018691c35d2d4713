"""Reports from benchmark records: Markdown plus a self-contained HTML page with PNG plots.

    edge-slm report benchmarks/results/*/*.jsonl --out benchmarks/report     (or `make report`)

Reports are pure functions of the records (JSONL, `edge_slm.runtime.bench` schema). Decoders: decode
throughput and time to first token per target and precision, peak memory against bundle size,
accuracy against speed, thread sweeps; the table gives each run's ratio to the fastest fp32
edge-slm run of the same target and host. Encoders (records with `bundle.family` "encoder") get
their own table and plot: latency of one text, texts per second in batches, memory, accuracy, and
each run's throughput against the fastest peer measured on the same host. Bundles of one base
model (pruned or not, int8 or fp32), encoders and decoders, also side by side, in a table and a
plot of accuracy against speed (`report_variants`).
"""

from __future__ import annotations

import base64
import html
import json
from collections import defaultdict
from pathlib import Path

from edge_slm.core.errors import EdgeSlmError
from edge_slm.core.outputs import check_output_folder, output_folder
from edge_slm.harness.report_variants import TITLE, variants_section
from edge_slm.runtime.bench import record_problem
from edge_slm.runtime.bench_results import RESULTS, measured_on, results_of


def read_records(paths: list[Path]) -> list[dict]:
    records = []
    for path in paths:
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise EdgeSlmError(f"{path}: no such results file (run `edge-slm bench ... --out {path}` first)") from None
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                raise EdgeSlmError(f"{path}:{number}: not a JSON record") from None
            problem = record_problem(record)
            if problem:
                raise EdgeSlmError(f"{path}:{number}: {problem}: fix or remove that line")
            records.append(record)
    if not records:
        raise EdgeSlmError("no records in " + ", ".join(map(str, paths)))
    return records


def label(record: dict) -> str:
    b = record["bundle"]
    return (
        f"{record['system']} {b['precision']} {b['target']} ({record['settings']['threads']}t, {measured_on(record)})"
    )


def latest_per_setting(records: list[dict]) -> list[dict]:
    """One record per (system, target, precision, threads, host, test, base model, pruned or not): the newest."""
    newest: dict = {}
    for r in records:
        key = (
            r["system"],
            r["bundle"]["target"],
            r["bundle"]["precision"],
            r["settings"]["threads"],
            measured_on(r),
            r["test"],
            json.dumps(r["bundle"].get("base_model"), sort_keys=True),
            bool(r["bundle"].get("pruned")),
        )
        if key not in newest or r["timestamp"] > newest[key]["timestamp"]:
            newest[key] = r
    return sorted(
        newest.values(),
        key=lambda r: (
            r["bundle"]["target"],
            measured_on(r),
            r["system"] != "edge-slm",
            r["bundle"]["precision"],
            r["settings"]["threads"],
        ),
    )


def decode_rate(record: dict) -> float:
    return results_of(record).decode_tok_s.mean


def comparison_rows(records: list[dict]) -> list[dict]:
    """Each decoder record's cells: the run, its test, the metrics `DecoderResults` declares, the
    bundle's size, accuracy, and decode speed against the fastest fp32 edge-slm run of its
    target and host."""
    baselines = {}
    for r in records:
        if r["system"] == "edge-slm" and r["bundle"]["precision"] == "fp32":
            key = (r["bundle"]["target"], measured_on(r))
            if key not in baselines or decode_rate(r) > decode_rate(baselines[key]):
                baselines[key] = r
    rows = []
    for r in records:
        base = baselines.get((r["bundle"]["target"], measured_on(r)))
        acc = r.get("accuracy") or {}
        rows.append(
            {
                "run": label(r),
                "test": r["test"],
                **results_of(r).cells(),
                "size": f"{r['bundle']['size_bytes'] / 1e6:.0f}",
                "ppl": f"{acc['perplexity']:.2f}" if acc else "-",
                "top1": f"{100 * acc['top1_agreement']:.1f}%" if acc.get("top1_agreement") is not None else "-",
                "vs fp32": f"{decode_rate(r) / decode_rate(base):.2f}x" if base else "-",
            }
        )
    return rows


def decoder_columns() -> list[tuple[str, str]]:
    """(row key, header) of the decoder table: the declared metrics between the run and the rest."""
    return [
        ("run", "run"),
        ("test", "test"),
        *[(name, m.label) for name, m in RESULTS["decoder"].columns()],
        ("size", "bundle MB"),
        ("ppl", "perplexity"),
        ("top1", "top-1 vs fp32"),
        ("vs fp32", "decode vs fp32"),
    ]


def plots(records: list[dict], out: Path) -> list[tuple[str, Path]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    best = {}
    for r in records:  # the best thread count per run for the bar charts
        key = (r["system"], r["bundle"]["target"], r["bundle"]["precision"], measured_on(r))
        if key not in best or decode_rate(r) > decode_rate(best[key]):
            best[key] = r
    runs = list(best.values())
    names = [f"{r['system']}\n{r['bundle']['precision']} {r['bundle']['target']}" for r in runs]

    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(runs) + 4), 4.2))
    for ax, metric, title in (
        (axes[0], "decode_tok_s", "decode throughput (tok/s, higher is better)"),
        (axes[1], "ttft_ms", "time to first token (ms, lower is better)"),
    ):
        means = [getattr(results_of(r), metric).mean for r in runs]
        errs = [getattr(results_of(r), metric).std for r in runs]
        bars = ax.bar(
            range(len(runs)),
            means,
            yerr=errs,
            capsize=4,
            color=["#3b7dd8" if r["system"] == "edge-slm" else "#999999" for r in runs],
        )
        ax.bar_label(bars, fmt="%.0f", padding=2, fontsize=8)
        ax.set_xticks(range(len(runs)), names, fontsize=8)
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"{runs[0]['test']}, best thread count per run", fontsize=10)
    fig.tight_layout()
    made.append(("Speed per target and precision", _save(fig, out / "speed.png")))

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for r in runs:
        ax.scatter(r["bundle"]["size_bytes"] / 1e6, results_of(r).peak_rss_mb, s=60)
        ax.annotate(
            f"{r['system']} {r['bundle']['precision']}",
            (r["bundle"]["size_bytes"] / 1e6, results_of(r).peak_rss_mb),
            fontsize=8,
            xytext=(4, 4),
            textcoords="offset points",
        )
    lim = max(max(r["bundle"]["size_bytes"] / 1e6, results_of(r).peak_rss_mb) for r in runs) * 1.15
    ax.plot([0, lim], [0, lim], ls=":", color="grey", label="RSS = bundle size")
    ax.set_xlim(0, lim), ax.set_ylim(0, lim)
    ax.set_xlabel("bundle size on disk (MB)"), ax.set_ylabel("peak RSS of the process (MB)")
    ax.set_title("memory against bundle size", fontsize=10), ax.legend(fontsize=8)
    fig.tight_layout()
    made.append(("Peak memory against bundle size", _save(fig, out / "memory.png")))

    with_acc = [r for r in runs if r.get("accuracy")]
    if with_acc:
        fig, ax = plt.subplots(figsize=(6, 4.2))
        for r in with_acc:
            ax.scatter(decode_rate(r), r["accuracy"]["perplexity"], s=60)
            ax.annotate(
                f"{r['bundle']['precision']} {r['bundle']['target']}",
                (decode_rate(r), r["accuracy"]["perplexity"]),
                fontsize=8,
                xytext=(4, 4),
                textcoords="offset points",
            )
        ax.set_xlabel("decode tok/s (higher is better)"), ax.set_ylabel("perplexity on eval.txt (lower is better)")
        ax.set_title("accuracy against speed", fontsize=10)
        fig.tight_layout()
        made.append(("Accuracy against speed", _save(fig, out / "accuracy.png")))

    sweeps = defaultdict(list)
    for r in records:
        sweeps[(r["system"], r["bundle"]["target"], r["bundle"]["precision"], measured_on(r))].append(r)
    sweeps = {k: sorted(v, key=lambda r: r["settings"]["threads"]) for k, v in sweeps.items() if len(v) > 1}
    if sweeps:
        fig, ax = plt.subplots(figsize=(6, 4.2))
        for (system, target, precision, host), rs in sweeps.items():
            ax.errorbar(
                [r["settings"]["threads"] for r in rs],
                [decode_rate(r) for r in rs],
                yerr=[results_of(r).decode_tok_s.std for r in rs],
                marker="o",
                capsize=3,
                label=f"{system} {precision} {target}",
            )
        ax.set_xlabel("threads"), ax.set_ylabel("decode tok/s")
        ax.set_title("thread sweep", fontsize=10), ax.legend(fontsize=8)
        fig.tight_layout()
        made.append(("Thread sweep", _save(fig, out / "threads.png")))
    return made


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def is_encoder(record: dict) -> bool:
    from edge_slm.runtime.bench_results import record_family

    return record_family(record) == "encoder"


def encoder_columns() -> list[tuple[str, str]]:
    """(row key, header) of the encoder table: the declared metrics between the run and the rest."""
    return [
        ("run", "run"),
        *[(name, m.label) for name, m in RESULTS["encoder"].columns()],
        ("size", "model MB"),
        ("accuracy", "accuracy"),
        ("vs peer", "batch 32 vs fastest peer"),
    ]


def batch32_rate(record: dict) -> float:
    return results_of(record).texts_per_s_b32.mean


def encoder_rows(records: list[dict]) -> list[dict]:
    fastest = {}
    for r in records:
        if r["system"] != "edge-slm":
            key = measured_on(r)
            if key not in fastest or batch32_rate(r) > batch32_rate(fastest[key]):
                fastest[key] = r
    rows = []
    for r in records:
        acc = r.get("accuracy") or {}
        peer = fastest.get(measured_on(r))
        if "accuracy" in acc:
            accuracy = f"{100 * acc['accuracy']:.1f}% (test split)"
        elif "recall_at_1" in acc:
            accuracy = f"recall@1 {100 * acc['recall_at_1']:.1f}%"
        elif "cosine_to_torch_fp32" in acc:
            accuracy = f"cosine {acc['cosine_to_torch_fp32']:.4f} to torch"
        else:
            accuracy = "-"
        rows.append(
            {
                "run": label(r),
                **results_of(r).cells(),
                "size": f"{r['bundle']['size_bytes'] / 1e6:.0f}",
                "accuracy": accuracy,
                "vs peer": f"{batch32_rate(r) / batch32_rate(peer):.2f}x" if peer else "-",
            }
        )
    return rows


def encoder_plot(records: list[dict], out: Path) -> tuple[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{r['system']}\n{r['bundle']['precision']} {r['bundle']['target']}" for r in records]
    fig, axes = plt.subplots(1, 2, figsize=(max(9, 1.5 * len(records) + 3), 4.6))
    for ax, metric, stat, title in (
        (axes[0], "texts_per_s_b32", "mean", "texts per second, batch 32 (higher is better)"),
        (axes[1], "latency_ms_128", "p50", "one 128-token text, ms p50 (lower is better)"),
    ):
        values = [getattr(getattr(results_of(r), metric), stat) for r in records]
        bars = ax.bar(
            range(len(records)), values, color=["#3b7dd8" if r["system"] == "edge-slm" else "#999999" for r in records]
        )
        ax.bar_label(bars, fmt="%.0f" if stat == "mean" else "%.1f", padding=2, fontsize=8)
        ax.set_xticks(range(len(records)), names, fontsize=7, rotation=30, ha="right")
        ax.set_title(title, fontsize=10)
    fig.suptitle("encoders: edge-slm (blue) and peers (grey), same weights and texts", fontsize=10)
    fig.tight_layout()
    return ("Encoders against their peers", _save(fig, out / "encoders.png"))


def write_report(paths: list[Path], out: Path) -> list[Path]:
    """Write the report folder `out` whole: a new path, an empty folder, or a report folder
    edge-slm wrote before (`core.outputs`); anything else is refused before the records are read."""
    out = Path(out)
    check_output_folder(out)
    every = latest_per_setting(read_records(paths))
    with output_folder(out, "edge-slm report") as staging:
        written = _write_report_files(paths, every, staging)
    return [out / path.name for path in written]


def translation_rows(records: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The translation (seq2seq) table: the metrics `Seq2SeqResults` declares, size and the gate's figures."""
    header = ["run", *[m.label for _, m in RESULTS["seq2seq"].columns()], "model MB", "vs fp32: chrF / BLEU / same"]
    rows = []
    for r in records:
        acc = r.get("accuracy") or {}
        gate = "-"
        if "bleu_vs_fp32" in acc:
            gate = f"{acc['chrf_vs_fp32']:.1f} / {acc['bleu_vs_fp32']:.1f} / {100 * acc['identical_share']:.0f}%"
        rows.append([label(r), *results_of(r).cells().values(), f"{r['bundle']['size_bytes'] / 1e6:.0f}", gate])
    return header, rows


def _write_report_files(paths: list[Path], every: list[dict], out: Path) -> list[Path]:
    from edge_slm.runtime.bench_results import record_family

    translators = [r for r in every if record_family(r) == "seq2seq"]
    records = [r for r in every if not is_encoder(r) and record_family(r) != "seq2seq"]
    encoders = [r for r in every if is_encoder(r)]
    theader, trows = translation_rows(translators)
    figures = plots(records, out) if records else []
    encoder_figures = [encoder_plot(encoders, out)] if encoders else []
    variants_md, variants_html, variants_files = variants_section(encoders + records, out)
    rows = comparison_rows(records)
    erows = encoder_rows(encoders)
    columns, ecolumns = decoder_columns(), encoder_columns()
    hosts = sorted(
        {
            f"{r['host']}: {r['machine']['cpu']} ({r['machine']['arch']}, {r['machine']['cores']} cores, "
            f"flags {' '.join(r['machine']['flags']) or 'n/a'})"
            for r in every
        }
    )
    notes = [
        f"Records: {len(every)} (newest per setting) from {', '.join(str(p) for p in paths)}.",
        "Each figure is the mean ± standard deviation of the repetitions of one invocation, warm-up excluded; "
        "peak RSS is the process's high-water mark with onnxruntime's CPU arena on.",
        "Measured on: " + "; ".join(hosts) + ".",
    ]
    md = [
        "# edge-slm benchmark report",
        "",
        *notes,
        "",
    ]
    if rows:
        md += ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
        md += ["| " + " | ".join(row[k] for k, _ in columns) + " |" for row in rows]
    md += [""] + [f"## {title}\n\n![{title}]({path.name})\n" for title, path in figures]
    if erows:
        md += [
            "## Encoders",
            "",
            "| " + " | ".join(h for _, h in ecolumns) + " |",
            "|" + "---|" * len(ecolumns),
        ]
        md += ["| " + " | ".join(row[k] for k, _ in ecolumns) + " |" for row in erows]
        md += [""] + [f"![{title}]({path.name})\n" for title, path in encoder_figures]
    md += variants_md
    if trows:
        md += ["## Translation", "", "| " + " | ".join(theader) + " |", "|" + "---|" * len(theader)]
        md += ["| " + " | ".join(row) + " |" for row in trows] + [""]
    md_path = out / "report.md"
    md_path.write_text("\n".join(md) + "\n", encoding="utf-8")

    cells = lambda row, tag: "".join(f"<{tag}>{html.escape(str(c))}</{tag}>" for c in row)  # noqa: E731
    body = [
        "<h1>edge-slm benchmark report</h1>",
        *[f"<p>{html.escape(n)}</p>" for n in notes],
    ]
    if rows:
        body += [
            "<table><tr>" + cells([h for _, h in columns], "th") + "</tr>",
            *["<tr>" + cells([row[k] for k, _ in columns], "td") + "</tr>" for row in rows],
            "</table>",
        ]
    if erows:
        body += [
            "<h2>Encoders</h2><table><tr>" + cells([h for _, h in ecolumns], "th") + "</tr>",
            *["<tr>" + cells([row[k] for k, _ in ecolumns], "td") + "</tr>" for row in erows],
            "</table>",
        ]
    body += variants_html
    if trows:
        body += [
            "<h2>Translation</h2><table><tr>" + cells(theader, "th") + "</tr>",
            *["<tr>" + cells(row, "td") + "</tr>" for row in trows],
            "</table>",
        ]
    figures_html = figures + encoder_figures + [(TITLE, path) for path in variants_files]
    for title, path in figures_html:
        data = base64.b64encode(path.read_bytes()).decode()
        body.append(f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' src='data:image/png;base64,{data}'>")
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}img{max-width:100%}"
    )
    html_path = out / "report.html"
    html_path.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>edge-slm benchmark report</title>"
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n",
        encoding="utf-8",
    )
    return [md_path, html_path] + [p for _, p in figures_html]
