"""Benchmark a bundle: load time, time to first token, prefill and decode throughput, per-token
latency percentiles, peak memory of a fresh process, accuracy; one JSON record per setting.

    edge-slm bench BUNDLE [--prompt-tokens 128] [--gen-tokens 64] [--repetitions 5] [--warmup 1]
                          [--threads 1,2] [--reference FP32_BUNDLE] [--out results.jsonl] [--json]

Each setting (thread count) runs in a fresh Python process (`edge_slm.core.worker`), so its peak
RSS is its own: the kernel's high-water mark (VmHWM) read at the end. Warm-up runs are excluded; every figure has
its mean, standard deviation and raw samples. Names follow llama-bench: pp128 is a 128-token
prompt, tg64 is 64 generated tokens. Torch-free: runs on the device.
"""

from __future__ import annotations

import hashlib
import math
import platform
import statistics
import subprocess
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from edge_slm import __version__
from edge_slm.core.data import EVAL_TEXT
from edge_slm.core.errors import EdgeSlmError
from edge_slm.core.system import current_rss_mb, machine, peak_rss_mb
from edge_slm.core.worker import run_worker
from edge_slm.runtime.bench_results import (
    RESULTS,
    DecoderResults,
    Results,
    measured_on,
    record_family,
    results_of,
    results_problem,
)

if TYPE_CHECKING:
    from edge_slm.core.manifest import Manifest

SCHEMA = "edge-slm-bench/1"


def stats(samples: list[float]) -> dict:
    ordered = sorted(samples)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))]

    return {
        "mean": statistics.mean(samples),
        "std": statistics.stdev(samples) if len(samples) > 1 else 0.0,
        "p50": pct(50),
        "p90": pct(90),
        "p99": pct(99),
        "n": len(samples),
        "samples": samples,
    }


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def prompt_ids(model, count: int) -> list[int]:
    """`count` tokens of the shipped evaluation text: real prose, the same on every device."""
    ids = model.encode(EVAL_TEXT.read_text(encoding="utf-8"))
    while len(ids) < count:
        ids = ids + ids
    return ids[:count]


def timed_runs(prefill, step, prompt: list[int], gen_tokens: int, repetitions: int, warmup: int) -> dict:
    """The timing loop every system shares (edge-slm here, the peers in benchmarks/peers.py):
    `prefill(ids)` and `step(token)` each return the next greedy token. Warm-up runs dropped."""
    ttft, prefill_rate, decode, step_ms = [], [], [], []
    for rep in range(warmup + repetitions):
        t0 = time.perf_counter()
        token = prefill(prompt)
        t1 = time.perf_counter()
        steps = []
        for _ in range(gen_tokens - 1):
            s0 = time.perf_counter()
            token = step(token)
            steps.append(time.perf_counter() - s0)
        if rep < warmup:
            continue
        ttft.append((t1 - t0) * 1e3)
        prefill_rate.append(len(prompt) / (t1 - t0))
        decode.append(len(steps) / sum(steps))
        step_ms.extend(s * 1e3 for s in steps)
    return {
        "ttft_ms": stats(ttft),
        "prefill_tok_s": stats(prefill_rate),
        "decode_tok_s": stats(decode),
        "decode_latency_ms": stats(step_ms),
    }


