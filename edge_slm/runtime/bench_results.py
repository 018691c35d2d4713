"""What a benchmark record's `results` holds, as typed fields: one declaration per metric (its key,
unit, column labels, the statistics a cell shows and their digits), from which `edge-slm bench`'s
tables, the report's tables and the record checker derive their columns. llama-bench keeps
`get_fields()` / `get_values()` beside its record for its printers; here the dataclass is the list,
so adding a metric is adding one field.

The JSON on disk keeps its shape: `of()` reads a record's `results` object (keys no field declares
are kept in `extra`, as a system wrote them) and `to_dict()` writes the same object back.
Device-safe: the bench workers run on the device.
"""

from __future__ import annotations

import functools
import typing
from dataclasses import MISSING, dataclass, field, fields


@dataclass(frozen=True, kw_only=True)
class Stats:
    """One measured quantity over the repetitions (`bench.stats`), warm-up excluded."""

    mean: float
    std: float
    p50: float
    p90: float
    p99: float
    n: int
    samples: list[float]
    extra: dict = field(default_factory=dict)  # what a test adds: the input's "tokens", the batch's "texts"

    @classmethod
    def of(cls, value: dict) -> Stats:
        known = [f.name for f in fields(cls) if f.name != "extra"]
        return cls(**{k: value[k] for k in known}, extra={k: v for k, v in value.items() if k not in known})

    def to_dict(self) -> dict:
        return {**{f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}, **self.extra}


@dataclass(frozen=True)
class Metric:
    """How a result field is shown: the report's column label, the terminal table's compact one,
    its unit, which statistics a cell shows ("mean ± std", or others joined by " / ") and digits."""

    label: str
    short: str
    unit: str
    show: tuple[str, ...] = ("mean", "std")
    digits: int = 1

    def cell(self, value: Stats | float | None) -> str:
        if value is None:
            return "-"
        if not isinstance(value, Stats):
            return f"{value:.{self.digits}f}"
        numbers = [f"{getattr(value, s):.{self.digits}f}" for s in self.show]
        return " ± ".join(numbers) if self.show == ("mean", "std") else " / ".join(numbers)


def metric(label: str, short: str, unit: str, show=("mean", "std"), digits: int = 1, optional: bool = False):
    """A result field shown in the tables; `optional` ones may be missing from a record (a cell "-")."""
    return field(
        default=None if optional else MISSING, metadata={"metric": Metric(label, short, unit, tuple(show), digits)}
    )


class Results:
    """What the families' results share: reading and writing the JSON object, and the columns."""

    extra: dict

    @classmethod
    def of(cls, value: dict):
        declared = {f.name: f for f in fields(cls) if f.name != "extra"}
        parsed = {}
        for name in declared:
            if name in value:
                stats = _is_stats(cls, name) and value[name] is not None
                parsed[name] = Stats.of(value[name]) if stats else value[name]
        return cls(**parsed, extra={k: v for k, v in value.items() if k not in declared})

    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "extra" or (value is None and f.default is None):
                continue  # an optional field the system did not measure stays absent, as it was
            out[f.name] = value.to_dict() if isinstance(value, Stats) else value
        return {**out, **self.extra}

    @classmethod
    def columns(cls) -> list[tuple[str, Metric]]:
        """(field name, how it is shown) of every metric, in declaration order."""
        return [(f.name, f.metadata["metric"]) for f in fields(cls) if "metric" in f.metadata]

    def cells(self) -> dict[str, str]:
        return {name: m.cell(getattr(self, name)) for name, m in self.columns()}


@functools.cache
def _hints(cls: type) -> dict:
    return typing.get_type_hints(cls)  # the annotations as types (they are strings in this module)


def _is_stats(cls: type, name: str) -> bool:
    hint = _hints(cls)[name]
    return hint is Stats or Stats in typing.get_args(hint)


@dataclass(frozen=True, kw_only=True)
class DecoderResults(Results):
    """`edge-slm bench` on a decoder bundle (and the peers measured as it is)."""

    decode_tok_s: Stats = metric("decode tok/s", "tg tok/s", "tok/s")
    prefill_tok_s: Stats = metric("prefill tok/s", "pp tok/s", "tok/s", digits=0)
    ttft_ms: Stats = metric("first token ms", "ttft ms", "ms", digits=0)
    # Not measured through the server (benchmarks/serve_load.py).
    decode_latency_ms: Stats | None = metric(
        "step ms p50 / p99", "step ms p50/p99", "ms", show=("p50", "p99"), optional=True
    )
    peak_rss_mb: float = metric("peak RSS MB", "peak RSS MB", "MB", digits=0)
    load_s: float | None = None
    memory_breakdown: dict | None = None  # MB: python, libraries, tokenizer, session, kv_cache, requests
    context: int | None = None  # the KV cache's capacity in tokens
    extra: dict = field(default_factory=dict)  # what a system adds (the server's streamed and load figures)


