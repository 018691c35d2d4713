"""Typed bundle manifests: one frozen dataclass per family, made once from the checked JSON.

`manifest.json` stays the on-disk contract (the builder writes it as a dict); everything that reads
a bundle reads it through these types, never by string keys: `core.bundle.read_manifest` and
`verify_bundle` check the JSON (`core.manifest_schema`) and return a `DecoderManifest` or an
`EncoderManifest`. Code that differs by family dispatches on the type (`isinstance`, a mapping
from type to implementation, or the ClassVars below), so a new family (a `Seq2SeqManifest` for
translation: its own model and graph sections, two graphs) adds a class and an entry in
`MANIFEST_TYPES`, not `if family ==` branches. Device-safe: stdlib only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar

_EMPTY: Mapping = MappingProxyType({})


def _frozen(value) -> Mapping:
    """A read-only view of a free-form record (quantization recipe, accuracy figures...)."""
    return MappingProxyType(value) if isinstance(value, dict) else _EMPTY


def _recorded():
    """A field for the section as recorded: kept for printing, left out of repr."""
    return field(default_factory=lambda: _EMPTY, repr=False)


def _text(value) -> str | None:
    return value if isinstance(value, str) else None


def _number(value, default: float) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Source:
    """Where the model came from (recorded, not checked: free-form beyond these three)."""

    ref: str | None
    kind: str | None
    sha256: str | None
    details: Mapping = _recorded()  # architecture, pruned_from, ...

    @classmethod
    def of(cls, raw: dict) -> Source:
        return cls(_text(raw.get("ref")), _text(raw.get("kind")), _text(raw.get("sha256")), _frozen(raw))


@dataclass(frozen=True)
class TensorRTSettings:
    """The profile's [runtime.tensorrt] table as recorded (defaults: core.targets.TensorRT's)."""

    fp16_enable: bool = True
    int8_enable: bool = False
    engine_cache_path: str = "~/.cache/edge-slm/tensorrt"
    max_prompt_tokens: int = 512

    @classmethod
    def of(cls, raw: dict) -> TensorRTSettings:
        default = cls()
        tokens = raw.get("max_prompt_tokens")
        return cls(
            fp16_enable=bool(raw.get("fp16_enable", default.fp16_enable)),
            int8_enable=bool(raw.get("int8_enable", default.int8_enable)),
            engine_cache_path=_text(raw.get("engine_cache_path")) or default.engine_cache_path,
            max_prompt_tokens=tokens if isinstance(tokens, int) and tokens > 0 else default.max_prompt_tokens,
        )


@dataclass(frozen=True)
class RuntimeSettings:
    """What the runtime and the server take from the bundle's profile."""

    execution_providers: tuple[str, ...]
    threads: int
    onnxruntime_versions: tuple[str, ...] = ()
    tensorrt: TensorRTSettings | None = None
    # The server's caps (core.targets.Runtime has the reasons); a bundle built before them: the defaults.
    serve_max_tokens: int = 512
    serve_request_seconds: float = 120.0
    serve_parallel: int = 1  # a bundle built before the key: one request at a time, as it was served

    @classmethod
    def of(cls, raw: dict) -> RuntimeSettings:
        versions = raw.get("onnxruntime_versions")
        trt = raw.get("tensorrt")
        return cls(
            execution_providers=tuple(raw["execution_providers"]),
            threads=raw["threads"],
            onnxruntime_versions=tuple(v for v in versions if isinstance(v, str)) if isinstance(versions, list) else (),
            tensorrt=TensorRTSettings.of(trt) if isinstance(trt, dict) else None,
            serve_max_tokens=raw.get("serve_max_tokens", cls.serve_max_tokens),
            serve_request_seconds=float(raw.get("serve_request_seconds", cls.serve_request_seconds)),
            serve_parallel=raw.get("serve_parallel", cls.serve_parallel),
        )


@dataclass(frozen=True)
class AccuracyLimits:
    """One precision's accuracy budget from the recorded profile (0: no limit recorded)."""

    max_ppl_increase: float = 0.0
    min_top1: float = 0.0


@dataclass(frozen=True)
class EncoderGate:
    """The recorded profile's [encoder] thresholds (defaults: core.targets.Encoder's)."""

    min_label_agreement: float = 0.99
    min_cosine: float = 0.99


