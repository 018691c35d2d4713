"""The build's stages: each a plain function over the `BuildState` that calls one artifact-in,
artifact-out step and keeps its result for the stages after it. `edge_slm.build.pipeline.stages`
puts them in order for a profile.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from edge_slm import __version__
from edge_slm.build.export import DATA_FILE, MODEL_FILE, export, load_torch_model
from edge_slm.build.genai_config import GENAI_CONFIG, genai_config
from edge_slm.build.load import load, load_tokenizer
from edge_slm.build.manifest import graph_signature, min_onnxruntime, tool_versions
from edge_slm.build.validate import validate
from edge_slm.core.bundle import write_manifest
from edge_slm.core.data import CALIBRATION_TEXT, EVAL_TEXT
from edge_slm.core.errors import ProfileError
from edge_slm.core.hashing import sha256_file
from edge_slm.core.targets import Profile

VALIDATION_QUESTION = "What is the capital of France?"


@dataclass
class BuildState:
    """What the stages hand each other: the inputs, then each stage's artifact."""

    profile: Profile
    model_ref: str | None
    calibration: Path | None = None
    allow_accuracy_loss: bool = False
    stages: list[str] = field(default_factory=list)
    out_dir: Path | None = None  # the staging directory that becomes the bundle
    scratch_dir: Path | None = None  # the fp32 graph of a quantized build
    loaded: object = None  # build.load.LoadedModel
    pruning: dict | None = None
    model: object = None  # the torch model
    tokenizer: object = None  # the transformers tokenizer
    exported: object = None  # build.export.ExportedModel
    validation: dict | None = None
    quantization: dict | None = None
    accuracy: dict | None = None
    generation: dict | None = None
    manifest: dict | None = None

    @property
    def quantized(self) -> bool:
        return self.profile.quantize.precision != "fp32"

    @property
    def model_info(self) -> dict:
        return {**self.exported.shape.__dict__, "context_length": self.profile.export.context_length}

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=self.loaded.add_bos).input_ids


@dataclass(frozen=True)
class Stage:
    name: str
    title: Callable[[BuildState], str]  # the progress line
    run: Callable[[BuildState, Callable[[str], None]], None]


def _load(state: BuildState, note) -> None:
    state.loaded = load(state.model_ref, progress=note)


def _prune(state: BuildState, note) -> None:
    state.loaded, state.pruning = _pruned(state.loaded, state.model_ref, state.profile, state.calibration, note)


def _export(state: BuildState, note) -> None:
    # The torch model of what was loaded (and pruned): the export's input and the validation's reference.
    state.model = load_torch_model(state.loaded.path)
    state.tokenizer = load_tokenizer(state.loaded.path, state.loaded.add_bos)
    fp32_dir = state.scratch_dir if state.quantized else state.out_dir
    state.exported = export(state.model, state.profile, fp32_dir, progress=note)
    note(f"{state.exported.node_count} nodes, {_mb(fp32_dir / MODEL_FILE, fp32_dir / DATA_FILE)} MB")


def _validate(state: BuildState, note) -> None:
    prompt_ids = _validation_prompt(state.tokenizer)
    state.validation = validate(state.exported.onnx_path, state.model, prompt_ids, precision="fp32")
    diff = state.validation["max_abs_diff"]
    note(f"max |diff| logits {diff['logits']:.2e}, present {diff['present']:.2e}: passed")


def _precision(state: BuildState, note) -> None:
    state.quantization = _reduce_precision(
        state.exported.onnx_path, state.profile, state.out_dir, state.model_info, state.encode, state.calibration, note
    )
    note(f"{_mb(state.out_dir / MODEL_FILE, state.out_dir / DATA_FILE)} MB")


def _gate(state: BuildState, note) -> None:
    from edge_slm.build import gate

    precision = state.profile.quantize.precision
    measured = gate.measure(state.out_dir / MODEL_FILE, state.exported.onnx_path, state.model_info, state.encode)
    budget = getattr(state.profile.budget, precision)
    state.accuracy = gate.check(measured, budget, precision, state.allow_accuracy_loss)
    verdict = {
        True: "within budget",
        False: "OUTSIDE budget (allowed by --allow-accuracy-loss)",
        None: "no budget",
    }[state.accuracy["passed"]]
    note(
        f"perplexity {measured['perplexity']:.3f} vs {measured['reference_perplexity']:.3f} "
        f"({100 * measured['ppl_increase']:+.2f}%), top-1 {100 * measured['top1_agreement']:.1f}%, "
        f"KL {measured['mean_kl']:.4f}: {verdict}"
    )


