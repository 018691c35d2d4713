"""Benchmark records and reports on a tiny bundle: complete, consistent records (nothing timed),
one record per thread count, and a report with its plots."""

import json
import subprocess
import sys

import pytest

from edge_slm.core.errors import EdgeSlmError
from edge_slm.harness.report import read_records, write_report
from edge_slm.runtime.bench import SCHEMA, run, stats, table


@pytest.fixture(scope="module")
def records(tiny_bundle):
    return run(
        tiny_bundle, threads=[1, 2], prompt_tokens=16, gen_tokens=8, repetitions=3, warmup=1, reference=tiny_bundle
    )


def test_one_complete_record_per_setting(records, tiny_bundle):
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
            assert res[key]["mean"] > 0 and res[key]["std"] >= 0
        latency = res["decode_latency_ms"]
        assert latency["n"] == 3 * 7 and latency["p50"] <= latency["p90"] <= latency["p99"]
        # Consistency: 7 decode steps at the mean step latency take 7 / decode rate.
        per_run_ms = [sum(latency["samples"][i * 7 : (i + 1) * 7]) for i in range(3)]
        for run_ms, rate in zip(per_run_ms, res["decode_tok_s"]["samples"]):
            assert run_ms == pytest.approx(7 / rate * 1e3, rel=1e-6)
        for ttft, rate in zip(res["ttft_ms"]["samples"], res["prefill_tok_s"]["samples"]):
            assert ttft == pytest.approx(16 / rate * 1e3, rel=1e-6)
        assert res["peak_rss_mb"] * 1e6 > r["bundle"]["size_bytes"]  # the weights are resident
        assert res["load_s"] > 0
        assert r["accuracy"]["top1_agreement"] == 1.0 and r["accuracy"]["perplexity"] > 1


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
    assert res["texts_per_s_b32"]["texts"] == 309 and res["peak_rss_mb"] > 0 and res["load_s"] > 0
    assert embedder["accuracy"]["queries"] == 60 and 0 <= embedder["accuracy"]["recall_at_1"] <= 1
    assert classifier["accuracy"] is None  # its labels are not the shipped intents: `eval --data` instead
    results = tmp_path / "all.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in records + encoder_records))
    paths = write_report([results], tmp_path / "report")
    assert "encoders.png" in {p.name for p in paths}
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Encoders" in md and md.count("| edge-slm int8 tiny-encoder-laptop") == 1 and "recall@1" in md


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
