"""The encoder build: the decoder build's shape, with the encoder's own stages.

    load -> export (fp32, fused) -> validate against torch -> [precision -> accuracy gate]
         -> tokenizer -> manifest

`edge-slm build --model DIR` takes this path when DIR is a BERT-family encoder (or
`all-minilm-l6-v2`); the profile's [encoder] table says how.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from edge_slm.build.encoder import gate
from edge_slm.build.encoder.export import MODEL_FILE, export_encoder, load_torch_encoder
from edge_slm.build.encoder.precision import calibration_feeds, reduce_precision
from edge_slm.build.encoder.source import load_encoder
from edge_slm.build.encoder.validate import graph_of, validate_encoder
from edge_slm.build.manifest import tool_versions
from edge_slm.build.progress import run_stages
from edge_slm.core import capabilities
from edge_slm.core.bundle import write_manifest
from edge_slm.core.errors import ProfileError
from edge_slm.core.labelled import INTENTS_TEST, INTENTS_TRAIN, read_examples, read_retrieval
from edge_slm.core.targets import Profile

ENCODER_PRECISIONS = ("fp32", "fp16", "int8")
EVAL_FILE = "eval.jsonl"  # the held-out split `edge-slm finetune` leaves beside a classifier


@dataclass
class EncoderState:
    profile: Profile
    model_ref: str
    gate_data: Path | None = None
    calibration: Path | None = None
    allow_accuracy_loss: bool = False
    stages: list[str] = field(default_factory=list)
    out_dir: Path | None = None
    scratch_dir: Path | None = None
    source: object = None  # build.encoder.source.EncoderSource
    head: object = None  # the torch module
    tokenizer: object = None  # the transformers tokenizer
    exported: object = None  # build.encoder.export.ExportedEncoder
    validation: dict | None = None
    quantization: dict | None = None
    accuracy: dict | None = None
    manifest: dict | None = None

    @property
    def spec(self):
        return self.profile.encoder

    @property
    def quantized(self) -> bool:
        return self.spec.precision != "fp32"


@dataclass(frozen=True)
class Stage:
    name: str
    title: Callable[[EncoderState], str]
    run: Callable[[EncoderState, Callable[[str], None]], None]


def _load(state: EncoderState, note) -> None:
    from transformers import AutoTokenizer

    state.source = load_encoder(state.model_ref)
    state.tokenizer = AutoTokenizer.from_pretrained(str(state.source.path))
    state.head = load_torch_encoder(state.source)
    labels = f", labels: {', '.join(state.source.labels)}" if state.source.labels else ""
    note(f"{state.source.architecture} ({state.source.task}, {state.source.pooling} pooling{labels})")


def _export(state: EncoderState, note) -> None:
    fp32_dir = state.scratch_dir if state.quantized else state.out_dir
    state.exported = export_encoder(state.head, state.source, state.tokenizer, state.profile, fp32_dir, note)
    note(f"{state.exported.node_count} nodes, {_mb(state.exported.onnx_path)} MB")


def _validate(state: EncoderState, note) -> None:
    state.validation = validate_encoder(state.exported, state.head, state.tokenizer)
    note(f"max |diff| {state.validation['max_abs_diff']:.2e} on padded batches: passed")


def _precision(state: EncoderState, note) -> None:
    feeds = None
    if state.spec.precision == "int8" and state.spec.int8_format == "qdq":
        texts = _calibration_texts(state.calibration)
        feeds = calibration_feeds(graph_of(state.exported, state.tokenizer), texts)
        note(
            f"calibrating static int8 scales on {len(texts)} {'texts of ' + state.calibration.name if state.calibration else 'shipped texts'}"
        )
    state.quantization = reduce_precision(state.exported.onnx_path, state.spec, state.out_dir, feeds)
    note(f"{state.quantization['method']}: {_mb(state.out_dir / MODEL_FILE)} MB")


def _gate(state: EncoderState, note) -> None:
    measured, line = _measure(state)
    task, precision, spec = state.source.task, state.spec.precision, state.spec
    if spec.float_after_gelu == "if-needed" and gate.check(measured, task, spec, precision, allow=True)["problems"]:
        # The cheaper recipe missed its budget: keep the MatMuls after GELU float and measure again.
        note(f"{line}: outside budget with every MatMul int8; keeping the MatMuls after GELU float")
        state.quantization = reduce_precision(
            state.exported.onnx_path, dataclasses.replace(spec, float_after_gelu="always"), state.out_dir
        )
        measured, line = _measure(state)
    state.accuracy = gate.check(measured, task, spec, precision, state.allow_accuracy_loss)
    verdict = "within budget" if state.accuracy["passed"] else "OUTSIDE budget (allowed by --allow-accuracy-loss)"
    note(f"{line}: {verdict}")


def _measure(state: EncoderState) -> tuple[dict, str]:
    """The reduced graph against the fp32 one, and the progress line that says how it did."""
    reference = graph_of(state.exported, state.tokenizer)
    candidate = graph_of(state.exported, state.tokenizer, path=state.out_dir / MODEL_FILE)
    task = state.source.task
    if task == "classification":
        examples, where = _classifier_gate_data(state)
        measured = gate.measure_classifier(candidate, reference, examples, list(state.source.labels))
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


def _classifier_gate_data(state: EncoderState):
    """--eval-data, else the held-out split fine-tuning left beside the model, else the shipped
    intents test split (with its labels when they are the model's)."""
    for path in (state.gate_data, state.source.path / EVAL_FILE):
        if path is not None and Path(path).is_file():
            return read_examples(Path(path), min_classes=1), str(path)
    return read_examples(INTENTS_TEST), f"shipped {INTENTS_TEST.parent.name}/{INTENTS_TEST.name}"


def _tokenizer(state: EncoderState, note) -> None:
    state.tokenizer.backend_tokenizer.save(str(state.out_dir / "tokenizer.json"))


def _manifest(state: EncoderState, note) -> None:
    import onnx

    graph = onnx.load(str(state.out_dir / MODEL_FILE))
    ops: dict[str, int] = {}
    for node in graph.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    state.manifest = write_manifest(
        state.out_dir,
        {
            "family": "encoder",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "target": state.profile.name,
            "precision": state.spec.precision,
            "source": state.source.source,
            "model": state.exported.shape,
            "graph": {
                "kind": "encoder",
                "file": MODEL_FILE,
                "inputs": list(state.exported.inputs),
                "output": state.exported.output,
                "opset": {o.domain or "ai.onnx": o.version for o in graph.opset_import},
                "ir_version": graph.ir_version,
                "nodes": len(graph.graph.node),
                "op_counts": dict(sorted(ops.items())),
                "fused": state.exported.fused,
            },
            "min_onnxruntime": capabilities.min_onnxruntime(set()),
            "tokenizer": {
                "pad_token_id": int(state.tokenizer.pad_token_id or 0),
                "lowercase": bool(getattr(state.tokenizer, "do_lower_case", False)),
            },
            "profile": state.profile.to_dict(),
            "stages": state.stages,
            "validation": state.validation,
            "quantization": state.quantization,
            "accuracy": state.accuracy,
            "versions": tool_versions(),
        },
    )


LOAD = Stage("load", lambda st: f"loading encoder {st.model_ref}", _load)
EXPORT = Stage("export", lambda st: f"exporting the fused encoder graph for {st.profile.name}", _export)
VALIDATE = Stage("validate", lambda st: "validating the fp32 graph against torch (padded batches)", _validate)
PRECISION = Stage("precision", lambda st: f"converting to {st.spec.precision}", _precision)
GATE = Stage("gate", lambda st: f"accuracy gate: {st.spec.precision} against fp32", _gate)
TOKENIZER = Stage("tokenizer", lambda st: "writing the tokenizer", _tokenizer)
MANIFEST = Stage("manifest", lambda st: "writing the manifest and checksums", _manifest)


def encoder_stages(profile: Profile) -> list[Stage]:
    quantized = profile.encoder.precision != "fp32"
    return [LOAD, EXPORT, VALIDATE, *([PRECISION, GATE] if quantized else []), TOKENIZER, MANIFEST]


def with_encoder_precision(profile: Profile, precision: str | None) -> Profile:
    if precision is None:
        return profile
    if precision not in ENCODER_PRECISIONS:
        raise ProfileError(f"encoders are built in {', '.join(ENCODER_PRECISIONS)}; --precision {precision} is not one")
    return dataclasses.replace(profile, encoder=dataclasses.replace(profile.encoder, precision=precision))


def build_encoder(
    model_ref, profile, out: Path, echo, allow_accuracy_loss=False, gate_data=None, calibration=None
) -> dict:
    """Run the encoder stages into a staging directory published as `out` (as the decoder build does)."""
    plan = encoder_stages(profile)
    state = EncoderState(
        profile=profile,
        model_ref=model_ref,
        gate_data=gate_data,
        calibration=Path(calibration) if calibration else None,
        allow_accuracy_loss=allow_accuracy_loss,
        stages=[stage.name for stage in plan],
    )
    run_stages(plan, state, Path(out), echo)
    return state.manifest


def _mb(*paths: Path) -> int:
    return round(sum(p.stat().st_size for p in paths if p.exists()) / 1e6)
