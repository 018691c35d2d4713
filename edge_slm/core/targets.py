"""Target profiles: `targets/*.toml` loaded into frozen dataclasses that reject unknown keys.

A profile is all the hardware knowledge of one device (what it is, how to run on it, how to build
for it, what it must fit in). `edge-slm targets` lists them; `--target NAME|FILE` picks one.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from edge_slm.core.capabilities import version_tuple
from edge_slm.core.errors import ProfileError
from edge_slm.core.tomlfile import TOMLDecodeError, read_toml

Precision = Literal["fp32", "fp16", "int8", "int4"]
GraphKind = Literal["fused", "generic"]


@dataclass(frozen=True)
class Device:
    arch: Literal["aarch64", "x86_64"]
    cpu: str
    cores: int
    ram_mb: int
    features: tuple[str, ...] = ()
    cuda_compute_capability: str | None = None


@dataclass(frozen=True)
class TensorRT:
    """Options for onnxruntime's TensorRT execution provider (the shape profiles come from the bundle)."""

    fp16_enable: bool = True
    int8_enable: bool = False  # applied to int8 (QDQ) bundles only
    engine_cache_path: str = "~/.cache/edge-slm/tensorrt"
    max_prompt_tokens: int = 512  # largest prefill the shape profile allows


@dataclass(frozen=True)
class Runtime:
    execution_providers: tuple[str, ...]
    threads: int
    onnxruntime_versions: tuple[str, ...] = ()
    tensorrt: TensorRT | None = None
    # `edge-slm serve`'s bounds on one request (its flags override them): a client that asks for
    # more tokens gets at most this many, and a request is stopped after this many seconds.
    serve_max_tokens: int = 512
    serve_request_seconds: float = 120.0
    # Requests `edge-slm serve` decodes together (--parallel), each in its own KV slot of the context.
    serve_parallel: int = 1

    @property
    def oldest_onnxruntime(self) -> str | None:
        return min(self.onnxruntime_versions, key=version_tuple, default=None)


@dataclass(frozen=True)
class Export:
    graph: GraphKind
    opset: int
    ir_version: int
    context_length: int
    external_data: bool = True


@dataclass(frozen=True)
class Quantize:
    precision: Precision
    block_size: int = 32  # input channels sharing one scale (int8 / int4)
    symmetric: bool = True  # False keeps a float minimum per block (4-bit weights only)
    # How an asymmetric block's minimum reaches the kernel: "offsets" runs onnxruntime's symmetric
    # fast path plus one small float product of per-block input sums; "zero_points" passes float
    # zero points (exact too, but the CPU kernel has no fast path for them: 15x slower).
    block_minimum: Literal["offsets", "zero_points"] = "offsets"
    accuracy_level: int = 4  # MatMulNBits compute type: 0/1 float, 4 int8 activations per block
    prefill_accuracy_level: int = -1  # >= 0: a second graph for prompts (prefill.onnx, same weights) at this level
    quantize_embedding: bool = True  # GatherBlockQuantized for the embedding table
    embedding_bits: int = 0  # bits for the embedding and a tied LM head; 0: as the precision
    fp16_scales: bool = False  # store scales / zero points in fp16 on disk (cast at load)
    block_size_overrides: tuple[str, ...] = ()  # "name-part:block", e.g. "mlp.down_proj:16"
    int8_format: Literal["weight_only", "qdq"] = "weight_only"  # qdq: static S8S8 for TensorRT
    smooth_alphas: tuple[float, ...] = ()  # SmoothQuant strengths tried per activation; () does not smooth
    max_product_error: float = 0.02  # qdq: activations whose int8 product errs more stay float
    keep_float: tuple[str, ...] = ()  # qdq: activations left unquantized (glob on tensor names)
    calibration_percentile: float = 100.0  # qdq: |x| percentile that sets an activation's scale

    def block_size_for(self, weight_name: str) -> int:
        for rule in self.block_size_overrides:
            part, size = rule.rsplit(":", 1)
            if part in weight_name:
                return int(size)
        return self.block_size


