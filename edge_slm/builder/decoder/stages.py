"""The decoder build's stages, each `run(artifact, section, out_dir, note) -> artifact`
(`edge_slm.builder.runner`). The artifacts, in the order the stages hand them on:

    BuildRequest -load-> SourceModel -[prune]-> SourceModel -export-> FloatGraph -validate->
    FloatGraph -[precision]-> ReducedGraph -[gate]-> ReducedGraph -tokenizer-> TokenizedGraph
    -manifest-> Bundle

Each artifact keeps the one it came from, so the manifest stage sees everything that ran.
`edge_slm.builder.decoder.pipeline.stages` puts the stages in order for a profile.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edge_slm import __version__
from edge_slm.builder.decoder.export import DATA_FILE, MODEL_FILE, ExportedModel, export, load_torch_model
from edge_slm.builder.decoder.fused_graph import longrope_switch
from edge_slm.builder.decoder.genai_config import GENAI_CONFIG, genai_config
from edge_slm.builder.decoder.load import LoadedModel, load, load_tokenizer, sampling_defaults
from edge_slm.builder.decoder.validate import validate
from edge_slm.builder.manifest import graph_signature, min_onnxruntime, tool_versions
from edge_slm.builder.prune.structured import PRUNE_RECORD
from edge_slm.builder.runner import Stage, no_section, whole_profile
from edge_slm.core.bundle import write_manifest
from edge_slm.core.data import CALIBRATION_TEXT, EVAL_TEXT
from edge_slm.core.errors import ProfileError
from edge_slm.core.hashing import sha256_file
from edge_slm.core.targets import Budget, Profile, Prune

VALIDATION_QUESTION = "What is the capital of France?"


@dataclass(frozen=True)
class BuildRequest:
    """What the user asked for beyond the profile: the model and the build's options."""

    model_ref: str | None
    stages: tuple[str, ...]  # the names of the stages that will run, for the manifest
    calibration: Path | None = None  # replaces the shipped calibration text
    allow_accuracy_loss: bool = False  # publish a bundle outside its accuracy budget anyway


@dataclass(frozen=True)
class SourceModel:
    """A Hugging Face model directory to export (as loaded, or pruned)."""

    request: BuildRequest
    loaded: LoadedModel
    pruning: dict | None = None


@dataclass(frozen=True)
class FloatGraph:
    """The fp32 ONNX graph, the torch model it came from and its tokenizer."""

    source: SourceModel
    exported: ExportedModel
    model: Any  # the torch model: validation's reference
    tokenizer: Any  # the transformers tokenizer
    validation: dict | None = None

    @property
    def fp32(self) -> FloatGraph:
        """Itself: the fp32 graph (as `ReducedGraph.fp32` is), so later stages take either."""
        return self

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=self.source.loaded.add_bos).input_ids


@dataclass(frozen=True)
class ReducedGraph:
    """The graph at the profile's precision, in the bundle's directory."""

    fp32: FloatGraph
    path: Path
    quantization: dict
    accuracy: dict | None = None


@dataclass(frozen=True)
class TokenizedGraph:
    """The bundle's graph with the tokenizer and generation settings written beside it."""

    graph: FloatGraph | ReducedGraph
    generation: dict

    @property
    def fp32(self) -> FloatGraph:
        return self.graph.fp32


@dataclass(frozen=True)
class Bundle:
    path: Path  # the staging directory, published as the bundle when the build ends
    manifest: dict


def load_stage(request: BuildRequest, spec: Prune, out_dir: Path, note) -> SourceModel:
    """The model; one `edge-slm prune` wrote is recorded as pruned from its unpruned model and
    gated against it like a profile's [prune] (`spec`: the profile's, or the default limit)."""
    loaded = load(request.model_ref, progress=note)
    record_path = loaded.path / PRUNE_RECORD
    if not record_path.is_file():
        return SourceModel(request, loaded)
    record = json.loads(record_path.read_text())
    origin = record.get("source")
    if isinstance(origin, dict):
        loaded = dataclasses.replace(loaded, source={**loaded.source, "pruned_from": origin})
    pruning = _summary(record)
    if "ppl_increase" in pruning:
        pruning["gate"] = _gate(pruning, spec, request, note)
    return SourceModel(request, loaded, pruning)


def prune_stage(source: SourceModel, spec: Prune, out_dir: Path, note) -> SourceModel:
    """The pruned (and recovered) model, made under `out_dir` (the cache) or found there, gated
    against the unpruned model ([prune] max_ppl_increase)."""
    loaded, pruning = _pruned(source.loaded, source.request, spec, out_dir, note)
    return SourceModel(source.request, loaded, {**pruning, "gate": _gate(pruning, spec, source.request, note)})


