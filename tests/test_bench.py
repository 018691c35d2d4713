"""Benchmark records and reports on a tiny bundle: complete, consistent records (nothing timed),
one record per thread count, and a report with its plots."""

import json
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

from edge_slm.core.errors import EdgeSlmError
from edge_slm.harness.report import read_records, write_report
from edge_slm.runtime.bench import SCHEMA, record_problem, run, stats, table


@pytest.fixture(scope="module")
def timed_records(tiny_bundle, perturbed_bundle):
    start = time.perf_counter()
    got = run(
        tiny_bundle,
        threads=[1, 2],
        prompt_tokens=16,
        gen_tokens=8,
        repetitions=3,
        warmup=1,
        reference=perturbed_bundle,
    )
    return got, time.perf_counter() - start


@pytest.fixture(scope="module")
def records(timed_records):
    return timed_records[0]


def _top1_agreement(bundle, reference, window) -> float:
    """Top-1 agreement over eval.txt in windows, from plain onnxruntime sessions without a cache
    (not the runtime's loop that the benchmark uses)."""
    from conftest import prompt_logits

    from edge_slm import runtime
    from edge_slm.runtime.bench import EVAL_TEXT

    ids = runtime.load(bundle).encode(EVAL_TEXT.read_text(encoding="utf-8"))
    agree = scored = 0
    for start in range(0, len(ids), window):
        chunk = ids[start : start + window]
        if len(chunk) < 2:
            continue
        ours = prompt_logits(bundle / "model.onnx", chunk)[:-1].argmax(-1)
        theirs = prompt_logits(reference / "model.onnx", chunk)[:-1].argmax(-1)
        agree, scored = agree + int((ours == theirs).sum()), scored + len(chunk) - 1
    return agree / scored


def test_one_complete_record_per_setting(timed_records, tiny_bundle, perturbed_bundle):
    records, wall_s = timed_records
    assert [r["settings"]["threads"] for r in records] == [1, 2]
    for r in records:
        assert r["schema"] == SCHEMA and r["system"] == "edge-slm" and r["test"] == "pp16+tg8"
        assert r["bundle"]["precision"] == "fp32" and len(r["bundle"]["manifest_sha256"]) == 64
        assert r["bundle"]["size_bytes"] == sum(
            f["bytes"] for f in json.loads((tiny_bundle / "manifest.json").read_text())["files"].values()
        )
        assert r["settings"] == {
            "threads": r["settings"]["threads"],
            "prompt_tokens": 16,
            "gen_tokens": 8,
            "repetitions": 3,
            "warmup": 1,
            "provider": "CPUExecutionProvider",
            "cpu_arena": True,
            "context": 128,  # the KV cache's capacity: the bundle's context when --context is not given
        }
        assert r["machine"]["cores"] >= 1 and r["machine"]["arch"] and r["versions"]["onnxruntime"]
        res = r["results"]
        for key in ("ttft_ms", "prefill_tok_s", "decode_tok_s"):
            assert res[key]["n"] == 3 and len(res[key]["samples"]) == 3  # warm-up excluded
            assert 0 < min(res[key]["samples"]) <= res[key]["mean"] <= max(res[key]["samples"])
        latency = res["decode_latency_ms"]
        assert latency["n"] == 3 * 7 and latency["p50"] <= latency["p90"] <= latency["p99"]
        # The timed spans happened within the benchmark's wall time (a unit slip would break this).
        timed_ms = sum(res["ttft_ms"]["samples"]) + sum(latency["samples"])
        assert 0 < timed_ms < sum(x["results"]["load_s"] for x in records) * 1e3 + timed_ms < wall_s * 1e3
        assert 0 < res["load_s"] < wall_s
        # A Python process with numpy, onnxruntime and tokenizers loaded, in MB (not kB, not bytes).
        assert 30 < res["peak_rss_mb"] < 1000, res["peak_rss_mb"]
        assert res["memory_breakdown"]["libraries_mb"] > 10, res["memory_breakdown"]
        top1 = _top1_agreement(tiny_bundle, perturbed_bundle, window=r["settings"]["context"])
        assert 0.2 < top1 < 0.95, top1  # the perturbed model often disagrees, not always
        assert r["accuracy"]["top1_agreement"] == pytest.approx(top1, abs=1e-9) and r["accuracy"]["perplexity"] > 1


