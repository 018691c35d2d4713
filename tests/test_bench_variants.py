"""Bundles of one base model side by side (pruned against unpruned, int8 against fp32) in
`edge-slm bench --against` and `edge-slm report`, on the tiny embedder: its fp32 and int8 bundles
and an int8 bundle of it pruned (no recovery), each benchmarked for real (one repetition)."""

from __future__ import annotations

import json

import pytest

from edge_slm.harness.report import write_report
from edge_slm.runtime.bench_results import results_of


@pytest.fixture(scope="module")
def pruned_embedder_bundle(tiny_embedder, encoder_profile, tmp_path_factory):
    from edge_slm.builder.pipeline import build
    from edge_slm.builder.prune.encoder import EncoderPruneSettings, prune_encoder_directory
    from edge_slm.core.targets import load_profile

    root = tmp_path_factory.mktemp("pruned-embedder")
    prune_encoder_directory(str(tiny_embedder), EncoderPruneSettings(layers=1, heads=0.5, ffn=0.5), root / "model")
    out = root / "int8"
    build(str(root / "model"), load_profile(str(encoder_profile)), out, echo=lambda m: None, allow_accuracy_loss=True)
    return out


@pytest.fixture(scope="module")
def bench_runs(embedder_bundles, pruned_embedder_bundle, tmp_path_factory):
    """Records of the unpruned fp32 and int8 bundles in one file, and the pruned bundle's run
    with `--against` that file: (records, the pruned run's records, what that run printed)."""
    return bench_side_by_side(tmp_path_factory.mktemp("variant-records"), embedder_bundles, pruned_embedder_bundle)


