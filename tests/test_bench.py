"""Benchmark records and reports on a tiny bundle: complete, consistent records (nothing timed),
one record per thread count, and a report with its plots."""

import json
import subprocess
import sys
import time

import pytest

from edge_slm.core.errors import EdgeSlmError
from edge_slm.harness.report import read_records, write_report
from edge_slm.runtime.bench import SCHEMA, run, stats, table


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
