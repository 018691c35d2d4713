"""A pruned decoder bundle side by side with the unpruned bundles of its base model, in `edge-slm
bench --against` and `edge-slm report`: a three-layer tiny llama's fp32 and int8 bundles and an
int8 bundle built from a profile with a [prune] section (no recovery), each benchmarked for real
(one repetition): decode tok/s as the speed, perplexity on eval.txt (lower is better) as the accuracy."""

from __future__ import annotations

import pytest
from conftest import make_model
from test_bench_variants import bench_side_by_side, cells_by_bundle

from edge_slm.harness.report import write_report
from edge_slm.runtime.bench_results import results_of


@pytest.fixture(scope="module")
def decoder_bundles(tiny_profile, tmp_path_factory):
    """(unpruned fp32, unpruned int8, pruned int8) bundles of one three-layer model."""
    from edge_slm.builder.pipeline import build
    from edge_slm.core.targets import load_profile

    root = tmp_path_factory.mktemp("decoder-variants")
    model = make_model(root / "model", "llama", num_hidden_layers=3)
    pruned_profile = root / "pruned-laptop.toml"
    pruned_profile.write_text(
        tiny_profile.read_text().replace('name = "tiny-laptop"', 'name = "pruned-laptop"')
        + "\n[prune]\nlayers = 1\nffn = 0.25\nmax_ppl_increase = 0.15  # the default: +15% against the unpruned model\n"
    )
    quiet = lambda m: None  # noqa: E731
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EDGE_SLM_CACHE", str(root / "cache"))
        build(str(model), load_profile(str(tiny_profile)), root / "fp32", echo=quiet)
        # The random three-layer model's int8 misses the x86 int8 budget's top-1 (95.3% < 96%): not what is tested here.
        int8 = dict(echo=quiet, precision="int8", allow_accuracy_loss=True)
        build(str(model), load_profile(str(tiny_profile)), root / "int8", **int8)
        manifest = build(str(model), load_profile(str(pruned_profile)), root / "pruned", **int8)
    assert manifest["pruning"]["gate"]["passed"]  # +3.9% perplexity, within the [prune] limit
    return root / "fp32", root / "int8", root / "pruned"


@pytest.fixture(scope="module")
def bench_runs(decoder_bundles, tmp_path_factory):
    """(the unpruned records, the pruned run's records, what that run printed, the folder)."""
    fp32, int8, pruned_bundle = decoder_bundles
    root = tmp_path_factory.mktemp("decoder-variant-records")
    options = ("--prompt-tokens", "16", "--gen-tokens", "8")
    return bench_side_by_side(root, (fp32, int8), pruned_bundle, *options)


def test_records_name_the_base_model_and_what_pruning_removed(bench_runs):
    (fp32, int8), (pruned,), _, _ = bench_runs
    assert fp32["bundle"]["base_model"] == int8["bundle"]["base_model"] == pruned["bundle"]["base_model"]
    assert fp32["bundle"]["pruned"] is None and int8["bundle"]["pruned"] is None
    removed = pruned["bundle"]["pruned"]
    assert len(removed["removed_layers"]) == 1 and removed["ffn_share"] == 0.25 and removed["head_groups"] == 0
    assert pruned["bundle"]["parameters"] == removed["parameters_after"] < int8["bundle"]["parameters"]


def _decode(record) -> float:
    return results_of(record).decode_tok_s.mean


def _check_rows(table: dict, unpruned: list[dict], pruned: dict) -> None:
    fp32, int8 = unpruned
    assert list(table) == ["unpruned fp32", "unpruned int8", "pruned int8"]
    mine = table["pruned int8"]
    assert mine["decode vs unpruned int8"] == f"{_decode(pruned) / _decode(int8):.2f}x"
    assert table["unpruned fp32"]["decode vs unpruned int8"] == f"{_decode(fp32) / _decode(int8):.2f}x"
    assert table["unpruned int8"]["decode vs unpruned int8"] == "1.00x"
    ppl, base = pruned["accuracy"]["perplexity"], fp32["accuracy"]["perplexity"]
    assert mine["perplexity (lower is better)"] == f"{ppl:.2f}"
    assert mine["perplexity vs unpruned fp32"] == f"{100 * (ppl / base - 1):+.1f}%"
    assert table["unpruned fp32"]["perplexity vs unpruned fp32"] == "+0.0%"
    assert mine["decode tok/s"] == f"{_decode(pruned):.1f} ± 0.0"
    assert mine["removed"] == f"layers {pruned['bundle']['pruned']['removed_layers'][0]}, FFN -25%"
    assert table["unpruned int8"]["removed"] == "-" and mine["base model"] == table["unpruned fp32"]["base model"]


def test_bench_against_prints_decode_speed_and_perplexity_side_by_side(bench_runs):
    unpruned, (pruned,), printed, _ = bench_runs
    lines = printed.splitlines()
    start = next(i for i, line in enumerate(lines) if "base model" in line)  # after the bench's own table
    table = cells_by_bundle(lines[start:])
    _check_rows(table, unpruned, pruned)


def test_report_puts_the_pruned_decoder_beside_the_unpruned_one(bench_runs):
    unpruned, (pruned,), _, root = bench_runs
    paths = write_report([root / "unpruned.jsonl", root / "pruned.jsonl"], root / "report")
    plot = root / "report" / "decoder-variants.png"
    assert plot in paths and plot.stat().st_size > 10_000
    md = (root / "report" / "report.md").read_text()
    section = md.split("## Pruned and unpruned, int8 and fp32")[1].split("![")[0]
    assert "(decoder) on" in section
    _check_rows(cells_by_bundle(section.splitlines()), unpruned, pruned)
    assert "![perplexity on eval.txt (lower is better) against decode tokens per second" in md
    assert "encoder-variants.png" not in md
