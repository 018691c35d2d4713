"""The encoder build: the decoder build's shape, with the encoder's own stages.

    load -> [prune] -> export (fp32, fused) -> validate against torch -> [precision -> accuracy gate]
         -> [gate against the unpruned model] -> tokenizer -> manifest

`edge-slm build --model DIR` takes this path when DIR is a BERT-family encoder (or
`all-minilm-l6-v2`); the profile's [encoder] table says how.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edge_slm.builder.encoder import gate, pruned, qa
from edge_slm.builder.encoder.export import MODEL_FILE, ExportedEncoder, export_encoder, load_torch_encoder
from edge_slm.builder.encoder.finetune_qa import EVAL_SQUAD_FILE
from edge_slm.builder.encoder.precision import calibration_feeds, reduce_precision
from edge_slm.builder.encoder.source import EncoderSource, load_encoder
from edge_slm.builder.encoder.validate import graph_of, validate_encoder
from edge_slm.builder.manifest import tool_versions
from edge_slm.builder.runner import Stage, no_section, run_stages, whole_profile
from edge_slm.core import capabilities
from edge_slm.core.bundle import write_manifest
from edge_slm.core.errors import ProfileError
from edge_slm.core.labelled import INTENTS_TEST, INTENTS_TRAIN, read_examples, read_retrieval
from edge_slm.core.squad import SHIPPED_SQUAD, read_squad
from edge_slm.core.targets import Encoder as EncoderSpec
from edge_slm.core.targets import Profile

ENCODER_PRECISIONS = ("fp32", "fp16", "int8")
EVAL_FILE = "eval.jsonl"  # the held-out split `edge-slm finetune` leaves beside a classifier


@dataclass(frozen=True)
class EncoderRequest:
    """What the user asked for beyond the profile: the model and the build's options."""

    model_ref: str
    stages: tuple[str, ...]  # the names of the stages that will run, for the manifest
    gate_data: Path | None = None  # a classifier's labelled test split for its gate
    calibration: Path | None = None  # texts for static (QDQ) int8 scales
    allow_accuracy_loss: bool = False
    prune: bool = False  # prune and distil first, as the profile's [classifier_prune] / [embedder_prune] says
    prune_data: Path | None = None  # the task's data for pruning (a classifier's labelled training split)


@dataclass(frozen=True)
class LoadedEncoder:
    request: EncoderRequest
    source: EncoderSource
    head: Any  # the torch module: export's input and validation's reference
    tokenizer: Any  # the transformers tokenizer
    teacher: Any = None  # the unpruned torch module, when this build pruned it


@dataclass(frozen=True)
class EncoderGraph:
    """The fp32 graph (after validation, with its record)."""

    loaded: LoadedEncoder
    exported: ExportedEncoder
    validation: dict | None = None
    pruning_gate: dict | None = None  # against the unpruned model, when this build pruned it


@dataclass(frozen=True)
class ReducedEncoder:
    """The graph at the profile's precision, in the bundle's directory."""

    fp32: EncoderGraph
    path: Path
    quantization: dict
    accuracy: dict | None = None
    pruning_gate: dict | None = None


@dataclass(frozen=True)
class EncoderBundle:
    path: Path
    manifest: dict


def load_stage(request: EncoderRequest, _: None, out_dir: Path, note) -> LoadedEncoder:
    from transformers import AutoTokenizer

    source = load_encoder(request.model_ref)
    tokenizer = AutoTokenizer.from_pretrained(str(source.path))
    loaded = LoadedEncoder(request, source, load_torch_encoder(source), tokenizer)
    labels = f", labels: {', '.join(source.labels)}" if source.labels else ""
    note(f"{source.architecture} ({source.task}, {source.pooling} pooling{labels})")
    return loaded