@dataclass(frozen=True)
class Prune:
    """Structured pruning of a decoder before export (`edge-slm prune`'s options) and what the
    pruned model must keep against the unpruned one."""

    ffn: float = 0.0  # share of FFN channels removed in every layer
    head_groups: int = 0  # whole GQA groups removed in every layer
    layers: int = 0  # whole decoder layers removed
    recover_steps: int = 0  # distillation steps from the unpruned model
    recover_minutes: float = 0.0  # time budget for them (0: none)
    max_ppl_increase: float = 0.15  # the pruned model's perplexity at most +15% against the unpruned model


@dataclass(frozen=True)
class EncoderPrune:
    """Structured pruning of an encoder on its task (`edge-slm prune`, `edge-slm build --prune`) and
    what the pruned bundle must keep against the unpruned fp32 model."""

    layers: int = 0  # whole layers removed, lowest block influence first
    heads: float = 0.0  # share of attention heads removed in every layer
    ffn: float = 0.0  # share of FFN channels removed in every layer
    recover_steps: int = 0  # distillation steps from the unpruned model on the task's data
    recover_minutes: float = 0.0  # time budget for them (0: none)
    recover_lr: float = 1e-4  # distillation's peak learning rate (warm-up, then cosine decay over recover_steps)
    recover_max_tokens: int = 128  # distillation's inputs are cut to this many tokens
    recover_int8_share: float = 0.0  # the last share of distillation runs through simulated dynamic int8 (0: none)
    recover_hidden_weight: float = 1.0  # embedder: weight of the per-layer hidden-state term against the pooled vectors
    max_accuracy_drop: float = 0.01  # classifier: test accuracy at most 1 point below the unpruned fp32 model
    min_cosine: float = 0.95  # embedder: mean cosine similarity to the unpruned model's embeddings
    max_recall_drop: float = 0.02  # embedder: retrieval top-1 at most 2 points below the unpruned model's


@dataclass(frozen=True)
class Encoder:
    """How BERT-family encoders (classifiers, sentence embedders) are built for this device, and
    the accuracy their reduced precision must keep against fp32."""

    precision: Literal["fp32", "fp16", "int8"] = "int8"
    int8_format: Literal["dynamic", "qdq"] = "dynamic"  # dynamic: int8 MatMul with per-call activation scales (CPUs)
    per_channel: bool = True  # one weight scale per output channel
    # Weights in -64..64 ("7-bit"): x86 without VNNI sums uint8 x int8 products in pairs in 16 bits,
    # which 8-bit weights can saturate; 7-bit ones cannot, so every x86 build host gates the same sums.
    reduce_range: bool = True
    quantize_embeddings: bool = False  # int8 word/position tables (QEmbedLayerNormalization)
    # The MatMuls that read a GELU's output (the FFN's second half): int8 ("never" float), float
    # ("always"), or int8 unless that misses the accuracy budget ("if-needed": measured twice).
    float_after_gelu: Literal["never", "always", "if-needed"] = "never"
    max_sequence_length: int = 256  # longer inputs are truncated (or refused) at run time
    # Each residual add + LayerNorm as one SkipLayerNormalization node (true), or left as Add +
    # LayerNormalization (false: onnxruntime's CPU kernel for the fused node is the slower one).
    fuse_skip_layer_norm: bool = True
    min_label_agreement: float = 0.99  # classifier: share of test labels equal to fp32's
    max_accuracy_drop: float = 0.005  # classifier: test accuracy at most 0.5 points below fp32
    min_cosine: float = 0.99  # embedder: mean cosine similarity to fp32's embeddings
    min_retrieval_agreement: float = 0.98  # embedder: queries whose top-1 passage is fp32's


@dataclass(frozen=True)
class TranslationBudget:
    """How close a reduced-precision translator's greedy output must stay to fp32's on the shipped
    parallel text (builder/seq2seq/gate.py): corpus chrF and BLEU (sacrebleu, 0-100) of its
    translations against fp32's, and the share of sentences written word for word alike."""

    min_chrf: float = 90.0
    min_bleu: float = 70.0
    min_identical: float = 0.5