def measure(
    bundle: str | Path,
    threads: int,
    prompt_tokens: int,
    gen_tokens: int,
    repetitions: int,
    warmup: int,
    context: int | None = None,
) -> dict:
    """One setting, in this process: the worker side of `run()`. Peak memory comes with its
    parts: the interpreter, the libraries, the onnxruntime session (weights as loaded and packed,
    and the KV cache, whose share is computed), the tokenizer, and what the requests added."""
    memory = {"python": current_rss_mb()}
    import numpy  # noqa: F401  (imported here so that their share is measured)
    import onnxruntime  # noqa: F401
    import tokenizers  # noqa: F401

    from edge_slm import runtime

    memory["libraries"] = current_rss_mb()
    start = time.perf_counter()
    model = runtime.load(bundle, threads=threads, verify=False, context=context, memory=memory)
    load_s = time.perf_counter() - start
    if prompt_tokens + gen_tokens > model.context_length:
        where = "the bundle's context" if context is None else "the KV cache (--context)"
        raise EdgeSlmError(f"pp{prompt_tokens} + tg{gen_tokens} exceed {where} of {model.context_length}")
    timings = timed_runs(
        *greedy_steps(model.session), prompt_ids(model, prompt_tokens), gen_tokens, repetitions, warmup
    )
    peak = peak_rss_mb()
    session = model.session
    kv_bytes = 2 * session.num_layers * math.prod(session.kv_shape) * numpy.dtype(session.kv_dtype).itemsize
    breakdown = {
        "python_mb": memory["python"],
        "libraries_mb": memory["libraries"] - memory["python"],
        "tokenizer_mb": memory["tokenizer"] - memory["libraries"],
        "session_mb": memory["session"] - memory["tokenizer"],
        "kv_cache_mb": kv_bytes / 2**20,
        "requests_mb": peak - memory["session"],
    }
    return {
        "load_s": load_s,
        **timings,
        "peak_rss_mb": peak,
        "memory_breakdown": breakdown,
        "context": model.context_length,
        "providers": model.session.providers,
    }


def greedy_steps(session):
    """`timed_runs`' prefill(ids) and step(token) for a runtime DecoderSession, greedy."""

    def prefill(prompt):
        session.reset()
        return int(session.forward(prompt).argmax())

    def step(token):
        return int(session.forward([token]).argmax())

    return prefill, step


def run(
    bundle: Path,
    threads: list[int],
    prompt_tokens: int = 128,
    gen_tokens: int = 64,
    repetitions: int = 5,
    warmup: int = 1,
    reference: Path | None = None,
    accuracy: bool = True,
    progress=lambda msg: None,
    context: int | None = None,
) -> list[dict]:
    """Benchmark `bundle` once per thread count, each in a fresh process; return the records."""
    from edge_slm.core.bundle import MANIFEST, verify_bundle

    bundle = Path(bundle)
    manifest = verify_bundle(bundle)
    if any(t < 1 for t in threads):
        raise EdgeSlmError(f"--threads {','.join(map(str, threads))}: every count must be 1 or more")
    if accuracy:
        progress("accuracy: perplexity on eval.txt" + (f", top-1 against {reference}" if reference else ""))
        accuracy = _accuracy(bundle, reference, threads[0])
    else:
        accuracy = None
    records = []
    for n, count in enumerate(threads):
        progress(
            f"[{n + 1}/{len(threads)}] pp{prompt_tokens} + tg{gen_tokens}, {count} threads, "
            f"{warmup} warm-up + {repetitions} runs in a fresh process"
        )
        config = {
            "bundle": str(bundle),
            "threads": count,
            "prompt_tokens": prompt_tokens,
            "gen_tokens": gen_tokens,
            "repetitions": repetitions,
            "warmup": warmup,
            "context": context,
        }
        results = run_worker("edge_slm.runtime.bench:measure", config, what="the benchmark process")
        records.append(
            _record(
                bundle,
                manifest,
                config,
                results,
                accuracy,
                hashlib.sha256((bundle / MANIFEST).read_bytes()).hexdigest(),
            )
        )
        progress(
            f"      tg{gen_tokens} {results['decode_tok_s']['mean']:.1f} ± {results['decode_tok_s']['std']:.1f} tok/s, "
            f"first token {results['ttft_ms']['mean']:.0f} ms, peak RSS {results['peak_rss_mb']:.0f} MB"
        )
    return records


def _accuracy(bundle: Path, reference: Path | None, threads: int) -> dict:
    from edge_slm import runtime
    from edge_slm.runtime.evaluate import evaluate

    text = EVAL_TEXT.read_text(encoding="utf-8")
    ref = runtime.load(reference, threads=threads) if reference else None
    result = evaluate(runtime.load(bundle, threads=threads), text, ref, window=512)
    return {**result, "text": "eval.txt", "reference": str(reference) if reference else None}