def prune_stage(loaded: LoadedEncoder, profile: Profile, cache: Path, note) -> LoadedEncoder:
    """The pruned, distilled model (made in the cache, or found there) in place of the loaded one."""
    spec = pruned.prune_section(profile, loaded.source.task)
    request = loaded.request
    labels, nothing = pruned.profile_labels(profile, loaded.source.task)
    _say_if_simulated_int8_differs(profile, spec, note)
    directory = pruned.pruned_model(
        loaded.source, spec, request.prune_data, request.gate_data, cache, note, labels, nothing
    )
    source = load_encoder(str(directory))
    source = dataclasses.replace(source, source={**source.source, "pruned_from": loaded.source.source})
    record = pruned.record_of(directory) or {}
    note(
        f"{record.get('parameters_before', 0) / 1e6:.1f}M -> {record.get('parameters_after', 0) / 1e6:.1f}M parameters"
    )
    return LoadedEncoder(request, source, load_torch_encoder(source), loaded.tokenizer, teacher=loaded.head)


def _say_if_simulated_int8_differs(profile: Profile, spec, note) -> None:
    """Distillation's simulated int8 rounds weights as the shipped CPU profiles build them (one
    cached run serves every target); a profile building its dynamic int8 weights otherwise still
    gets a gated bundle, but the int8 phase of the distillation learned another grid."""
    from edge_slm.builder.prune.encoder_recover import SIMULATED_REDUCE_RANGE

    encoder = profile.encoder
    dynamic_int8 = encoder.precision == "int8" and encoder.int8_format == "dynamic"
    if spec.recover_int8_share > 0 and dynamic_int8 and encoder.reduce_range != SIMULATED_REDUCE_RANGE:
        note(
            f"note: [encoder] reduce_range = {str(encoder.reduce_range).lower()}, but distillation simulates int8 with "
            f"reduce_range = {str(SIMULATED_REDUCE_RANGE).lower()}: set it so in {profile.source or profile.name} "
            "for the int8 bundle to round as its distillation learned"
        )


def teacher_gate_stage(graph, profile: Profile, out_dir: Path, note):
    """The built graph against the unpruned fp32 model, on the held-out data."""
    fp32 = graph.fp32 if isinstance(graph, ReducedEncoder) else graph
    loaded = fp32.loaded
    path = graph.path if isinstance(graph, ReducedEncoder) else None
    candidate = graph_of(fp32.exported, loaded.tokenizer, path=path)
    task = loaded.source.task
    examples, where = _classifier_gate_data(loaded) if task == "classification" else (None, "shipped retrieval check")
    measured = pruned.measure_against_teacher(
        candidate, loaded.teacher, loaded.tokenizer, task, examples, list(loaded.source.labels)
    )
    measured["data"] = where
    spec = pruned.prune_section(profile, task)
    result = pruned.check_against_teacher(measured, task, spec, loaded.request.allow_accuracy_loss)
    if task == "classification":
        line = f"accuracy {100 * measured['accuracy']:.1f}% vs unpruned fp32 {100 * measured['unpruned_accuracy']:.1f}%"
    else:
        line = (
            f"mean cosine to the unpruned model {measured['mean_cosine']:.4f}, recall@1 "
            f"{100 * measured['recall_at_1']:.1f}% vs unpruned {100 * measured['unpruned_recall_at_1']:.1f}%"
        )
    note(f"{line}: " + ("within budget" if result["passed"] else "OUTSIDE budget (allowed by --allow-accuracy-loss)"))
    return dataclasses.replace(graph, pruning_gate=result)


def export_stage(loaded: LoadedEncoder, profile: Profile, out_dir: Path, note) -> EncoderGraph:
    """The fused fp32 graph ([export], and [encoder]'s max_sequence_length)."""
    exported = export_encoder(loaded.head, loaded.source, loaded.tokenizer, profile, out_dir, note)
    note(f"{exported.node_count} nodes, {_mb(exported.onnx_path)} MB")
    return EncoderGraph(loaded, exported)