@dataclass(frozen=True)
class DeviceRecord:
    """The device the bundle was built for: what `runtime.cpu` compares with this CPU."""

    arch: str | None = None  # aarch64 or x86_64
    features: tuple[str, ...] = ()  # CPU flags the build's kernels and quantization chose for

    @classmethod
    def of(cls, raw: dict) -> DeviceRecord:
        return cls(_text(raw.get("arch")), tuple(raw.get("features") or ()))


@dataclass(frozen=True)
class ProfileRecord:
    """The target profile the bundle was built with, as recorded in it."""

    name: str
    runtime: RuntimeSettings
    device: DeviceRecord = DeviceRecord()
    recorded: Mapping = _recorded()  # every section, as the build wrote it

    @classmethod
    def of(cls, raw: dict) -> ProfileRecord:
        return cls(
            _text(raw.get("name")) or "",
            RuntimeSettings.of(raw["runtime"]),
            DeviceRecord.of(raw["device"]),
            _frozen(raw),
        )

    def as_profile(self):
        """The recorded profile as `core.targets.Profile` (what the agreement rule reads), checked
        as a profile file is."""
        from edge_slm.core.targets import profile_from_dict

        return profile_from_dict(dict(self.recorded), where=f"the bundle's profile {self.name!r}")

    def budget(self, precision: str) -> AccuracyLimits:
        budget = self.recorded.get("budget")
        limits = budget.get(precision) if isinstance(budget, dict) else None
        if not isinstance(limits, dict):
            return AccuracyLimits()
        return AccuracyLimits(_number(limits.get("max_ppl_increase"), 0.0), _number(limits.get("min_top1"), 0.0))

    @property
    def encoder_gate(self) -> EncoderGate:
        section = self.recorded.get("encoder")
        section = section if isinstance(section, dict) else {}
        default = EncoderGate()
        return EncoderGate(
            _number(section.get("min_label_agreement"), default.min_label_agreement),
            _number(section.get("min_cosine"), default.min_cosine),
        )


@dataclass(frozen=True, kw_only=True)
class GraphSection:
    """What every family's graph section says: the file, its opset and operators."""

    kind: str  # fused / generic (decoder), encoder
    file: str
    opset: Mapping
    ir_version: int
    nodes: int
    op_counts: Mapping
    recorded: Mapping = _recorded()

    @classmethod
    def _common(cls, raw: dict) -> dict:
        keys = ("kind", "file", "ir_version", "nodes")
        return {
            **{k: raw[k] for k in keys},
            "opset": _frozen(raw["opset"]),
            "op_counts": _frozen(raw["op_counts"]),
            "recorded": _frozen(raw),
        }


@dataclass(frozen=True, kw_only=True)
class ModelSection:
    """What every family's model section says; each family's subclass adds its shape."""

    architecture: str
    parameters: int
    recorded: Mapping = _recorded()  # model_type, intermediate_size, ...: what the type does not name

    @classmethod
    def of(cls, raw: dict) -> ModelSection:
        named = [f for f in cls.__dataclass_fields__ if f != "recorded"]
        return cls(**{k: raw[k] for k in named}, recorded=_frozen(raw))


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """What every bundle's manifest says, whatever its family."""

    family: ClassVar[str]  # the name a user reads ("a decoder bundle"); on disk only for non-decoders
    article: ClassVar[str]  # "a decoder", "an encoder": the refusals name the family
    used_with: ClassVar[str]  # the commands that work with this family, for those refusals

    schema_version: int
    target: str
    precision: str
    created: str | None
    stages: tuple[str, ...]
    source: Source
    profile: ProfileRecord
    min_onnxruntime: str | None
    files: Mapping[str, FileEntry]
    validation: Mapping  # free-form records, empty when absent or null
    quantization: Mapping
    accuracy: Mapping
    pruning: Mapping
    versions: Mapping
    model: ModelSection  # each family's subclass narrows these two
    graph: GraphSection
    raw: dict = field(repr=False)  # the JSON as read: `inspect --json`, equality of two reads

    @property
    def size_bytes(self) -> int:
        return sum(f.bytes for f in self.files.values())

    @property
    def accuracy_passed(self) -> bool:
        return self.accuracy.get("passed") is True

    @property
    def task(self) -> str:
        """What the bundle does, as the server's routes name it ("generation", "embedding", ...)."""
        raise NotImplementedError

    def summary_lines(self, bundle) -> list[str]:
        """`edge-slm inspect`'s lines for this bundle (without the file list)."""
        raise NotImplementedError

    @classmethod
    def _common(cls, raw: dict) -> dict:
        stages = raw.get("stages")
        return {
            "schema_version": raw["schema_version"],
            "target": raw["target"],
            "precision": raw["precision"],
            "created": _text(raw.get("created")),
            "stages": tuple(s for s in stages if isinstance(s, str)) if isinstance(stages, list) else (),
            "source": Source.of(raw["source"]),
            "profile": ProfileRecord.of(raw["profile"]),
            "min_onnxruntime": _text(raw.get("min_onnxruntime")),
            "files": MappingProxyType({n: FileEntry(i["sha256"], i["bytes"]) for n, i in raw["files"].items()}),
            **{k: _frozen(raw.get(k)) for k in ("validation", "quantization", "accuracy", "pruning", "versions")},
            "raw": raw,
        }


