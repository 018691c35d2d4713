"""Bundles of one base model side by side: pruned against unpruned, int8 against fp32 (and any
peer measured on the same weights), from encoder and decoder bench records. A record names the
unpruned model its bundle came from (`bundle.base_model`, the manifest's source or its
`pruned_from`) and what pruning removed (`bundle.pruned`); records of one base model, host and
thread count form a group. Speeds are ratios to the group's unpruned int8 edge-slm bundle,
accuracy is against its unpruned fp32 one: an encoder's accuracy in points (higher is better), a
decoder's perplexity on eval.txt in percent (lower is better), its speed in decode tokens per second.

`edge-slm bench --against` prints the table, `edge-slm report` writes it and the plot of accuracy
against speed. Torch-free (the table runs on the device too).
"""

from __future__ import annotations

from collections import defaultdict

from edge_slm.runtime.bench import text_table
from edge_slm.runtime.bench_results import measured_on, record_family, results_of

FAMILIES = ("encoder", "decoder")
COMMON_COLUMNS = (
    ("model", "base model"),
    ("variant", "bundle"),
    ("removed", "removed"),
    ("params", "params (M)"),
)
COLUMNS = (
    *COMMON_COLUMNS,
    ("b32", "texts/s b32"),
    ("b1", "one text @16 ms p50"),
    ("accuracy", "accuracy"),
    ("b32 ratio", "b32 vs unpruned int8"),
    ("b1 ratio", "one text vs unpruned int8"),
    ("drop", "vs unpruned fp32 (points)"),
)
DECODER_COLUMNS = (
    *COMMON_COLUMNS,
    ("tg", "decode tok/s"),
    ("ppl", "perplexity (lower is better)"),
    ("tg ratio", "decode vs unpruned int8"),
    ("ppl change", "perplexity vs unpruned fp32"),
)


def columns_of(group: list[dict]) -> tuple:
    return VARIANT_TABLES[record_family(group[0])][0]


def perplexity(record: dict) -> float | None:
    """A decoder record's perplexity on eval.txt (None: measured with --no-accuracy)."""
    value = (record.get("accuracy") or {}).get("perplexity")
    return float(value) if isinstance(value, (int, float)) else None


def score(record: dict) -> tuple[float | None, str]:
    """The record's accuracy (a classifier's test accuracy, an embedder's retrieval top-1) and its name."""
    acc = record.get("accuracy") or {}
    if isinstance(acc.get("accuracy"), (int, float)):
        return float(acc["accuracy"]), "test accuracy"
    if isinstance(acc.get("recall_at_1"), (int, float)):
        return float(acc["recall_at_1"]), "retrieval top-1"
    return None, "-"


def is_pruned(record: dict) -> bool:
    return bool(record["bundle"].get("pruned"))


def variant(record: dict) -> str:
    name = f"{'pruned' if is_pruned(record) else 'unpruned'} {record['bundle']['precision']}"
    if record["system"] == "edge-slm":
        return name
    precision = record["bundle"]["precision"]
    return record["system"] if precision in record["system"] else f"{record['system']} {precision}"


def removed(record: dict) -> str:
    pruned = record["bundle"].get("pruned")
    if not pruned:
        return "-"
    parts = []
    if pruned.get("removed_layers"):
        parts.append(f"layers {','.join(map(str, pruned['removed_layers']))}")
    if pruned.get("removed_heads"):
        parts.append(f"{pruned['removed_heads']} heads")
    ffn = pruned.get("ffn_channels") or {}
    if ffn.get("before") and ffn.get("after") and ffn["after"] < ffn["before"]:
        parts.append(f"FFN {ffn['before']}->{ffn['after']}")
    if pruned.get("head_groups"):
        parts.append(f"{pruned['head_groups']} head groups per layer")
    if pruned.get("ffn_share"):
        parts.append(f"FFN -{100 * pruned['ffn_share']:.0f}%")
    return ", ".join(parts) or "nothing"