VALIDATORS = {"question-answering": qa.validate_reader}  # tasks whose output is not one row per text


def validate_stage(graph: EncoderGraph, _: None, out_dir: Path, note) -> EncoderGraph:
    validate = VALIDATORS.get(graph.loaded.source.task, validate_encoder)
    validation = validate(graph.exported, graph.loaded.head, graph.loaded.tokenizer)
    note(f"max |diff| {validation['max_abs_diff']:.2e} on padded batches: passed")
    return dataclasses.replace(graph, validation=validation)


def precision_stage(graph: EncoderGraph, spec: EncoderSpec, out_dir: Path, note) -> ReducedEncoder:
    feeds = None
    calibration = graph.loaded.request.calibration
    if spec.precision == "int8" and spec.int8_format == "qdq":
        texts = _calibration_texts(calibration)
        feeds = calibration_feeds(graph_of(graph.exported, graph.loaded.tokenizer), texts)
        where = "texts of " + calibration.name if calibration else "shipped texts"
        note(f"calibrating static int8 scales on {len(texts)} {where}")
    quantization = reduce_precision(graph.exported.onnx_path, spec, out_dir, feeds)
    note(f"{quantization['method']}: {_mb(out_dir / MODEL_FILE)} MB")
    return ReducedEncoder(graph, out_dir / MODEL_FILE, quantization)


def gate_stage(reduced: ReducedEncoder, spec: EncoderSpec, out_dir: Path, note) -> ReducedEncoder:
    fp32 = reduced.fp32
    measured, line = _measure(reduced)
    task, precision = fp32.loaded.source.task, spec.precision
    if spec.float_after_gelu == "if-needed" and gate.check(measured, task, spec, precision, allow=True)["problems"]:
        # The cheaper recipe missed its budget: keep the MatMuls after GELU float and measure again.
        note(f"{line}: outside budget with every MatMul int8; keeping the MatMuls after GELU float")
        always = dataclasses.replace(spec, float_after_gelu="always")
        reduced = dataclasses.replace(reduced, quantization=reduce_precision(fp32.exported.onnx_path, always, out_dir))
        measured, line = _measure(reduced)
    accuracy = gate.check(measured, task, spec, precision, fp32.loaded.request.allow_accuracy_loss)
    verdict = "within budget" if accuracy["passed"] else "OUTSIDE budget (allowed by --allow-accuracy-loss)"
    note(f"{line}: {verdict}")
    return dataclasses.replace(reduced, accuracy=accuracy)


def _measure(reduced: ReducedEncoder) -> tuple[dict, str]:
    """The reduced graph against the fp32 one, and the progress line that says how it did."""
    exported, loaded = reduced.fp32.exported, reduced.fp32.loaded
    reference = graph_of(exported, loaded.tokenizer)
    candidate = graph_of(exported, loaded.tokenizer, path=reduced.path)
    task = loaded.source.task
    if task == "question-answering":
        beside = loaded.source.path / EVAL_SQUAD_FILE  # the validation questions `finetune --task qa` left
        data = loaded.request.gate_data or (beside if beside.is_file() else SHIPPED_SQUAD)
        measured = qa.measure_reader(candidate, reference, read_squad(data))
        measured["data"] = "shipped manuals/squad.json" if data == SHIPPED_SQUAD else str(data)
        line = (
            f"best answer equals fp32's for {100 * measured['exact_match_to_fp32']:.1f}% of {measured['questions']} "
            f"questions (F1 {measured['f1_to_fp32']:.3f}); exact match {100 * measured['exact_match']:.1f}% "
            f"vs fp32 {100 * measured['reference_exact_match']:.1f}%"
        )
    elif task == "classification":
        examples, where = _classifier_gate_data(loaded)
        measured = gate.measure_classifier(candidate, reference, examples, list(loaded.source.labels))
        measured["data"] = where
        accuracy = (
            f", accuracy {100 * measured['accuracy']:.1f}% vs fp32 {100 * measured['reference_accuracy']:.1f}%"
            if "accuracy" in measured
            else " (the texts' labels are not the model's: agreement only)"
        )
        line = (
            f"labels agree with fp32 on {100 * measured['label_agreement']:.1f}% of {measured['texts']} texts{accuracy}"
        )
    else:
        extra = [e.text for e in read_examples(INTENTS_TEST)]
        measured = gate.measure_embedder(candidate, reference, read_retrieval(), extra)
        line = (
            f"mean cosine to fp32 {measured['mean_cosine']:.4f} (min {measured['min_cosine']:.4f}), same top-1 passage "
            f"{100 * measured['retrieval_agreement']:.1f}%, recall@1 {100 * measured['recall_at_1']:.1f}% "
            f"vs fp32 {100 * measured['reference_recall_at_1']:.1f}%"
        )
    return measured, line