def _gate(pruning: dict, spec: Prune, request: BuildRequest, note) -> dict:
    from edge_slm.builder.decoder import gate

    result = gate.check_pruned(pruning, spec.max_ppl_increase, request.allow_accuracy_loss)
    verdict = "within" if result["passed"] else "OUTSIDE (allowed by --allow-accuracy-loss)"
    note(f"{100 * result['ppl_increase']:+.1f}% perplexity: {verdict} the limit of +{100 * spec.max_ppl_increase:.1f}%")
    return result


def export_stage(source: SourceModel, profile: Profile, out_dir: Path, note) -> FloatGraph:
    """The fp32 graph ([export], and the oldest onnxruntime of [runtime] for its operators)."""
    model = load_torch_model(source.loaded.path)
    tokenizer = load_tokenizer(source.loaded.path, source.loaded.add_bos)
    exported = export(model, profile, out_dir, progress=note)
    note(f"{exported.node_count} nodes, {_mb(out_dir / MODEL_FILE, out_dir / DATA_FILE)} MB")
    return FloatGraph(source, exported, model, tokenizer)


def validate_stage(graph: FloatGraph, _: None, out_dir: Path, note) -> FloatGraph:
    prompt_ids = _validation_prompt(graph.tokenizer)
    validation = validate(graph.exported.onnx_path, graph.model, prompt_ids, precision="fp32")
    diff = validation["max_abs_diff"]
    note(f"max |diff| logits {diff['logits']:.2e}, present {diff['present']:.2e}: passed")
    return dataclasses.replace(graph, validation=validation)


def precision_stage(graph: FloatGraph, profile: Profile, out_dir: Path, note) -> ReducedGraph:
    """The graph at [quantize]'s precision (avoiding operators the oldest [runtime] lacks)."""
    calibration = graph.source.request.calibration
    quantization = _reduce_precision(graph, profile, out_dir, calibration, note)
    note(f"{_mb(out_dir / MODEL_FILE, out_dir / DATA_FILE)} MB")
    return ReducedGraph(graph, out_dir / MODEL_FILE, quantization)


def gate_stage(reduced: ReducedGraph, budgets: Budget, out_dir: Path, note) -> ReducedGraph:
    from edge_slm.builder.decoder import gate

    fp32 = reduced.fp32
    precision = reduced.quantization["recipe"]["precision"]
    measured = gate.measure(
        reduced.path,
        fp32.exported.onnx_path,
        fp32.exported.shape.cache,
        fp32.encode,
        shared_buffer=fp32.exported.graph == "fused",
    )
    accuracy = gate.check(measured, getattr(budgets, precision), precision, fp32.source.request.allow_accuracy_loss)
    verdict = {
        True: "within budget",
        False: "OUTSIDE budget (allowed by --allow-accuracy-loss)",
        None: "no budget",
    }[accuracy["passed"]]
    note(
        f"perplexity {measured['perplexity']:.3f} vs {measured['reference_perplexity']:.3f} "
        f"({100 * measured['ppl_increase']:+.2f}%), top-1 {100 * measured['top1_agreement']:.1f}%, "
        f"KL {measured['mean_kl']:.4f}: {verdict}"
    )
    return dataclasses.replace(reduced, accuracy=accuracy)