@dataclass(frozen=True, kw_only=True)
class BundleInfo:
    path: str
    manifest_sha256: str | None  # None for a peer's model file
    target: str
    precision: str
    graph: str  # fused / generic / encoder for a bundle; the peer's name otherwise
    size_bytes: int
    parameters: int
    family: str = "decoder"  # or "encoder": the report gives each family its own table
    # The unpruned model the bundle was built from ({"ref", "sha256"}): bundles of one base model,
    # pruned or not, fp32 or int8, share it, and the report puts them side by side.
    base_model: dict | None = None
    pruned: dict | None = None  # what pruning removed (the manifest's "pruning" in short); None: unpruned

    @classmethod
    def of(cls, path: Path, manifest: Manifest, manifest_sha256: str | None) -> BundleInfo:
        """What a record says about an edge-slm bundle, from its (typed) manifest."""
        pruning = manifest.pruning
        # An encoder's pruning section names the unpruned model; a decoder's source does.
        origin = (pruning.get("pruned_from") if pruning else None) or manifest.source.details.get("pruned_from")
        origin = origin if isinstance(origin, Mapping) else None
        base = origin or {"ref": manifest.source.ref, "sha256": manifest.source.sha256}
        return cls(
            path=str(path),
            manifest_sha256=manifest_sha256,
            target=manifest.target,
            precision=manifest.precision,
            graph=manifest.graph.kind,
            size_bytes=manifest.size_bytes,
            parameters=manifest.model.parameters,
            family=manifest.family,
            base_model={"ref": base.get("ref"), "sha256": base.get("sha256")} if base.get("sha256") else None,
            pruned=pruned_summary(pruning) if pruning else None,
        )


def pruned_summary(pruning: Mapping) -> dict:
    """The manifest's "pruning" section as a record keeps it: what went, and the sizes."""
    heads = pruning.get("removed_heads")
    ffn = pruning.get("ffn_channels")
    summary = {
        "removed_layers": list(pruning.get("removed_layers") or []),
        "removed_heads": sum(len(h) for h in heads.values()) if isinstance(heads, Mapping) else 0,
        "ffn_channels": dict(ffn) if isinstance(ffn, Mapping) else None,
        "parameters_before": pruning.get("parameters_before"),
        "parameters_after": pruning.get("parameters_after"),
    }
    settings = pruning.get("settings")
    if isinstance(settings, Mapping) and "head_groups" in settings:  # a decoder's: shares, not channel counts
        summary.update(head_groups=settings.get("head_groups") or 0, ffn_share=settings.get("ffn") or 0.0)
    return summary


@dataclass(frozen=True, kw_only=True)
class Settings:
    threads: int
    prompt_tokens: int
    gen_tokens: int
    repetitions: int
    warmup: int
    provider: str
    cpu_arena: bool | None  # onnxruntime's CPU arena (on in edge-slm); None for peers
    context: int | None = None  # KV cache capacity in tokens; None: the model's full context


@dataclass(frozen=True, kw_only=True)
class BenchRecord:
    """One benchmark record, the one shape that `edge-slm bench`, benchmarks/peers.py and the
    report share (as a JSON line: `to_dict`)."""

    schema: str = SCHEMA
    system: str
    test: str  # llama-bench's naming: pp128+tg64
    timestamp: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    host: str = field(default_factory=platform.node)
    bundle: BundleInfo
    settings: Settings
    machine: dict = field(default_factory=machine)
    versions: dict
    results: Results  # the family's metrics (edge_slm.runtime.bench_results)
    accuracy: dict | None = None

    def to_dict(self) -> dict:
        record = {f.name: getattr(self, f.name) for f in fields(self)}
        return {
            **record,
            "bundle": asdict(self.bundle),
            "settings": asdict(self.settings),
            "results": self.results.to_dict(),
        }


def test_name(prompt_tokens: int, gen_tokens: int) -> str:
    return f"pp{prompt_tokens}+tg{gen_tokens}"


def _record(
    bundle: Path, manifest: Manifest, config: dict, results: dict, accuracy: dict | None, manifest_sha: str
) -> dict:
    return BenchRecord(
        system="edge-slm",
        test=test_name(config["prompt_tokens"], config["gen_tokens"]),
        bundle=BundleInfo.of(bundle, manifest, manifest_sha),
        settings=Settings(
            **{k: config[k] for k in ("threads", "prompt_tokens", "gen_tokens", "repetitions", "warmup")},
            provider=results["providers"][0],
            cpu_arena=True,
            context=results.get("context"),
        ),
        versions=_versions(),
        results=DecoderResults.of({k: v for k, v in results.items() if k != "providers"}),
        accuracy=accuracy,
    ).to_dict()