@dataclass(frozen=True)
class Seq2Seq:
    """How encoder-decoder translators (Marian, T5, M2M100) are built for this device."""

    precision: Literal["fp32", "fp16", "int8"] = "int8"
    reduce_range: bool = True  # int8 weights in -64..64, as [encoder] reduce_range (same CPU kernels)
    int8: TranslationBudget = TranslationBudget()
    fp16: TranslationBudget = TranslationBudget(min_chrf=98.0, min_bleu=95.0, min_identical=0.9)


@dataclass(frozen=True)
class AccuracyBudget:
    max_ppl_increase: float  # relative: 0.015 is +1.5% perplexity against fp32
    min_top1: float = 0.0  # share of next tokens that agree with fp32
    # Another machine running this bundle (deploy's smoke test, verify --emulate): its logits may
    # differ by this share of the largest logit. ARM's int8 kernels quantize activations and
    # accumulate in another order than x86's: logits move by a few hundredths on logits of ~20-30.
    max_logit_difference: float = 0.02


@dataclass(frozen=True)
class Budget:
    max_peak_rss_mb: int
    fp16: AccuracyBudget | None = None
    int8: AccuracyBudget | None = None
    int4: AccuracyBudget | None = None


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    device: Device
    runtime: Runtime
    export: Export
    quantize: Quantize
    budget: Budget
    prune: Prune | None = None
    encoder: Encoder = Encoder()
    classifier_prune: EncoderPrune | None = None  # `build --prune` of a classifier
    embedder_prune: EncoderPrune | None = None  # `build --prune` of a sentence embedder
    seq2seq: Seq2Seq = Seq2Seq()
    source: str = field(default="", compare=False)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data.pop("source")
        return data


# In a checkout the profiles are the repository's targets/ folder; an installed wheel carries the
# same files as package data (edge_slm/profiles/, mapped from targets/ in pyproject.toml).
_CHECKOUT_TARGETS = Path(__file__).resolve().parents[2] / "targets"
_PACKAGED_TARGETS = Path(__file__).resolve().parents[1] / "profiles"
TARGETS_DIR = _CHECKOUT_TARGETS if _CHECKOUT_TARGETS.is_dir() else _PACKAGED_TARGETS


def known_targets(directory: Path = TARGETS_DIR) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.toml"))


def load_profile(name_or_path: str, directory: Path = TARGETS_DIR) -> Profile:
    """Load a profile by name (`rpi5`) or by path (`boards/mine.toml`)."""
    path = _profile_path(name_or_path, directory)
    raw = _read_raw(path, directory, seen=())
    profile = profile_from_dict(raw, where=str(path))
    return dataclasses.replace(profile, source=str(path))


def _profile_path(name_or_path: str, directory: Path) -> Path:
    path = Path(name_or_path)
    if not (path.suffix == ".toml" or path.exists()):
        path = directory / f"{name_or_path}.toml"
        if not path.exists():
            known = ", ".join(known_targets(directory)) or "none"
            raise ProfileError(
                f"unknown target '{name_or_path}': known targets are {known} (or pass a path to your own .toml profile)"
            )
    if not path.is_file():
        raise ProfileError(f"{path}: no such profile file")
    return path


def _read_raw(path: Path, directory: Path, seen: tuple[Path, ...]) -> dict:
    """The profile's TOML as a dict; `extends = "rpi4"` starts from that profile, and the tables
    given here replace or add keys, so that a variant cannot drift from its base."""
    if path.resolve() in seen:
        raise ProfileError(f"{path}: 'extends' loops back to itself")
    try:
        raw = read_toml(path)
    except TOMLDecodeError as exc:
        raise ProfileError(f"{path}: not valid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{path}: cannot be read ({exc})") from None
    base_name = raw.pop("extends", None)
    if base_name is None:
        return raw
    if not isinstance(base_name, str) or not base_name or base_name not in known_targets(directory):
        known = ", ".join(known_targets(directory))
        raise ProfileError(f"{path}: 'extends' must name a shipped target ({known}), got {base_name!r}")
    base = _read_raw(directory / f"{base_name}.toml", directory, (*seen, path.resolve()))
    return _merge(base, raw)


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