# -- decoder -------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DecoderModel(ModelSection):
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int


@dataclass(frozen=True, kw_only=True)
class DecoderGraphSection(GraphSection):
    prefill_file: str | None  # int8 bundles' second graph for prompts
    shared_kv_buffer: bool  # the KV cache is bound in place (IO binding) between steps


@dataclass(frozen=True, kw_only=True)
class DecoderManifest(Manifest):
    """A decoder bundle: one graph with a KV cache (generate, chat, serve)."""

    family: ClassVar[str] = "decoder"
    article: ClassVar[str] = "a decoder"
    used_with: ClassVar[str] = "generate, chat or serve it"

    model: DecoderModel
    graph: DecoderGraphSection
    # The model's own sampling settings (generation_config.json's temperature, top_p, top_k,
    # repetition_penalty): the server's defaults for a request that leaves them out. Empty in
    # bundles built before they were recorded, or from a source that has none.
    sampling_defaults: Mapping = field(default_factory=lambda: _EMPTY)

    @classmethod
    def from_checked(cls, raw: dict) -> DecoderManifest:
        graph = raw["graph"]
        return cls(
            **cls._common(raw),
            sampling_defaults=_sampling_defaults(raw.get("generation")),
            model=DecoderModel.of(raw["model"]),
            graph=DecoderGraphSection(
                **GraphSection._common(graph),
                prefill_file=graph.get("prefill_file"),
                shared_kv_buffer=graph["kv_cache"]["shared_buffer"],
            ),
        )

    @property
    def task(self) -> str:
        return "generation"

    def summary_lines(self, bundle) -> list[str]:
        from edge_slm.core.manifest_text import decoder_lines

        return decoder_lines(self, bundle)


SAMPLING_DEFAULTS = ("temperature", "top_p", "top_k", "repetition_penalty")


def _sampling_defaults(generation) -> Mapping:
    """The manifest's `generation.sampling` (its values checked by manifest_schema), known names only."""
    sampling = generation.get("sampling") if isinstance(generation, dict) else None
    if not isinstance(sampling, dict):
        return _EMPTY
    return MappingProxyType({k: sampling[k] for k in SAMPLING_DEFAULTS if k in sampling})


# -- encoder -------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class EncoderModel(ModelSection):
    task: str  # classification, embedding or question-answering
    normalize: bool
    pooling: str
    labels: tuple[str, ...]
    num_layers: int
    hidden_size: int
    num_heads: int
    vocab_size: int
    max_sequence_length: int
    output_dim: int

    @classmethod
    def of(cls, raw: dict) -> EncoderModel:
        return super().of({**raw, "labels": tuple(raw.get("labels") or ())})


@dataclass(frozen=True, kw_only=True)
class EncoderGraphSection(GraphSection):
    inputs: tuple[str, ...]  # input_ids, attention_mask[, token_type_ids]
    output: str


@dataclass(frozen=True)
class EncoderTokenizer:
    pad_token_id: int
    lowercase: bool | None


@dataclass(frozen=True, kw_only=True)
class EncoderManifest(Manifest):
    """An encoder bundle: texts in, one vector or one set of label scores each (classify, embed)."""

    family: ClassVar[str] = "encoder"
    article: ClassVar[str] = "an encoder"
    used_with: ClassVar[str] = "classify or embed with it"

    model: EncoderModel
    graph: EncoderGraphSection
    tokenizer: EncoderTokenizer

    @classmethod
    def from_checked(cls, raw: dict) -> EncoderManifest:
        graph, tokenizer = raw["graph"], raw["tokenizer"]
        return cls(
            **cls._common(raw),
            model=EncoderModel.of(raw["model"]),
            graph=EncoderGraphSection(
                **GraphSection._common(graph), inputs=tuple(graph["inputs"]), output=graph["output"]
            ),
            tokenizer=EncoderTokenizer(tokenizer["pad_token_id"], tokenizer.get("lowercase")),
        )

    @property
    def task(self) -> str:
        return self.model.task  # classification, embedding or question-answering

    def summary_lines(self, bundle) -> list[str]:
        from edge_slm.core.manifest_text import encoder_lines

        return encoder_lines(self, bundle)