@dataclass(frozen=True, kw_only=True)
class EncoderResults(Results):
    """`edge-slm bench` on an encoder bundle (and the peers in benchmarks/encoder_peers.py)."""

    latency_ms_16: Stats = metric("1 text, 16 tokens: ms p50 / p90", "b1@16 p50/p90 ms", "ms", show=("p50", "p90"))
    latency_ms_128: Stats = metric("1 text, 128 tokens: ms p50 / p90", "b1@128 p50/p90 ms", "ms", show=("p50", "p90"))
    texts_per_s_b8: Stats = metric("texts/s, batch 8", "b8 texts/s", "texts/s", digits=0)
    texts_per_s_b32: Stats = metric("texts/s, batch 32", "b32 texts/s", "texts/s", digits=0)
    peak_rss_mb: float = metric("peak RSS MB", "peak RSS MB", "MB", digits=0)
    load_s: float | None = None
    rss_after_load_mb: float | None = None
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Seq2SeqResults(Results):
    """`edge-slm bench` on a seq2seq (translation) bundle: greedy, end to end (text in, text out)."""

    latency_ms_1: Stats = metric("1 sentence: ms p50 / p90", "s1 p50/p90 ms", "ms", show=("p50", "p90"), digits=0)
    sentences_per_s_b1: Stats = metric("sentences/s, one at a time", "s1 sent/s", "sentences/s", digits=2)
    sentences_per_s_b16: Stats = metric("sentences/s, batch 16", "b16 sent/s", "sentences/s", digits=2)
    peak_rss_mb: float = metric("peak RSS MB", "peak RSS MB", "MB", digits=0)
    load_s: float | None = None
    rss_after_load_mb: float | None = None
    extra: dict = field(default_factory=dict)


# A record's family (`bundle.family`, "decoder" when absent) -> the type of its results.
RESULTS: dict[str, type[Results]] = {"decoder": DecoderResults, "encoder": EncoderResults, "seq2seq": Seq2SeqResults}


def record_family(record: dict) -> str:
    """The family of the bundle a bench record measured (records written before the key: decoder).
    A record is not a manifest: it names its bundle's family as a string, read only here."""
    bundle = record.get("bundle")
    return (bundle.get("family") if isinstance(bundle, dict) else None) or "decoder"


def measured_on(record: dict) -> str:
    """Where a record was measured: the device's name in the inventory or `--host` for a record
    fetched from a device (devices may share a hostname: three users on one machine, or a fleet
    of identical images), else the machine's own hostname."""
    remote = record.get("remote")
    host = remote.get("host") if isinstance(remote, dict) else None
    return str(host or record.get("host"))


def results_type(record: dict) -> type[Results]:
    return RESULTS[record_family(record)]


def results_of(record: dict) -> Results:
    """The typed results of a record read from JSON (checked first by `bench.record_problem`)."""
    return results_type(record).of(record["results"])


def results_problem(record: dict) -> str | None:
    """What is wrong with a record's `results` for its family's declaration, or None: every field
    a metric needs, with its type, named as the record's path ('results.ttft_ms.mean')."""
    kind = results_type(record)
    results = record.get("results")
    if not isinstance(results, dict):
        return "'results' is missing or not an object"
    for f in fields(kind):
        value = results.get(f.name)
        if f.name == "extra" or (value is None and f.default is None):
            continue  # an optional field this system did not measure
        if _is_stats(kind, f.name):
            if not isinstance(value, dict):
                return f"'results.{f.name}' is missing or not an object"
            for part, hint in _hints(Stats).items():
                if part == "extra":
                    continue
                problem = _type_problem(f"results.{f.name}.{part}", value.get(part), hint)
                if problem:
                    return problem
        elif "metric" in f.metadata:
            problem = _type_problem(f"results.{f.name}", value, float)
            if problem:
                return problem
    return None


def _type_problem(path: str, value, declared) -> str | None:
    if typing.get_origin(declared) is list:
        ok, name = isinstance(value, list), "list"
    elif declared is int:
        ok, name = isinstance(value, int) and not isinstance(value, bool), "int"
    else:
        ok, name = isinstance(value, (int, float)) and not isinstance(value, bool), "number"
    return None if ok else f"'{path}' is missing or not a {name}"