def profile_from_dict(raw: dict, where: str = "profile") -> Profile:
    profile = _build(Profile, {k: v for k, v in raw.items() if k != "source"}, where, "")
    _check_values(profile, where)
    return profile


def _printable(text: str) -> str:
    """A key as it can stand in a one-line message (control characters escaped)."""
    return text if text.isprintable() else repr(text)[1:-1]


def _build(cls, raw, where: str, prefix: str):
    if not isinstance(raw, dict):
        raise ProfileError(f"{where}: [{prefix.rstrip('.')}] must be a table, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        allowed = ", ".join(fields)
        raise ProfileError(f"{where}: unknown key '{_printable(prefix + unknown[0])}' (allowed here: {allowed})")
    values = {}
    for name, f in fields.items():
        key = f"{prefix}{name}"
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ProfileError(f"{where}: missing required key '{key}'")
            continue
        values[name] = _convert(hints[name], raw[name], where, key)
    return cls(**values)


def _convert(tp, value, where: str, key: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where, f"{key}.")
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        return _convert(next(a for a in args if a is not type(None)), value, where, key)
    if origin is Literal:
        if value not in args:
            allowed = ", ".join(repr(a) for a in args)
            raise ProfileError(f"{where}: '{key}' is {value!r}; allowed values: {allowed}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ProfileError(f"{where}: '{key}' must be a list, got {type(value).__name__}")
        return tuple(_convert(args[0], v, where, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ProfileError(f"{where}: '{key}' must be {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _check_values(profile: Profile, where: str) -> None:
    if profile.runtime.serve_max_tokens < 1 or not profile.runtime.serve_request_seconds > 0:
        raise ProfileError(
            f"{where}: 'runtime.serve_max_tokens' must be at least 1 and 'runtime.serve_request_seconds' above 0"
        )
    if profile.runtime.serve_parallel < 1:
        raise ProfileError(
            f"{where}: 'runtime.serve_parallel' is {profile.runtime.serve_parallel}; it must be at least 1"
        )
    if profile.runtime.threads < 1:
        raise ProfileError(f"{where}: 'runtime.threads' is {profile.runtime.threads}; it must be at least 1")
    if profile.export.context_length < 16:
        raise ProfileError(f"{where}: 'export.context_length' must be at least 16")
    q = profile.quantize
    if q.block_size < 16 or q.block_size & (q.block_size - 1):
        raise ProfileError(
            f"{where}: 'quantize.block_size' is {q.block_size}; use a power of two from 16 (16, 32, 64, 128)"
        )
    for rule in q.block_size_overrides:
        part, _, size = rule.rpartition(":")
        if not part or not size.isdigit() or int(size) < 16 or int(size) & (int(size) - 1):
            raise ProfileError(
                f"{where}: 'quantize.block_size_overrides' entry {rule!r}; write \"name-part:block\" "
                'with a power-of-two block from 16, e.g. "mlp.down_proj:16"'
            )
    if q.block_minimum not in ("offsets", "zero_points"):
        raise ProfileError(
            f'{where}: \'quantize.block_minimum\' is {q.block_minimum!r}; use "offsets" or "zero_points"'
        )
    if q.embedding_bits not in (0, 4, 8):
        raise ProfileError(
            f"{where}: 'quantize.embedding_bits' is {q.embedding_bits}; use 0 (as the precision), 4 or 8"
        )
    if q.prefill_accuracy_level not in (-1, 0, 1, 2, 3, 4):
        raise ProfileError(
            f"{where}: 'quantize.prefill_accuracy_level' is {q.prefill_accuracy_level}; use -1 (no prefill graph) or 0-4"
        )
    if q.accuracy_level not in (0, 1, 2, 3, 4):
        raise ProfileError(
            f"{where}: 'quantize.accuracy_level' is {q.accuracy_level}; use 0-4 (see onnxruntime MatMulNBits)"
        )
    if any(not 0 <= a <= 1 for a in q.smooth_alphas) or (q.int8_format == "qdq" and not q.smooth_alphas):
        raise ProfileError(
            f"{where}: 'quantize.smooth_alphas' is {list(q.smooth_alphas)}; list strengths from 0 (off) to 1"
            + (" (static int8 needs at least one, e.g. [0.0])" if q.int8_format == "qdq" else "")
        )
    if not 0 < q.max_product_error <= 1:
        raise ProfileError(
            f"{where}: 'quantize.max_product_error' is {q.max_product_error}; use a share above 0, up to 1"
        )
    if not 90 <= q.calibration_percentile <= 100:
        raise ProfileError(f"{where}: 'quantize.calibration_percentile' is {q.calibration_percentile}; use 90-100")
    for table in ("classifier_prune", "embedder_prune"):
        spec = getattr(profile, table)
        if spec is not None:
            _check_encoder_prune(spec, where, table)
    e = profile.encoder
    if not 8 <= e.max_sequence_length <= 8192:
        raise ProfileError(f"{where}: 'encoder.max_sequence_length' is {e.max_sequence_length}; use 8 to 8192")
    for key in ("min_label_agreement", "max_accuracy_drop", "min_cosine", "min_retrieval_agreement"):
        if not 0 <= getattr(e, key) <= 1:
            raise ProfileError(f"{where}: 'encoder.{key}' is {getattr(e, key)}; use a share from 0 to 1")
    for precision in ("int8", "fp16"):
        budget = getattr(profile.seq2seq, precision)
        for key in ("min_chrf", "min_bleu"):
            if not 0 <= getattr(budget, key) <= 100:
                raise ProfileError(f"{where}: 'seq2seq.{precision}.{key}' is {getattr(budget, key)}; use 0 to 100")
        if not 0 <= budget.min_identical <= 1:
            raise ProfileError(
                f"{where}: 'seq2seq.{precision}.min_identical' is {budget.min_identical}; use a share from 0 to 1"
            )
    if not profile.runtime.execution_providers:
        raise ProfileError(f"{where}: 'runtime.execution_providers' must name at least one provider")


def _check_encoder_prune(spec: EncoderPrune, where: str, table: str) -> None:
    """The [classifier_prune] / [embedder_prune] values that cannot be right for any model (the layer
    count is checked against the model when it is loaded). Written as `not (in range)` so that nan,
    which TOML allows and every comparison rejects, is refused too: a nan budget would pass any model."""
    shares = {"heads": spec.heads, "ffn": spec.ffn}
    for key, value in shares.items():
        if not 0 <= value < 1:
            raise ProfileError(
                f"{where}: '{table}.{key}' is {value}; give the share to remove in every layer, from 0 up to "
                "but not including 1 (0.25 removes a quarter)"
            )
    counts = {"layers": spec.layers, "recover_steps": spec.recover_steps}
    for key, value in counts.items():
        if value < 0:
            raise ProfileError(f"{where}: '{table}.{key}' is {value}; use 0 or more")
    if not 0 <= spec.recover_minutes < float("inf"):
        raise ProfileError(f"{where}: '{table}.recover_minutes' is {spec.recover_minutes}; use 0 (no limit) or more")
    if not 0 < spec.recover_lr <= 1:
        raise ProfileError(
            f"{where}: '{table}.recover_lr' is {spec.recover_lr}; use a learning rate above 0, up to 1 (e.g. 1e-4)"
        )
    if not 8 <= spec.recover_max_tokens <= 8192:
        raise ProfileError(
            f"{where}: '{table}.recover_max_tokens' is {spec.recover_max_tokens}; use 8-8192 (tokens a "
            "distillation input is cut to)"
        )
    if not 0 <= spec.recover_hidden_weight <= 100:
        raise ProfileError(
            f"{where}: '{table}.recover_hidden_weight' is {spec.recover_hidden_weight}; use 0 (pooled vectors only) "
            "to 100"
        )
    for key in ("recover_int8_share", "max_accuracy_drop", "min_cosine", "max_recall_drop"):
        if not 0 <= getattr(spec, key) <= 1:
            raise ProfileError(f"{where}: '{table}.{key}' is {getattr(spec, key)}; use a share from 0 to 1")
