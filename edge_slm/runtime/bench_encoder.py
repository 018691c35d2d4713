"""Benchmark an encoder bundle: latency of one text (p50/p90/p99 at 16 and 128 tokens), throughput
in texts per second at batch 8 and 32, load time, peak memory of a fresh process, and accuracy
(a classifier on the shipped intents test split, an embedder on the retrieval check). Records
have the decoder benchmark's schema and provenance, with `bundle.family` = "encoder".

Every timing is end to end, text in and result out (tokenization included), as an application
calls it; peers in benchmarks/encoder_peers.py are timed by the same functions on the same texts.
Torch-free: runs on the device.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import TYPE_CHECKING

from edge_slm.core.data import EVAL_TEXT
from edge_slm.core.labelled import INTENTS_TEST, read_examples
from edge_slm.core.system import current_rss_mb, peak_rss_mb
from edge_slm.core.worker import run_worker
from edge_slm.runtime.bench import BenchRecord, BundleInfo, Settings, _versions, stats, text_table
from edge_slm.runtime.bench_results import RESULTS, EncoderResults, results_of

if TYPE_CHECKING:
    from edge_slm.core.manifest import EncoderManifest

LATENCY_TOKENS = (16, 128)
BATCH_SIZES = (8, 32)
TEST = "b1@16,128+b8,32"


def text_of_tokens(count_tokens, tokens: int) -> str:
    """The longest prefix of the shipped evaluation text (in words) that has at most `tokens`
    tokens, special tokens included: the same input for every system on every device."""
    words = EVAL_TEXT.read_text(encoding="utf-8").split()
    low, high = 1, min(len(words), 4 * tokens)
    while low < high:  # the token count grows with the number of words
        middle = (low + high + 1) // 2
        if count_tokens(" ".join(words[:middle])) <= tokens:
            low = middle
        else:
            high = middle - 1
    return " ".join(words[:low])


def throughput_texts() -> list[str]:
    return [e.text for e in read_examples(INTENTS_TEST)]


def timed(call, repetitions: int, warmup: int) -> list[float]:
    """Seconds of each of `repetitions` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(repetitions):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return samples


def encoder_timings(encode, count_tokens, repetitions: int, warmup: int) -> dict:
    """`encode(texts, batch_size)` timed as `edge-slm bench` reports it (any system)."""
    results = {}
    for tokens in LATENCY_TOKENS:
        text = text_of_tokens(count_tokens, tokens)
        samples = timed(lambda: encode([text], 1), 10 * repetitions, warmup)
        results[f"latency_ms_{tokens}"] = {**stats([1e3 * s for s in samples]), "tokens": count_tokens(text)}
    texts = throughput_texts()
    for batch in BATCH_SIZES:
        samples = timed(lambda: encode(texts, batch), repetitions, warmup)
        results[f"texts_per_s_b{batch}"] = {**stats([len(texts) / s for s in samples]), "texts": len(texts)}
    return results


def measure_encoder(bundle: str | Path, threads: int, repetitions: int, warmup: int) -> dict:
    """One setting, in this process: the worker side of `run_encoder()`."""
    from edge_slm import runtime

    start = time.perf_counter()
    model = runtime.load(bundle, threads=threads, verify=False)
    load_s = time.perf_counter() - start
    loaded = current_rss_mb()
    encode = model.embed if model.task == "embedding" else model.classify
    timings = encoder_timings(
        lambda texts, batch: encode(texts, batch_size=batch),
        lambda text: model.graph.token_counts([text])[0],
        repetitions,
        warmup,
    )
    return {
        "load_s": load_s,
        **timings,
        "rss_after_load_mb": loaded,
        "peak_rss_mb": peak_rss_mb(),
        "providers": model.graph.session.get_providers(),
    }