def _calibration_texts(path: Path | None) -> list[str]:
    """--calibration's non-empty lines, else the shipped intents and retrieval passages."""
    if path is None:
        return [e.text for e in read_examples(INTENTS_TRAIN)] + read_retrieval().passages
    try:
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{path}: cannot read the calibration text ({exc}); pass a UTF-8 text file") from None
    if not lines:
        raise ProfileError(f"{path}: no text to calibrate on (one text per line)")
    return lines


def _classifier_gate_data(loaded: LoadedEncoder):
    """--eval-data, else the held-out split fine-tuning left beside the model, else the shipped
    intents test split (with its labels when they are the model's)."""
    for path in (loaded.request.gate_data, loaded.source.path / EVAL_FILE):
        if path is not None and Path(path).is_file():
            return read_examples(Path(path), min_classes=1), str(path)
    return read_examples(INTENTS_TEST), f"shipped {INTENTS_TEST.parent.name}/{INTENTS_TEST.name}"


def tokenizer_stage(graph: EncoderGraph | ReducedEncoder, _: None, out_dir: Path, note):
    """tokenizer.json beside the graph; the graph artifact passes on unchanged."""
    fp32 = graph.fp32 if isinstance(graph, ReducedEncoder) else graph
    fp32.loaded.tokenizer.backend_tokenizer.save(str(out_dir / "tokenizer.json"))
    return graph


def manifest_stage(graph: EncoderGraph | ReducedEncoder, profile: Profile, out_dir: Path, note) -> EncoderBundle:
    """The manifest (the whole profile is recorded in it) and every file's checksum."""
    import onnx

    reduced = graph if isinstance(graph, ReducedEncoder) else None
    fp32 = reduced.fp32 if reduced else graph
    loaded, exported = fp32.loaded, fp32.exported
    proto = onnx.load(str(out_dir / MODEL_FILE))
    ops: dict[str, int] = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    manifest = write_manifest(
        out_dir,
        {
            "family": "encoder",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "target": profile.name,
            "precision": profile.encoder.precision,
            "source": loaded.source.source,
            "model": exported.shape,
            "graph": {
                "kind": "encoder",
                "file": MODEL_FILE,
                "inputs": list(exported.inputs),
                "output": exported.output,
                "opset": {o.domain or "ai.onnx": o.version for o in proto.opset_import},
                "ir_version": proto.ir_version,
                "nodes": len(proto.graph.node),
                "op_counts": dict(sorted(ops.items())),
                "fused": exported.fused,
                "layer_norms": exported.layer_norms,
            },
            "min_onnxruntime": capabilities.min_onnxruntime(set()),
            "tokenizer": {
                "pad_token_id": int(loaded.tokenizer.pad_token_id or 0),
                "lowercase": bool(getattr(loaded.tokenizer, "do_lower_case", False)),
            },
            "profile": profile.to_dict(),
            "stages": list(loaded.request.stages),
            "validation": fp32.validation,
            "quantization": reduced.quantization if reduced else None,
            "accuracy": reduced.accuracy if reduced else None,
            **_pruning_section(loaded, graph.pruning_gate),
            "versions": tool_versions(),
        },
    )
    return EncoderBundle(out_dir, manifest)