# -- seq2seq -------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Seq2SeqModel(ModelSection):
    model_type: str  # marian, t5
    encoder_layers: int
    decoder_layers: int
    hidden_size: int
    num_heads: int
    vocab_size: int
    max_source_tokens: int  # longest source text in tokens (positions, or the build's cap)


@dataclass(frozen=True, kw_only=True)
class Seq2SeqGraphSection(GraphSection):
    decoder_file: str  # the merged decoder: first step without cache, then with it


@dataclass(frozen=True)
class Seq2SeqTokenizer:
    source_file: str  # encodes the source text
    target_file: str  # decodes the generated ids (Marian: its own vocabulary's pieces)
    special_token_ids: tuple[int, ...]  # left out of the decoded text
    unk_token_id: int
    unk_above: int | None  # source ids from here up are pieces the model's vocabulary lacks: unk


@dataclass(frozen=True)
class SearchSettings:
    """What the decoding loop needs from the model's generation config (transformers' names)."""

    decoder_start_token_id: int
    eos_token_id: int
    pad_token_id: int
    forced_eos: bool  # the last allowed step must emit EOS (Marian)
    suppress_token_ids: tuple[int, ...]  # never generated (Marian's pad)
    min_length: int
    length_penalty: float
    early_stopping: bool | str  # True, False or "never" (transformers' values)


@dataclass(frozen=True)
class Seq2SeqGeneration:
    search: SearchSettings
    max_new_tokens: int
    default_beams: int
    target_languages: Mapping[str, str]  # language -> the text put before the source ("" key: default)
    forced_bos: Mapping[str, int] = field(
        default_factory=lambda: _frozen({})
    )  # language -> the decoder's forced first token (M2M100, NLLB)


@dataclass(frozen=True, kw_only=True)
class Seq2SeqManifest(Manifest):
    """A seq2seq bundle: an encoder and a decoder with cache, texts in, texts out (translate)."""

    family: ClassVar[str] = "seq2seq"
    article: ClassVar[str] = "a seq2seq"
    used_with: ClassVar[str] = "translate with it"

    model: Seq2SeqModel
    graph: Seq2SeqGraphSection
    tokenizer: Seq2SeqTokenizer
    generation: Seq2SeqGeneration

    @classmethod
    def from_checked(cls, raw: dict) -> Seq2SeqManifest:
        graph, tok, gen = raw["graph"], raw["tokenizer"], raw["generation"]
        search = SearchSettings(
            decoder_start_token_id=gen["decoder_start_token_id"],
            eos_token_id=gen["eos_token_id"],
            pad_token_id=gen["pad_token_id"],
            forced_eos=gen["forced_eos"],
            suppress_token_ids=tuple(gen["suppress_token_ids"]),
            min_length=gen["min_length"],
            length_penalty=float(gen["length_penalty"]),
            early_stopping=gen["early_stopping"],
        )
        return cls(
            **cls._common(raw),
            model=Seq2SeqModel.of(raw["model"]),
            graph=Seq2SeqGraphSection(**GraphSection._common(graph), decoder_file=graph["decoder_file"]),
            tokenizer=Seq2SeqTokenizer(
                tok["source_file"],
                tok["target_file"],
                tuple(tok["special_token_ids"]),
                tok["unk_token_id"],
                tok.get("unk_above"),
            ),
            generation=Seq2SeqGeneration(
                search,
                gen["max_new_tokens"],
                gen["default_beams"],
                _frozen(dict(gen["target_languages"])),
                _frozen(dict(gen.get("forced_bos_token_ids", {}))),
            ),
        )

    @property
    def task(self) -> str:
        return "translation"

    def summary_lines(self, bundle) -> list[str]:
        from edge_slm.core.manifest_text import seq2seq_lines

        return seq2seq_lines(self, bundle)


# The on-disk "family" key -> its type; bundles without the key are decoders (the first family).
MANIFEST_TYPES: dict[str, type[Manifest]] = {
    "decoder": DecoderManifest,
    "encoder": EncoderManifest,
    "seq2seq": Seq2SeqManifest,
}


def family_of(raw: dict[str, Any]) -> str:
    """The family a manifest dict declares (the one place that reads the key)."""
    return raw.get("family", "decoder")