def _tokenizer(state: BuildState, note) -> None:
    state.generation = _write_tokenizer(state.tokenizer, state.model, state.loaded.add_bos, state.out_dir)
    config = genai_config(state.model_info, state.generation, state.exported.graph)
    (state.out_dir / GENAI_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def _manifest(state: BuildState, note) -> None:
    profile, stage = state.profile, state.out_dir
    state.manifest = write_manifest(
        stage,
        {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "target": profile.name,
            "precision": profile.quantize.precision,
            "source": state.loaded.source,
            "model": state.model_info,
            "graph": graph_signature(
                stage / MODEL_FILE,
                state.exported.graph,
                profile,
                prefill_file=((state.quantization or {}).get("counts") or {}).get("prefill_graph"),
            ),
            "min_onnxruntime": min_onnxruntime(stage / MODEL_FILE),
            "generation": {k: state.generation[k] for k in ("bos_token_id", "eos_token_ids", "add_bos")},
            "profile": profile.to_dict(),
            "stages": state.stages,
            "validation": state.validation,
            "pruning": state.pruning,
            "quantization": state.quantization,
            "accuracy": state.accuracy,
            "versions": tool_versions(),
        },
    )


LOAD = Stage("load", lambda st: f"loading model {st.model_ref or 'smollm2-135m (default)'}", _load)
PRUNE = Stage("prune", lambda st: f"pruning for {st.profile.name}", _prune)
EXPORT = Stage(
    "export", lambda st: f"exporting the {st.profile.export.graph} ONNX graph for {st.profile.name}", _export
)
VALIDATE = Stage("validate", lambda st: "validating the fp32 graph against torch (prefill + 3 decode steps)", _validate)
PRECISION = Stage("precision", lambda st: f"converting to {st.profile.quantize.precision}", _precision)
GATE = Stage(
    "gate", lambda st: f"accuracy gate: {st.profile.quantize.precision} against fp32 on {EVAL_TEXT.name}", _gate
)
TOKENIZER = Stage("tokenizer", lambda st: f"writing tokenizer, generation settings and {GENAI_CONFIG}", _tokenizer)
MANIFEST = Stage("manifest", lambda st: "writing the manifest and checksums", _manifest)


def pruning_requests(profile: Profile):
    """The profile's [prune] section as `edge-slm prune` settings and recovery settings."""
    from edge_slm.build.prune.recover import RecoverySettings
    from edge_slm.build.prune.structured import PruneSettings

    spec = profile.prune
    settings = PruneSettings(ffn=spec.ffn, head_groups=spec.head_groups, layers=spec.layers)
    recovery = (
        RecoverySettings(steps=spec.recover_steps, time_budget_s=60 * spec.recover_minutes)
        if spec.recover_steps
        else None
    )
    return settings, recovery


def pruned_cache_dir(source: dict, settings, recovery, calibration_path: Path) -> Path:
    """Where the pruned model of these inputs is cached: pruning with recovery takes many
    minutes, and a rebuild of the same target should not repeat it."""
    from edge_slm.build.load import cache_root

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
    return cache_root() / "pruned" / hashlib.sha256(key.encode()).hexdigest()[:16]


def _pruned(loaded, model_ref: str | None, profile: Profile, calibration: Path | None, note):
    """The profile's pruned (and recovered) model, from the cache or made now, and its summary."""
    from edge_slm.build.prune.structured import prune_directory

    settings, recovery = pruning_requests(profile)
    calibration_path = Path(calibration) if calibration else CALIBRATION_TEXT
    target = pruned_cache_dir(loaded.source, settings, recovery, calibration_path)
    if (target / "edge_slm_prune.json").is_file():
        note(f"using the cached pruned model {target}")
    else:
        note(f"{settings.describe()}" + (f", then up to {recovery.steps} recovery steps" if recovery else ""))
        prune_directory(model_ref, settings, target, calibration_path, recovery, progress=note)
    record = json.loads((target / "edge_slm_prune.json").read_text())
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
        )
        if k in record
    }
    summary["recovery"] = {k: v for k, v in (record.get("recovery") or {}).items() if k != "settings"} or None
    note(
        f"{record['parameters_before'] / 1e6:.1f}M -> {record['parameters_after'] / 1e6:.1f}M parameters, perplexity "
        f"{record['perplexity']['before']:.2f} -> {record['ppl_increase'] * 100:+.1f}% against the unpruned model"
    )
    pruned = load(str(target))
    source = {**pruned.source, "pruned_from": loaded.source}
    return dataclasses.replace(pruned, source=source), summary


def _reduce_precision(
    fp32_path: Path, profile: Profile, stage: Path, model_info: dict, encode, calibration: Path | None, note
) -> dict:
    """fp16, TensorRT's QDQ int8 or weight-only int8 / int4, as the recipe says; returns the
    manifest's quantization section."""
    recipe = profile.quantize
    section = {"recipe": dataclasses.asdict(recipe)}
    if recipe.precision == "fp16":
        from edge_slm.build.quantize.fp16 import convert_fp16

        section["method"] = "fp16"
        section["counts"] = convert_fp16(fp32_path, stage, progress=note)
    elif recipe.precision == "int8" and recipe.int8_format == "qdq":
        from edge_slm.build.quantize.qdq import quantize_qdq

        section["method"] = "qdq-s8s8-static"
        counts = quantize_qdq(
            fp32_path,
            recipe,
            stage,
            _calibration_ids(calibration, encode, section),
            model_info,
            progress=lambda m: None if "pass" in m else note(m),
        )
        section["counts"] = counts
        note(
            f"{counts['quantized_matmuls']} matmuls int8 (static activation scales from {counts['calibration_tokens']} "
            f"calibration tokens), {counts['float_matmuls']} kept fp16"
        )
    else:
        from edge_slm.build.quantize.blockwise import quantize

        section["method"] = "weight-only-blockwise"
        calibration_ids = _calibration_ids(calibration, encode, section) if recipe.smooth_alphas else None
        counts = quantize(
            fp32_path,
            recipe,
            stage,
            progress=note,
            oldest_onnxruntime=profile.runtime.oldest_onnxruntime,
            calibration_ids=calibration_ids,
            model_info=model_info,
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


def _write_tokenizer(tokenizer, model, add_bos: bool, stage: Path) -> dict:
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
    (stage / "generation.json").write_text(json.dumps(generation, indent=2) + "\n")
    return generation


def _mb(*paths: Path) -> int:
    return round(sum(p.stat().st_size for p in paths if p.exists()) / 1e6)