def _pruning_section(loaded: LoadedEncoder, gate_result: dict | None) -> dict:
    """The manifest's "pruning": what `edge-slm prune` (or this build) removed and measured, and
    this build's gate against the unpruned model; nothing for a model that was never pruned."""
    record = pruned.record_of(loaded.source.path)
    if record is None:
        return {}
    return {"pruning": {**record, "gate": gate_result}}


def _encoder_table(profile: Profile) -> EncoderSpec:
    return profile.encoder


LOAD = Stage("load", lambda request, p: f"loading encoder {request.model_ref}", no_section, load_stage)
EXPORT = Stage(
    "export", lambda loaded, p: f"exporting the fused encoder graph for {p.name}", whole_profile, export_stage
)
VALIDATE = Stage(
    "validate", lambda graph, p: "validating the fp32 graph against torch (padded batches)", no_section, validate_stage
)
PRECISION = Stage("precision", lambda graph, p: f"converting to {p.encoder.precision}", _encoder_table, precision_stage)
GATE = Stage(
    "gate", lambda reduced, p: f"accuracy gate: {p.encoder.precision} against fp32", _encoder_table, gate_stage
)
PRUNE = Stage("prune", lambda loaded, p: f"pruning the encoder for {p.name}", whole_profile, prune_stage, into="cache")
TEACHER_GATE = Stage(
    "prune-gate",
    lambda graph, p: "accuracy gate: the pruned model against the unpruned fp32",
    whole_profile,
    teacher_gate_stage,
)
TOKENIZER = Stage("tokenizer", lambda graph, p: "writing the tokenizer", no_section, tokenizer_stage)
MANIFEST = Stage("manifest", lambda graph, p: "writing the manifest and checksums", whole_profile, manifest_stage)


def encoder_stages(profile: Profile, prune: bool = False) -> list[Stage]:
    quantized = profile.encoder.precision != "fp32"
    # A quantized build's fp32 graph is an intermediate: it goes to the scratch directory.
    export = dataclasses.replace(EXPORT, into="scratch") if quantized else EXPORT
    return [
        LOAD,
        *([PRUNE] if prune else []),
        export,
        VALIDATE,
        *([PRECISION, GATE] if quantized else []),
        *([TEACHER_GATE] if prune else []),
        TOKENIZER,
        MANIFEST,
    ]


def with_encoder_precision(profile: Profile, precision: str | None) -> Profile:
    if precision is None:
        return profile
    if precision not in ENCODER_PRECISIONS:
        raise ProfileError(f"encoders are built in {', '.join(ENCODER_PRECISIONS)}; --precision {precision} is not one")
    return dataclasses.replace(profile, encoder=dataclasses.replace(profile.encoder, precision=precision))


def build_encoder(
    model_ref,
    profile,
    out: Path,
    echo,
    allow_accuracy_loss=False,
    gate_data=None,
    calibration=None,
    prune=False,
    prune_data=None,
) -> dict:
    """Run the encoder stages into a staging directory published as `out` (as the decoder build does)."""
    plan = encoder_stages(profile, prune)
    request = EncoderRequest(
        model_ref=model_ref,
        stages=tuple(stage.name for stage in plan),
        gate_data=gate_data,
        calibration=Path(calibration) if calibration else None,
        allow_accuracy_loss=allow_accuracy_loss,
        prune=prune,
        prune_data=Path(prune_data) if prune_data else None,
    )
    return run_stages(plan, request, profile, Path(out), echo).manifest


def _mb(*paths: Path) -> int:
    return round(sum(p.stat().st_size for p in paths if p.exists()) / 1e6)