def bench_side_by_side(root, unpruned_bundles, pruned_bundle, *options: str):
    """`edge-slm bench` (one quick run, `options` added) of the unpruned bundles into one file, then
    of the pruned bundle with `--against` it: (the unpruned records, the pruned run's records, what
    that run printed, `root`)."""
    import subprocess
    import sys
    from pathlib import Path

    unpruned, pruned = root / "unpruned.jsonl", root / "pruned.jsonl"
    bench = [str(Path(sys.executable).parent / "edge-slm"), "bench", "-r", "1", "--warmup", "0", "--threads", "1"]
    bench += list(options)
    for bundle in unpruned_bundles:
        subprocess.run([*bench, str(bundle), "--out", str(unpruned)], check=True, capture_output=True)
    printed = subprocess.run(
        [*bench, str(pruned_bundle), "--out", str(pruned), "--against", str(unpruned)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    read = lambda path: [json.loads(line) for line in path.read_text().splitlines()]  # noqa: E731
    return read(unpruned), read(pruned), printed, root


def test_records_name_the_base_model_and_what_pruning_removed(bench_runs, tiny_embedder):
    unpruned, (pruned,), _, _ = bench_runs
    fp32, int8 = unpruned
    assert fp32["bundle"]["base_model"] == int8["bundle"]["base_model"] == pruned["bundle"]["base_model"]
    assert fp32["bundle"]["base_model"]["ref"] == str(tiny_embedder)
    assert fp32["bundle"]["pruned"] is None and int8["bundle"]["pruned"] is None
    # the tiny BERT: 2 layers of 4 heads and 64 FFN channels; one layer, half the heads and channels go
    assert pruned["bundle"]["pruned"]["removed_layers"] == [pruned["bundle"]["pruned"]["removed_layers"][0]]
    assert pruned["bundle"]["pruned"]["removed_heads"] == 2
    assert pruned["bundle"]["pruned"]["ffn_channels"] == {"before": 64, "after": 32}
    assert pruned["bundle"]["parameters"] == pruned["bundle"]["pruned"]["parameters_after"]
    assert pruned["bundle"]["parameters"] < int8["bundle"]["parameters"]


def cells_by_bundle(lines: list[str]) -> dict[str, dict[str, str]]:
    """A printed or Markdown table's rows as {bundle: {header: cell}}."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines if line.startswith("|")]
    rows = [row for row in rows if not set("".join(row)) <= {"-"}]
    header = rows[0]
    return {row[1]: dict(zip(header, row)) for row in rows[1:]}


def test_bench_against_prints_the_side_by_side_table(bench_runs):
    (fp32, int8), (pruned,), printed, _ = bench_runs
    table = cells_by_bundle([line for line in printed.splitlines() if "base model" in line or "pruned" in line])
    assert list(table) == ["unpruned fp32", "unpruned int8", "pruned int8"]
    b32 = lambda r: results_of(r).texts_per_s_b32.mean  # noqa: E731
    b1 = lambda r: results_of(r).latency_ms_16.p50  # noqa: E731
    mine = table["pruned int8"]
    assert mine["b32 vs unpruned int8"] == f"{b32(pruned) / b32(int8):.2f}x"
    assert mine["one text vs unpruned int8"] == f"{b1(int8) / b1(pruned):.2f}x"
    assert (
        mine["texts/s b32"] == f"{b32(pruned):.0f} ± 0"
        and mine["params (M)"] == f"{pruned['bundle']['parameters'] / 1e6:.3g}"
    )
    assert table["unpruned fp32"]["b32 vs unpruned int8"] == f"{b32(fp32) / b32(int8):.2f}x"
    assert table["unpruned int8"]["b32 vs unpruned int8"] == "1.00x"
    drop = 100 * (pruned["accuracy"]["recall_at_1"] - fp32["accuracy"]["recall_at_1"])
    assert (
        mine["vs unpruned fp32 (points)"] == f"{drop:+.1f}"
        and table["unpruned fp32"]["vs unpruned fp32 (points)"] == "+0.0"
    )
    assert mine["accuracy"] == f"{100 * pruned['accuracy']['recall_at_1']:.1f}% (retrieval top-1)"
    assert mine["removed"] == f"layers {pruned['bundle']['pruned']['removed_layers'][0]}, 2 heads, FFN 64->32"
    assert table["unpruned int8"]["removed"] == "-" and mine["base model"] == table["unpruned fp32"]["base model"]


def test_report_puts_the_bundles_of_one_base_model_side_by_side(bench_runs):
    unpruned, pruned, _, root = bench_runs
    paths = write_report([root / "unpruned.jsonl", root / "pruned.jsonl"], root / "report")
    plot = root / "report" / "encoder-variants.png"
    assert plot in paths and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
    md = (root / "report" / "report.md").read_text()
    section = md.split("## Pruned and unpruned, int8 and fp32")[1].split("![")[0]
    table = cells_by_bundle(section.splitlines())
    assert list(table) == ["unpruned fp32", "unpruned int8", "pruned int8"]
    int8, mine = unpruned[1], pruned[0]
    ratio = results_of(mine).texts_per_s_b32.mean / results_of(int8).texts_per_s_b32.mean
    assert table["pruned int8"]["b32 vs unpruned int8"] == f"{ratio:.2f}x"
    assert table["pruned int8"]["removed"].endswith("2 heads, FFN 64->32")
    assert "encoder-variants.png" in md and "Pruned and unpruned" in (root / "report" / "report.html").read_text()


def test_records_without_a_base_model_make_no_group():
    from test_bench import OLD_ENCODER_LINE

    from edge_slm.runtime.bench_variants import variant_groups, variants_table

    old = json.loads(OLD_ENCODER_LINE)
    fp32 = {**old, "bundle": {**old["bundle"], "precision": "fp32"}}
    assert variant_groups([old, fp32]) == {} and variants_table([old, fp32]) == ""


def test_against_a_file_that_is_not_bench_records_is_refused_before_the_benchmark(embedder_bundles, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    bench = [str(Path(sys.executable).parent / "edge-slm"), "bench", str(embedder_bundles[1]), "--against"]
    missing = subprocess.run([*bench, str(tmp_path / "none.jsonl")], capture_output=True, text=True)
    assert missing.returncode == 2 and "none.jsonl: no such results file" in missing.stderr
    (tmp_path / "notes.jsonl").write_text('{"text": "not a record"}\n')
    other = subprocess.run([*bench, str(tmp_path / "notes.jsonl")], capture_output=True, text=True)
    assert other.returncode == 2 and "notes.jsonl:1: not an edge-slm benchmark record" in other.stderr
    assert "fresh process" not in other.stderr  # refused before any measurement