def tokenizer_stage(graph: FloatGraph | ReducedGraph, _: None, out_dir: Path, note) -> TokenizedGraph:
    fp32 = graph.fp32
    switch = (
        longrope_switch(fp32.model.config, fp32.exported.shape.context_length)
        if fp32.exported.graph == "fused"
        else None
    )
    generation = _write_tokenizer(fp32.tokenizer, fp32.model, fp32.source.loaded.add_bos, out_dir, switch)
    config = genai_config(fp32.exported.shape, generation, fp32.exported.graph)
    (out_dir / GENAI_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return TokenizedGraph(graph, generation)


def manifest_stage(tokenized: TokenizedGraph, profile: Profile, out_dir: Path, note) -> Bundle:
    """The manifest (the whole profile is recorded in it) and every file's checksum."""
    fp32, graph = tokenized.fp32, tokenized.graph
    reduced = graph if isinstance(graph, ReducedGraph) else None
    quantization = reduced.quantization if reduced else None
    manifest = write_manifest(
        out_dir,
        {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "target": profile.name,
            "precision": profile.quantize.precision,
            "source": fp32.source.loaded.source,
            "model": dataclasses.asdict(fp32.exported.shape),
            "graph": graph_signature(
                out_dir / MODEL_FILE,
                fp32.exported.graph,
                profile,
                prefill_file=((quantization or {}).get("counts") or {}).get("prefill_graph"),
            ),
            "min_onnxruntime": min_onnxruntime(out_dir / MODEL_FILE),
            "generation": {
                **{k: tokenized.generation[k] for k in ("bos_token_id", "eos_token_ids", "add_bos")},
                # The model's sampling settings, the server's defaults (recorded only when it has some).
                **({"sampling": sampling} if (sampling := sampling_defaults(fp32.source.loaded)) else {}),
            },
            "profile": profile.to_dict(),
            "stages": list(fp32.source.request.stages),
            "validation": fp32.validation,
            "pruning": fp32.source.pruning,
            "quantization": quantization,
            "accuracy": reduced.accuracy if reduced else None,
            "versions": tool_versions(),
        },
    )
    return Bundle(out_dir, manifest)


LOAD = Stage(
    "load",
    lambda request, p: f"loading model {request.model_ref or 'smollm2-135m (default)'}",
    lambda p: p.prune or Prune(),  # the limit a model pruned beforehand is gated against
    load_stage,
)
PRUNE = Stage("prune", lambda source, p: f"pruning for {p.name}", lambda p: p.prune, prune_stage, into="cache")
EXPORT = Stage(
    "export", lambda source, p: f"exporting the {p.export.graph} ONNX graph for {p.name}", whole_profile, export_stage
)
VALIDATE = Stage(
    "validate",
    lambda graph, p: "validating the fp32 graph against torch (prefill + 3 decode steps)",
    no_section,
    validate_stage,
)
PRECISION = Stage("precision", lambda graph, p: f"converting to {p.quantize.precision}", whole_profile, precision_stage)
GATE = Stage(
    "gate",
    lambda reduced, p: f"accuracy gate: {p.quantize.precision} against fp32 on {EVAL_TEXT.name}",
    lambda p: p.budget,
    gate_stage,
)
TOKENIZER = Stage(
    "tokenizer",
    lambda graph, p: f"writing tokenizer, generation settings and {GENAI_CONFIG}",
    no_section,
    tokenizer_stage,
)
MANIFEST = Stage("manifest", lambda tokenized, p: "writing the manifest and checksums", whole_profile, manifest_stage)


def pruning_requests(spec: Prune):
    """The profile's [prune] section as `edge-slm prune` settings and recovery settings."""
    from edge_slm.builder.prune.recover import RecoverySettings
    from edge_slm.builder.prune.structured import PruneSettings

    settings = PruneSettings(ffn=spec.ffn, head_groups=spec.head_groups, layers=spec.layers)
    recovery = (
        RecoverySettings(steps=spec.recover_steps, time_budget_s=60 * spec.recover_minutes)
        if spec.recover_steps
        else None
    )
    return settings, recovery


def pruned_cache_dir(cache: Path, source: dict, settings, recovery, calibration_path: Path) -> Path:
    """Where under `cache` the pruned model of these inputs is kept: pruning with recovery takes
    many minutes, and a rebuild of the same target should not repeat it."""
    key = json.dumps(
        {
            "source": source.get("sha256"),
            "settings": dataclasses.asdict(settings),
            "recovery": dataclasses.asdict(recovery) if recovery else None,
            "calibration": sha256_file(calibration_path),
            "edge_slm": __version__,
        },
        sort_keys=True,
    )
    return cache / "pruned" / hashlib.sha256(key.encode()).hexdigest()[:16]


def _pruned(loaded: LoadedModel, request: BuildRequest, spec: Prune, cache: Path, note):
    """The pruned (and recovered) model, from the cache or made now, and its summary."""
    from edge_slm.builder.prune.structured import prune_directory

    settings, recovery = pruning_requests(spec)
    calibration_path = Path(request.calibration) if request.calibration else CALIBRATION_TEXT
    target = pruned_cache_dir(cache, loaded.source, settings, recovery, calibration_path)
    if (target / PRUNE_RECORD).is_file():
        note(f"using the cached pruned model {target}")
    else:
        note(f"{settings.describe()}" + (f", then up to {recovery.steps} recovery steps" if recovery else ""))
        prune_directory(request.model_ref, settings, target, calibration_path, recovery, progress=note)
    record = json.loads((target / PRUNE_RECORD).read_text())
    summary = _summary(record)
    note(
        f"{record['parameters_before'] / 1e6:.1f}M -> {record['parameters_after'] / 1e6:.1f}M parameters, perplexity "
        f"{record['perplexity']['before']:.2f} -> {record['ppl_increase'] * 100:+.1f}% against the unpruned model"
    )
    pruned = load(str(target))
    source = {**pruned.source, "pruned_from": loaded.source}
    return dataclasses.replace(pruned, source=source), summary


def _summary(record: dict) -> dict:
    """What the manifest's "pruning" keeps of `edge-slm prune`'s record."""
    summary = {
        k: record[k]
        for k in (
            "settings",
            "removed_layers",
            "parameters_before",
            "parameters_after",
            "perplexity",
            "top1_agreement",
            "ppl_increase",
            "eval_text",
        )
        if k in record
    }
    summary["recovery"] = {k: v for k, v in (record.get("recovery") or {}).items() if k != "settings"} or None
    return summary


def _reduce_precision(graph: FloatGraph, profile: Profile, stage: Path, calibration: Path | None, note) -> dict:
    """fp16, TensorRT's QDQ int8 or weight-only int8 / int4, as the recipe says; returns the
    manifest's quantization section."""
    recipe, fp32_path, shape, encode = profile.quantize, graph.exported.onnx_path, graph.exported.shape, graph.encode
    section = {"recipe": dataclasses.asdict(recipe)}
    if recipe.precision == "fp16":
        from edge_slm.builder.quantize.fp16 import convert_fp16

        section["method"] = "fp16"
        section["counts"] = convert_fp16(fp32_path, stage, progress=note)
    elif recipe.precision == "int8" and recipe.int8_format == "qdq":
        from edge_slm.builder.quantize.qdq import quantize_qdq

        section["method"] = "qdq-s8s8-static"
        counts = quantize_qdq(
            fp32_path,
            recipe,
            stage,
            _calibration_ids(calibration, encode, section),
            shape,
            progress=lambda m: None if "pass" in m else note(m),
        )
        section["counts"] = counts
        note(
            f"{counts['quantized_matmuls']} matmuls int8 (static activation scales from {counts['calibration_tokens']} "
            f"calibration tokens), {counts['float_matmuls']} kept fp16"
        )
    else:
        from edge_slm.builder.quantize.blockwise import quantize

        section["method"] = "weight-only-blockwise"
        calibration_ids = _calibration_ids(calibration, encode, section) if recipe.smooth_alphas else None
        counts = quantize(
            fp32_path,
            recipe,
            stage,
            progress=note,
            oldest_onnxruntime=profile.runtime.oldest_onnxruntime,
            calibration_ids=calibration_ids,
            shape=shape,
        )
        section["counts"] = counts
        note(
            f"{counts['MatMulNBits']} MatMulNBits, {counts['GatherBlockQuantized'] + counts['dequantized_gathers']} "
            f"quantized embedding, {counts['float_matmuls_left']} float matmuls left"
        )
    return section


def _calibration_ids(calibration: Path | None, encode, section: dict) -> list[int]:
    """The calibration text's token ids (the user's file or the shipped one), recorded in the
    manifest's quantization `section` by name and sha256."""
    text_path = Path(calibration) if calibration else CALIBRATION_TEXT
    section["calibration"] = {"file": text_path.name, "sha256": sha256_file(text_path)}
    return encode(_read_text(text_path))


def _read_text(path: Path) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{path}: cannot read the calibration text ({exc}); pass a UTF-8 text file") from None
    return text


def _validation_prompt(tokenizer) -> list[int]:
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": VALIDATION_QUESTION}], add_generation_prompt=True, tokenize=True
        )
    return tokenizer("The capital of France is").input_ids


def _write_tokenizer(tokenizer, model, add_bos: bool, stage: Path, rope_switch: int | None = None) -> dict:
    tokenizer.backend_tokenizer.save(str(stage / "tokenizer.json"))
    eos = []
    for source in (model.generation_config.eos_token_id, model.config.eos_token_id):
        for token in source if isinstance(source, list) else [source]:
            if token is not None and token not in eos:
                eos.append(int(token))
    generation = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_ids": eos,
        "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or [0])[0],
        "add_bos": add_bos,
        "chat_template": tokenizer.chat_template,
        "special_tokens": {str(t): int(i) for t, i in zip(tokenizer.all_special_tokens, tokenizer.all_special_ids)},
    }
    if rope_switch is not None:  # the runtime encodes a sequence again when it grows past it
        generation["rope_switch"] = rope_switch
    (stage / "generation.json").write_text(json.dumps(generation, indent=2) + "\n")
    return generation


def _mb(*paths: Path) -> int:
    return round(sum(p.stat().st_size for p in paths if p.exists()) / 1e6)