def variant_groups(records: list[dict]) -> dict[tuple, list[dict]]:
    """Encoder and decoder records grouped by (base model sha256, host, threads), kept where at
    least two different edge-slm bundles (pruned or not, precision) meet; edge-slm first, unpruned
    first. A group holds one family: a base model is an encoder or a decoder."""
    groups = defaultdict(list)
    for r in records:
        base = r["bundle"].get("base_model")
        if record_family(r) in FAMILIES and isinstance(base, dict) and base.get("sha256"):
            groups[(base["sha256"], measured_on(r), r["settings"]["threads"])].append(r)
    kept = {}
    for key, rs in groups.items():
        if len({variant(r) for r in rs if r["system"] == "edge-slm"}) > 1:
            kept[key] = sorted(
                rs, key=lambda r: (r["system"] != "edge-slm", is_pruned(r), r["bundle"]["precision"] != "fp32")
            )
    return kept


def _baseline(group: list[dict], precision: str) -> dict | None:
    return next(
        (r for r in group if r["system"] == "edge-slm" and not is_pruned(r) and r["bundle"]["precision"] == precision),
        None,
    )


def model_name(record: dict) -> str:
    return str((record["bundle"]["base_model"] or {}).get("ref") or "?").rstrip("/").rsplit("/", 1)[-1]


def _common_cells(record: dict) -> dict:
    return {
        "model": model_name(record),
        "variant": variant(record),
        "removed": removed(record),
        "params": f"{record['bundle']['parameters'] / 1e6:.3g}",
    }


def variant_rows(group: list[dict]) -> list[dict]:
    """One row per record of a group: its speed, its accuracy, and both against the unpruned bundles."""
    return VARIANT_TABLES[record_family(group[0])][1](group)


def _encoder_rows(group: list[dict]) -> list[dict]:
    """An encoder's rows: texts per second against the unpruned int8 bundle, accuracy points against the fp32 one."""
    speed_base, accuracy_base = _baseline(group, "int8"), _baseline(group, "fp32")
    base_score = score(accuracy_base)[0] if accuracy_base else None
    rows = []
    for r in group:
        results = results_of(r)
        b32, b1 = results.texts_per_s_b32, results.latency_ms_16
        value, kind = score(r)
        row = {
            **_common_cells(r),
            "b32": f"{b32.mean:.0f} ± {b32.std:.0f}",
            "b1": f"{b1.p50:.2f}",
            "accuracy": "-" if value is None else f"{100 * value:.1f}% ({kind})",
            "b32 ratio": "-",
            "b1 ratio": "-",
            "drop": "-",
        }
        if speed_base is not None:
            row["b32 ratio"] = f"{b32.mean / results_of(speed_base).texts_per_s_b32.mean:.2f}x"
            row["b1 ratio"] = f"{results_of(speed_base).latency_ms_16.p50 / b1.p50:.2f}x"
        if value is not None and base_score is not None:
            row["drop"] = f"{100 * (value - base_score):+.1f}"
        rows.append(row)
    return rows


def _decoder_rows(group: list[dict]) -> list[dict]:
    """A decoder's rows: decode speed against the unpruned int8 bundle, perplexity against the unpruned fp32 one."""
    speed_base, accuracy_base = _baseline(group, "int8"), _baseline(group, "fp32")
    base_ppl = perplexity(accuracy_base) if accuracy_base else None
    rows = []
    for r in group:
        decode, ppl = results_of(r).decode_tok_s, perplexity(r)
        row = {
            **_common_cells(r),
            "tg": f"{decode.mean:.1f} ± {decode.std:.1f}",
            "ppl": "-" if ppl is None else f"{ppl:.2f}",
            "tg ratio": "-",
            "ppl change": "-",
        }
        if speed_base is not None:
            row["tg ratio"] = f"{decode.mean / results_of(speed_base).decode_tok_s.mean:.2f}x"
        if ppl is not None and base_ppl:
            row["ppl change"] = f"{100 * (ppl / base_ppl - 1):+.1f}%"
        rows.append(row)
    return rows


# A record's family (a string: records are JSON, not typed manifests) -> its columns and rows.
VARIANT_TABLES = {"encoder": (COLUMNS, _encoder_rows), "decoder": (DECODER_COLUMNS, _decoder_rows)}


def variants_table(records: list[dict]) -> str:
    """The terminal tables of every group in `records`, one per family ("" when no two bundles of
    one base model meet)."""
    tables = []
    for family in FAMILIES:
        groups = [g for g in variant_groups(records).values() if record_family(g[0]) == family]
        rows = [row for group in groups for row in variant_rows(group)]
        if rows:
            columns = columns_of(groups[0])
            tables.append(text_table([h for _, h in columns], [[row[k] for k, _ in columns] for row in rows]))
    return "\n\n".join(tables)