def encoder_accuracy(bundle: Path, threads: int) -> dict | None:
    from edge_slm import runtime
    from edge_slm.core.labelled import read_retrieval
    from edge_slm.runtime.encoder_eval import evaluate_classifier, evaluate_retrieval

    model = runtime.load(bundle, threads=threads, verify=False)
    if model.task == "embedding":
        return {**evaluate_retrieval(model, read_retrieval()), "data": "retrieval.json"}
    examples = read_examples(INTENTS_TEST)
    if {e.label for e in examples} - set(model.labels):
        return None  # a classifier of other labels: `edge-slm eval --data` with its own test split
    result = evaluate_classifier(model, examples)
    return {
        "task": result["task"],
        "examples": result["examples"],
        "accuracy": result["accuracy"],
        "data": "intents/test.jsonl",
    }


def run_encoder(
    bundle: Path, manifest: EncoderManifest, threads: list[int], repetitions: int, warmup: int, accuracy: bool, progress
) -> list[dict]:
    """Benchmark an encoder bundle once per thread count, each in a fresh process."""
    measured = encoder_accuracy(bundle, threads[0]) if accuracy else None

    def summary(results: dict) -> str:
        return (
            f"batch 1: {results['latency_ms_16']['p50']:.1f} ms at 16 tokens, {results['latency_ms_128']['p50']:.1f} ms "
            f"at 128; batch 32: {results['texts_per_s_b32']['mean']:.0f} texts/s; peak RSS {results['peak_rss_mb']:.0f} MB"
        )

    return records_per_thread_count(
        bundle,
        manifest,
        threads,
        repetitions,
        warmup,
        TEST,
        "edge_slm.runtime.bench_encoder:measure_encoder",
        lambda info, count, results: encoder_record(info, count, repetitions, warmup, results, measured),
        summary,
        progress,
    )


def records_per_thread_count(
    bundle: Path, manifest, threads, repetitions, warmup, test, worker, record, summary, progress
) -> list[dict]:
    """One fresh worker process (`worker`, "module:function") per thread count, each result made a
    record by `record(info, count, results)` and reported by `summary(results)`: the loop the
    encoder and seq2seq benchmarks share."""
    from edge_slm.core.bundle import MANIFEST

    info = BundleInfo.of(bundle, manifest, hashlib.sha256((bundle / MANIFEST).read_bytes()).hexdigest())
    records = []
    for n, count in enumerate(threads):
        progress(
            f"[{n + 1}/{len(threads)}] {test}, {count} threads, {warmup} warm-up + {repetitions} runs, fresh process"
        )
        config = {"bundle": str(bundle), "threads": count, "repetitions": repetitions, "warmup": warmup}
        results = run_worker(worker, config, what="the benchmark process")
        records.append(record(info, count, results))
        progress(f"      {summary(results)}")
    return records


def encoder_record(info: BundleInfo, threads, repetitions, warmup, results: dict, accuracy, system="edge-slm") -> dict:
    return BenchRecord(
        system=system,
        test=TEST,
        bundle=info,
        settings=Settings(
            threads=threads,
            prompt_tokens=0,
            gen_tokens=0,
            repetitions=repetitions,
            warmup=warmup,
            provider=(results.get("providers") or ["?"])[0],
            cpu_arena=True if system == "edge-slm" else None,
        ),
        versions=_versions(),
        results=EncoderResults.of({k: v for k, v in results.items() if k != "providers"}),
        accuracy=accuracy,
    ).to_dict()


def encoder_table(records: list[dict]) -> str:
    """The terminal table of encoder records: the metrics `EncoderResults` declares, then size and accuracy."""
    header = ["system", "target", "precision", "threads"]
    header += [m.short for _, m in RESULTS["encoder"].columns()] + ["size MB", "accuracy"]
    rows = []
    for r in records:
        acc = r.get("accuracy") or {}
        score = acc.get("accuracy", acc.get("recall_at_1"))
        rows.append(
            [r["system"], r["bundle"]["target"], r["bundle"]["precision"], str(r["settings"]["threads"])]
            + list(results_of(r).cells().values())
            + [f"{r['bundle']['size_bytes'] / 1e6:.0f}", "-" if score is None else f"{100 * score:.1f}%"]
        )
    return text_table(header, rows)