def test_table_shows_only_varying_columns(records):
    text = table(records)
    header = text.splitlines()[0]
    assert "threads" in header and "precision" not in header and "host" not in header
    assert len(text.splitlines()) == 2 + len(records)


def test_stats_percentiles():
    s = stats([float(x) for x in range(1, 101)])
    assert (s["mean"], s["p50"], s["p90"], s["p99"], s["n"]) == (50.5, 51.0, 90.0, 99.0, 100)


def test_report_files_and_table(records, tmp_path):
    results = tmp_path / "r.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in records))
    paths = write_report([results], tmp_path / "report")
    names = sorted(p.name for p in paths)
    assert names == ["accuracy.png", "memory.png", "report.html", "report.md", "speed.png", "threads.png"]
    for png in (p for p in paths if p.suffix == ".png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    md = (tmp_path / "report" / "report.md").read_text()
    assert md.count("| edge-slm fp32 tiny-laptop") == 2 and "1.00x" in md and "![Thread sweep](threads.png)" in md
    html = (tmp_path / "report" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4  # self-contained


def test_bad_inputs(tiny_bundle, tmp_path):
    with pytest.raises(EdgeSlmError, match="no such results file"):
        read_records([tmp_path / "missing.jsonl"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"hello": 1}\n')
    with pytest.raises(EdgeSlmError, match="bad.jsonl:1: not an edge-slm benchmark record"):
        read_records([bad])
    with pytest.raises(EdgeSlmError, match="exceed the bundle's context of 128"):
        run(tiny_bundle, threads=[1], prompt_tokens=120, gen_tokens=64, repetitions=1, warmup=0, accuracy=False)
    proc = subprocess.run(
        [sys.executable, "-m", "edge_slm.cli", "bench", str(tiny_bundle), "--threads", "0"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "--threads" in proc.stderr and "Traceback" not in proc.stderr


def test_peak_memory_comes_with_its_parts_and_the_context_is_recorded(tiny_bundle):
    from edge_slm.runtime.bench import run

    (record,) = run(
        tiny_bundle, threads=[1], prompt_tokens=8, gen_tokens=4, repetitions=1, warmup=0, accuracy=False, context=64
    )
    parts = record["results"]["memory_breakdown"]
    assert record["settings"]["context"] == 64 and record["results"]["context"] == 64
    # 2 x 2 layers x (1 x 2 kv heads x 64 positions x 16) x 4 bytes
    assert parts["kv_cache_mb"] == pytest.approx(2 * 2 * 2 * 64 * 16 * 4 / 2**20)
    assert parts["libraries_mb"] > 10 and parts["python_mb"] > 5
    total = (
        parts["python_mb"] + parts["libraries_mb"] + parts["session_mb"] + parts["tokenizer_mb"] + parts["requests_mb"]
    )
    assert total == pytest.approx(record["results"]["peak_rss_mb"], abs=0.5)


def test_an_encoder_bundle_is_benchmarked_and_reported(embedder_bundles, classifier_bundle, records, tmp_path, capsys):
    """`edge-slm bench` on an encoder bundle: latency at 16 and 128 tokens, texts/s in batches of
    8 and 32, memory, accuracy; records of the bench schema that the report tables apart."""
    from edge_slm.cli import main
    from edge_slm.runtime.bench import record_problem

    out = tmp_path / "enc.jsonl"
    for bundle in (embedder_bundles[1], classifier_bundle):
        main(["bench", str(bundle), "-r", "1", "--warmup", "0", "--threads", "1", "--out", str(out)])
    table_out = capsys.readouterr().out
    assert "b1@16 p50/p90 ms" in table_out and "b32 texts/s" in table_out
    encoder_records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(encoder_records) == 2 and all(record_problem(r) is None for r in encoder_records)
    embedder, classifier = encoder_records
    assert embedder["bundle"]["family"] == "encoder" and embedder["test"] == "b1@16,128+b8,32"
    res = embedder["results"]
    assert res["latency_ms_16"]["n"] == 10 and res["latency_ms_16"]["tokens"] <= 16 < res["latency_ms_128"]["tokens"]
    assert res["texts_per_s_b32"]["texts"] == 309 and 30 < res["peak_rss_mb"] < 1000 and res["load_s"] > 0
    assert embedder["accuracy"]["queries"] == 60 and 0 <= embedder["accuracy"]["recall_at_1"] <= 1
    assert classifier["accuracy"] is None  # its labels are not the shipped intents: `eval --data` instead
    results = tmp_path / "all.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in records + encoder_records))
    paths = write_report([results], tmp_path / "report")
    assert "encoders.png" in {p.name for p in paths}
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Encoders" in md and md.count("| edge-slm int8 tiny-encoder-laptop") == 1 and "recall@1" in md


def _encoder_pruning_benchmark():
    """benchmarks/encoder_pruning.py as a module (benchmarks/ is not a package on the path)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "encoder_pruning.py"
    spec = importlib.util.spec_from_file_location("encoder_pruning_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_interleaved_benchmark_times_bundles_in_turn_in_one_process(embedder_bundles):
    """benchmarks/encoder_pruning.py --interleaved: a fresh process loads the bundles and times
    them in turn, round after round, and says what it measured."""
    import os
    from pathlib import Path

    from edge_slm.core.worker import run_worker

    repo = Path(__file__).resolve().parent.parent
    fp32, int8 = embedder_bundles
    bundles = {"fp32": str(fp32), "int8": str(int8), "pruned": str(int8)}
    cfg = {"bundles": bundles, "threads": 1, "rounds": 3, "block": 2}
    measured = run_worker(
        "benchmarks.encoder_pruning:interleaved_worker", cfg, env={**os.environ, "PYTHONPATH": str(repo)}
    )
    assert (measured["texts"], measured["block"], len(measured["rounds"])) == (309, 2, 3)
    assert all(list(r) == ["fp32", "int8", "pruned"] for r in measured["rounds"])
    assert all(0 < t["one_text_s"] < t["batch32_s"] for r in measured["rounds"] for t in r.values())
    assert all(0 < t["one_text_p50_s"] < t["batch32_s"] for r in measured["rounds"] for t in r.values())
    assert (
        measured["bundles"]["fp32"]["path"] == str(fp32) and len(measured["bundles"]["int8"]["manifest_sha256"]) == 64
    )


def test_the_interleaved_table_gives_same_round_ratios_with_their_median_and_quartiles():
    """Time ratios against the int8 bundle of the same round: half its time is 2x, twice is 0.5x;
    the quartiles are the inclusive ones (within the measured ratios)."""
    table = _encoder_pruning_benchmark().interleaved_table

    pruned_b32 = [1 / 1.6, 1 / 2.0, 1 / 2.0, 1 / 2.4]  # seconds against int8's 1.0: ratios 1.6, 2, 2, 2.4
    rounds = [
        {
            "fp32": {"batch32_s": 2.0, "one_text_s": 0.004},
            "int8": {"batch32_s": 1.0, "one_text_s": 0.002},
            "pruned": {"batch32_s": b32, "one_text_s": 0.002},
        }
        for b32 in pruned_b32
    ]
    rows = [line for line in table({"embedder": {"rounds": rounds}}) if line.startswith("| embedder |")]
    assert rows == [
        "| embedder | unpruned fp32 | 0.50x (0.50-0.50) | 0.50x (0.50-0.50) |",
        "| embedder | unpruned int8 | 1.00x (1.00-1.00) | 1.00x (1.00-1.00) |",
        "| embedder | pruned int8 | 2.00x (1.90-2.10) | 1.00x (1.00-1.00) |",
    ]
    two = table({"embedder": {"rounds": rounds[:1] + rounds[3:]}})  # two rounds: quartiles stay inside 1.6-2.4
    assert "| embedder | pruned int8 | 2.00x (1.80-2.20) | 1.00x (1.00-1.00) |" in two
    # With each block's median call recorded, a third column: the ratio of the p50 latencies.
    for r, median in zip(rounds, (0.0010, 0.0008, 0.0008, 0.0005)):  # ratios 1.6, 2, 2, 3.2
        r["int8"]["one_text_p50_s"], r["fp32"]["one_text_p50_s"], r["pruned"]["one_text_p50_s"] = 0.0016, 0.0032, median
    lines = table({"embedder": {"rounds": rounds}})
    assert (
        "| set | bundle | b32 vs unpruned int8 | one text (block mean) vs unpruned int8 | one text (median call) vs unpruned int8 |"
        in lines
    )
    assert "| embedder | pruned int8 | 2.00x (1.90-2.10) | 1.00x (1.00-1.00) | 2.00x (1.90-2.30) |" in lines


# Lines of benchmarks/results/pruning/vm.jsonl (the oldest shape: no bundle.family, no
# settings.context) and benchmarks/results/encoders/vm.jsonl, their samples cut to three.
OLD_DECODER_LINE = '{"schema": "edge-slm-bench/1", "system": "edge-slm", "test": "pp128+tg64", "timestamp": "2026-11-29T09:43:40+00:00", "host": "vm", "bundle": {"path": "export/x86-laptop", "manifest_sha256": "02c5eb3074defb3633ca98bbbbaa5a130b47ddac19b5a80b3577743ec68671c5", "target": "x86-laptop", "precision": "int8", "graph": "fused", "size_bytes": 149912071, "parameters": 134515008}, "settings": {"threads": 2, "prompt_tokens": 128, "gen_tokens": 64, "repetitions": 5, "warmup": 1, "provider": "CPUExecutionProvider", "cpu_arena": true}, "machine": {"os": "Linux 6.18.44-fc-v782", "arch": "x86_64", "python": "3.11.7", "cores": 2, "cpu": "AMD EPYC", "flags": ["avx2", "fma"]}, "versions": {"edge_slm": "0.1.0", "onnxruntime": "1.32.0", "numpy": "2.4.6", "git_commit": "11595cb"}, "results": {"load_s": 0.6248916520016792, "ttft_ms": {"mean": 1337.2976037986518, "std": 32.671475844731184, "p50": 1329.9312249982904, "p90": 1392.720913998346, "p99": 1392.720913998346, "n": 5, "samples": [1329.9312249982904, 1392.720913998346, 1335.1243069992051]}, "prefill_tok_s": {"mean": 95.76006329314365, "std": 2.284535966346291, "p50": 96.24557841339843, "p90": 97.87532085288206, "p99": 97.87532085288206, "n": 5, "samples": [96.24557841339843, 91.90642483606159, 95.87122287338913]}, "decode_tok_s": {"mean": 54.90359782064607, "std": 1.1354700999692653, "p50": 54.765219500671414, "p90": 56.004303370731535, "p99": 56.004303370731535, "n": 5, "samples": [53.18046523689364, 54.706129478114505, 56.004303370731535]}, "decode_latency_ms": {"mean": 18.220043469854218, "std": 2.6372701187619643, "p50": 17.795362997276243, "p90": 19.04398499755189, "p99": 22.116158001153963, "n": 315, "samples": [50.04427899984876, 17.58755300033954, 17.292749998887302]}, "peak_rss_mb": 396.96484375}, "accuracy": {"tokens": 2292, "scored_tokens": 2287, "windows": 5, "window": 512, "perplexity": 22.793754842282297, "mean_nll": 3.1264865880138677, "reference": "export/x86-laptop-fp32", "top1_agreement": 0.9689549628334062, "mean_kl": 0.0030483440994665467, "reference_perplexity": 22.700649760487078, "text": "eval.txt"}}'
OLD_ENCODER_LINE = '{"schema": "edge-slm-bench/1", "system": "edge-slm", "test": "b1@16,128+b8,32", "timestamp": "2026-12-01T06:19:13+00:00", "host": "vm", "bundle": {"path": "export/x86-laptop-embedder", "manifest_sha256": null, "target": "x86-laptop", "precision": "int8", "graph": "encoder", "size_bytes": 34117620, "parameters": 22713216, "family": "encoder"}, "settings": {"threads": 2, "prompt_tokens": 0, "gen_tokens": 0, "repetitions": 5, "warmup": 2, "provider": "CPUExecutionProvider", "cpu_arena": true, "context": null}, "machine": {"os": "Linux 6.18.44-fc-v1045", "arch": "x86_64", "python": "3.11.7", "cores": 2, "cpu": "AMD EPYC", "flags": ["avx2", "fma"]}, "versions": {"edge_slm": "0.1.0", "onnxruntime": "1.32.0", "numpy": "2.4.6", "git_commit": "ae7640c"}, "results": {"load_s": 0.19387208399894007, "latency_ms_16": {"mean": 5.521008579780755, "std": 1.891362573452952, "p50": 4.893002998869633, "p90": 8.752009000090766, "p99": 11.86416000018653, "n": 50, "samples": [5.373879999751807, 8.782504999544472, 10.24017300005653], "tokens": 16}, "latency_ms_128": {"mean": 23.02223134000087, "std": 1.8840719364521639, "p50": 23.439132999556023, "p90": 24.997258000439615, "p99": 25.967175999539904, "n": 50, "samples": [23.30929999880027, 23.423564000040642, 23.551583000880782], "tokens": 128}, "texts_per_s_b8": {"mean": 598.0813259527882, "std": 70.79027805809054, "p50": 552.8678029458263, "p90": 693.6375265068194, "p99": 693.6375265068194, "n": 5, "samples": [693.6375265068194, 654.4395668004238, 545.4413027366959], "texts": 309}, "texts_per_s_b32": {"mean": 630.553796825525, "std": 32.18407773815736, "p50": 625.1627370438732, "p90": 676.6533859613941, "p99": 676.6533859613941, "n": 5, "samples": [676.6533859613941, 607.7497594101465, 625.1627370438732], "texts": 309}, "rss_after_load_mb": 120.51171875, "peak_rss_mb": 137.16015625}, "accuracy": {"cosine_to_torch_fp32": 0.9963359832763672, "round": 1}}'


def test_old_records_parse_and_write_back_the_same(tmp_path):
    from edge_slm.harness.report import comparison_rows, encoder_rows
    from edge_slm.runtime.bench_encoder import encoder_table
    from edge_slm.runtime.bench_results import DecoderResults, EncoderResults, Stats, results_of

    decoder, encoder = json.loads(OLD_DECODER_LINE), json.loads(OLD_ENCODER_LINE)
    assert record_problem(decoder) is None and record_problem(encoder) is None
    res = results_of(decoder)
    assert isinstance(res, DecoderResults) and isinstance(res.decode_latency_ms, Stats)
    assert (res.decode_tok_s.mean, res.decode_latency_ms.n, res.peak_rss_mb) == (54.90359782064607, 315, 396.96484375)
    assert res.context is None and res.memory_breakdown is None and res.load_s == 0.6248916520016792
    assert res.to_dict() == decoder["results"]  # what is read is written back, key for key
    enc = results_of(encoder)
    assert isinstance(enc, EncoderResults) and enc.latency_ms_16.extra == {"tokens": 16}
    assert enc.rss_after_load_mb == 120.51171875 and enc.to_dict() == encoder["results"]
    (row,) = comparison_rows([decoder])
    assert (row["decode_tok_s"], row["prefill_tok_s"], row["ttft_ms"]) == ("54.9 ± 1.1", "96 ± 2", "1337 ± 33")
    assert (row["decode_latency_ms"], row["peak_rss_mb"], row["ppl"]) == ("17.8 / 22.1", "397", "22.79")
    (erow,) = encoder_rows([encoder])
    assert (erow["latency_ms_16"], erow["texts_per_s_b32"]) == ("4.9 / 8.8", "631 ± 32")
    assert " 4.9 / 8.8 |" in encoder_table([encoder]) and " 54.9 ± 1.1 |" in table([decoder])
    # A record the server benchmark wrote: no step latencies, and figures no field declares.
    served = json.loads(OLD_DECODER_LINE)
    del served["results"]["decode_latency_ms"]
    served["results"]["server_vs_generate"] = 1.004
    assert record_problem(served) is None and results_of(served).extra == {"server_vs_generate": 1.004}
    assert comparison_rows([served])[0]["decode_latency_ms"] == "-"
    assert results_of(served).to_dict() == served["results"]


def test_the_checker_follows_the_declaration():
    record = json.loads(OLD_DECODER_LINE)
    del record["results"]["ttft_ms"]["std"]  # the report shows mean ± std: a record without it is refused
    assert record_problem(record) == "'results.ttft_ms.std' is missing or not a number"
    record = json.loads(OLD_DECODER_LINE)
    record["results"]["decode_latency_ms"]["samples"] = "many"
    assert record_problem(record) == "'results.decode_latency_ms.samples' is missing or not a list"
    record = json.loads(OLD_ENCODER_LINE)
    del record["results"]["texts_per_s_b8"]
    assert record_problem(record) == "'results.texts_per_s_b8' is missing or not an object"
    record["bundle"]["family"] = "speech"
    assert (
        record_problem(record)
        == "'bundle.family' is 'speech'; this edge-slm reads records of decoder, encoder, seq2seq bundles"
    )


def test_a_metric_declared_once_is_a_column_of_the_table_the_report_and_the_checker(records, tmp_path, monkeypatch):
    """Adding a field to the results' declaration is all it takes to add a metric."""
    from edge_slm.runtime.bench_results import RESULTS, DecoderResults, Stats, metric

    @dataclass(frozen=True, kw_only=True)
    class WithEnergy(DecoderResults):
        energy_j: Stats = metric("energy J per token", "J/tok", "J", digits=2)

    monkeypatch.setitem(RESULTS, "decoder", WithEnergy)
    measured = [{**r, "results": {**r["results"], "energy_j": stats([0.25, 0.35])}} for r in records]
    text = table(measured)
    assert text.splitlines()[0].split("|")[-4].strip() == "J/tok"  # after peak RSS, before size and ppl
    assert text.count(" 0.30 ± 0.07 |") == len(records)
    results = tmp_path / "r.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in measured))
    write_report([results], tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| peak RSS MB | energy J per token | bundle MB |" in md and md.count("| 0.30 ± 0.07 |") == len(records)
    assert "<th>energy J per token</th>" in (tmp_path / "report" / "report.html").read_text()
    assert record_problem(records[0]) == "'results.energy_j' is missing or not an object"


def test_thread_counts_above_the_cores_are_capped_with_a_warning(tiny_bundle):
    """A sweep past this machine's cores runs (and records) what it can, once, and says so."""
    import os

    cores = os.cpu_count()
    proc = subprocess.run(
        [sys.executable, "-m", "edge_slm.cli", "bench", str(tiny_bundle), "--threads", f"1,{cores + 1},{cores + 62}"]
        + ["--prompt-tokens", "8", "--gen-tokens", "4", "-r", "1", "--warmup", "0", "--no-accuracy", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["settings"]["threads"] for r in records] == ([1, cores] if cores > 1 else [1])
    assert f"{cores + 62} threads asked for, this machine has {cores} cores: using {cores}" in proc.stderr
