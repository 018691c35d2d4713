"""Benchmark a seq2seq (translation) bundle: greedy translation of the shipped parallel text's
English sentences, one sentence at a time (latency p50/p90 and sentences per second) and 16 in one
batch (sentences per second), load time and the peak memory of a fresh process; and the
translation gate's figures: measured against an fp32 bundle (`--reference`, where sacrebleu is
installed), else read from the bundle's manifest (the build's gate). Records have the other
families' schema and provenance, with `bundle.family` = "seq2seq" and `Seq2SeqResults`.

    edge-slm bench export/opus-mt-en-de [--reference export/opus-mt-en-de-fp32] [-r 5]

Every timing is end to end, text in and text out (tokenization and decoding included). Torch-free:
runs on the device.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from edge_slm.core.system import current_rss_mb, peak_rss_mb
from edge_slm.runtime.bench import BenchRecord, BundleInfo, Settings, _versions, stats, text_table
from edge_slm.runtime.bench_encoder import records_per_thread_count, timed
from edge_slm.runtime.bench_results import RESULTS, Seq2SeqResults, results_of
from edge_slm.runtime.translation_eval import against_reference, parallel_text

if TYPE_CHECKING:
    from edge_slm.core.manifest import Seq2SeqManifest

TEST = "s1+b16"
BATCH = 16
MAX_NEW_TOKENS = 64  # as the gate: the shipped sentences are short


def _target_lang(model) -> str | None:
    """A multilingual model without a default language is measured into German (the shipped
    references' language) where it has it, else into its first language."""
    languages = model.languages
    if not languages or "" in languages:
        return None
    return next((c for c in ("de", "deu", "deu_Latn") if c in languages), sorted(languages)[0])


def measure_seq2seq(bundle: str | Path, threads: int, repetitions: int, warmup: int) -> dict:
    """One setting, in this process: the worker side of `run_seq2seq()`."""
    from edge_slm import runtime

    start = time.perf_counter()
    model = runtime.load(bundle, threads=threads, verify=False)
    load_s = time.perf_counter() - start
    loaded = current_rss_mb()
    sources, _ = parallel_text()
    lang = _target_lang(model)
    tokens = min(MAX_NEW_TOKENS, model.generation.max_new_tokens)
    one, batch = sources[:1], sources[:BATCH]
    single = timed(lambda: model.translate(one, tokens, 1, lang), 5 * repetitions, warmup)
    batched = timed(lambda: model.translate(batch, tokens, 1, lang), repetitions, warmup)
    return {
        "load_s": load_s,
        "latency_ms_1": stats([1e3 * s for s in single]),
        "sentences_per_s_b1": stats([1 / s for s in single]),
        "sentences_per_s_b16": {**stats([len(batch) / s for s in batched]), "texts": len(batch)},
        "rss_after_load_mb": loaded,
        "peak_rss_mb": peak_rss_mb(),
        "providers": model.graphs.encoder.get_providers(),
        "max_new_tokens": tokens,
        "target_lang": lang,
    }


def seq2seq_accuracy(bundle: Path, manifest: Seq2SeqManifest, reference: Path | None, threads: int) -> dict | None:
    """The gate's figures against an fp32 bundle, measured here; else the build's, from the manifest."""
    if reference is None:
        from edge_slm.core.bundle import MANIFEST

        gate = json.loads((bundle / MANIFEST).read_text(encoding="utf-8")).get("accuracy")  # plain JSON, as recorded
        return {**gate, "source": "the build's gate (manifest)"} if gate else None
    from edge_slm import runtime

    candidate = runtime.load(bundle, threads=threads, verify=False)
    fp32 = runtime.load(reference, threads=threads)
    tokens = min(MAX_NEW_TOKENS, candidate.generation.max_new_tokens)
    measured = against_reference(candidate, fp32, tokens, _target_lang(candidate))
    del measured["got"], measured["want"]
    return {**measured, "source": f"measured against {reference}"}


def run_seq2seq(
    bundle: Path,
    manifest: Seq2SeqManifest,
    threads: list[int],
    repetitions: int,
    warmup: int,
    accuracy: bool,
    reference: Path | None,
    progress,
) -> list[dict]:
    """Benchmark a seq2seq bundle once per thread count, each in a fresh process."""
    measured = seq2seq_accuracy(bundle, manifest, reference, threads[0]) if accuracy else None

    def summary(results: dict) -> str:
        return (
            f"1 sentence: {results['latency_ms_1']['p50']:.0f} ms; batch 16: "
            f"{results['sentences_per_s_b16']['mean']:.2f} sentences/s; peak RSS {results['peak_rss_mb']:.0f} MB"
        )

    return records_per_thread_count(
        bundle,
        manifest,
        threads,
        repetitions,
        warmup,
        TEST,
        "edge_slm.runtime.bench_seq2seq:measure_seq2seq",
        lambda info, count, results: seq2seq_record(info, count, repetitions, warmup, results, measured),
        summary,
        progress,
    )


def seq2seq_record(info: BundleInfo, threads, repetitions, warmup, results: dict, accuracy, system="edge-slm") -> dict:
    kept = {k: v for k, v in results.items() if k not in ("providers", "max_new_tokens", "target_lang")}
    return BenchRecord(
        system=system,
        test=TEST,
        bundle=info,
        settings=Settings(
            threads=threads,
            prompt_tokens=0,
            gen_tokens=results["max_new_tokens"],  # the cap per sentence; greedy stops at EOS
            repetitions=repetitions,
            warmup=warmup,
            provider=(results.get("providers") or ["?"])[0],
            cpu_arena=True if system == "edge-slm" else None,
        ),
        versions=_versions(),
        results=Seq2SeqResults.of({**kept, "target_lang": results["target_lang"]}),
        accuracy=accuracy,
    ).to_dict()


def seq2seq_table(records: list[dict]) -> str:
    """The terminal table of seq2seq records: the metrics `Seq2SeqResults` declares, then size and the gate."""
    header = ["system", "target", "precision", "threads"]
    header += [m.short for _, m in RESULTS["seq2seq"].columns()] + ["size MB", "vs fp32 chrF / BLEU / same"]
    rows = []
    for r in records:
        acc = r.get("accuracy") or {}
        gate = (
            f"{acc['chrf_vs_fp32']:.1f} / {acc['bleu_vs_fp32']:.1f} / {100 * acc['identical_share']:.0f}%"
            if "bleu_vs_fp32" in acc
            else "-"
        )
        rows.append(
            [r["system"], r["bundle"]["target"], r["bundle"]["precision"], str(r["settings"]["threads"])]
            + list(results_of(r).cells().values())
            + [f"{r['bundle']['size_bytes'] / 1e6:.0f}", gate]
        )
    return text_table(header, rows)