def _versions() -> dict:
    import numpy
    import onnxruntime

    return {
        "edge_slm": __version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": numpy.__version__,
        "git_commit": git_commit(),
    }


def table(records: list[dict]) -> str:
    """A terminal table in llama-bench's spirit: the columns that vary, then the measurements (the
    metrics `DecoderResults` declares, with their compact labels)."""
    if not records:
        return ""
    candidates = {
        "system": lambda r: r["system"],
        "target": lambda r: r["bundle"]["target"],
        "precision": lambda r: r["bundle"]["precision"],
        "threads": lambda r: str(r["settings"]["threads"]),
        "host": measured_on,
    }
    shown = [name for name, get in candidates.items() if len({get(r) for r in records}) > 1] or ["precision"]
    metrics = RESULTS["decoder"].columns()
    rows = [
        [candidates[c](r) for c in shown]
        + [r["test"]]
        + list(results_of(r).cells().values())
        + [
            f"{r['bundle']['size_bytes'] / 1e6:.0f}",
            f"{r['accuracy']['perplexity']:.2f}" if r.get("accuracy") else "-",
        ]
        for r in records
    ]
    return text_table(shown + ["test"] + [m.short for _, m in metrics] + ["size MB", "ppl"], rows)


def text_table(header: list[str], rows: list[list[str]]) -> str:
    """Right-aligned columns as wide as their widest cell, in Markdown's table syntax."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def record_problem(record) -> str | None:
    """What is wrong with a benchmark record (one from a device, or a line of a results file), or
    None: the keys the report and the tables read, with their types; its results' as its family's
    declaration (`bench_results`) says."""
    if not isinstance(record, dict):
        return f"a record must be a JSON object, got {type(record).__name__}"
    if not str(record.get("schema", "")).startswith("edge-slm-bench/"):
        return "not an edge-slm benchmark record (no 'schema': 'edge-slm-bench/...')"
    number = (int, float)
    checks = {
        "system": str,
        "test": str,
        "host": str,
        "bundle.target": str,
        "bundle.precision": str,
        "bundle.size_bytes": number,
        "settings.threads": int,
    }
    for key, kind in checks.items():
        value = record
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"'{key}' is missing or not a {'number' if kind is number else kind.__name__}"
    family = record_family(record)
    if family not in RESULTS:
        return f"'bundle.family' is {family!r}; this edge-slm reads records of {', '.join(RESULTS)} bundles"
    return results_problem(record)


def bench_bundle(
    bundle: Path,
    threads: list[int] | None = None,
    prompt_tokens: int = 128,
    gen_tokens: int = 64,
    repetitions: int = 5,
    warmup: int = 1,
    reference: Path | None = None,
    accuracy: bool = True,
    context: int | None = None,
    progress=lambda msg: None,
) -> list[dict]:
    """`edge-slm bench` of a bundle of any family, here or on a device (`bench_worker`); no
    thread counts: the profile's. Counts above this machine's cores are capped, with the runtime's
    warning, so that a record says how many threads ran."""
    from edge_slm.core.bundle import verify_bundle
    from edge_slm.core.manifest import EncoderManifest, Seq2SeqManifest
    from edge_slm.runtime.model import capped_threads

    bundle = Path(bundle)
    manifest = verify_bundle(bundle)
    threads = list(dict.fromkeys(capped_threads(t) for t in threads or [manifest.profile.runtime.threads]))
    if isinstance(manifest, EncoderManifest):
        from edge_slm.runtime.bench_encoder import run_encoder

        return run_encoder(bundle, manifest, threads, repetitions, warmup, accuracy, progress)
    if isinstance(manifest, Seq2SeqManifest):
        from edge_slm.runtime.bench_seq2seq import run_seq2seq

        ref = Path(reference) if reference else None
        return run_seq2seq(bundle, manifest, threads, repetitions, warmup, accuracy, ref, progress)
    return run(
        bundle,
        threads,
        prompt_tokens,
        gen_tokens,
        repetitions,
        warmup,
        Path(reference) if reference else None,
        accuracy=accuracy,
        progress=progress,
        context=context,
    )


def bench_worker(**config) -> dict:
    """`bench_bundle` as a worker (`edge-slm bench --host` runs it on the device over SSH)."""
    return {"records": bench_bundle(**config)}
