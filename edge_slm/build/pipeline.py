"""The build: model reference + target profile -> validated bundle, as an ordered list of stages.

load -> export (fp32) -> validate against torch -> quantize -> accuracy gate -> bundle.
`edge-slm build --target NAME [--precision P]` and `make <target>` call `build()`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from edge_slm import __version__
from edge_slm.build.export import DATA_FILE, MODEL_FILE, export, load_torch_model
from edge_slm.build.load import load
from edge_slm.build.manifest import graph_signature, min_onnxruntime, tool_versions
from edge_slm.build.validate import validate
from edge_slm.core.bundle import STAGING_MARK, check_output_dir, staging_dir, write_manifest
from edge_slm.core.data import CALIBRATION_TEXT, EVAL_TEXT
from edge_slm.core.errors import ProfileError
from edge_slm.core.hashing import sha256_file
from edge_slm.core.targets import Profile

SUPPORTED_PRECISIONS = ("fp32", "fp16", "int8", "int4")
VALIDATION_QUESTION = "What is the capital of France?"


class Progress:
    """Numbered stage lines with elapsed time, on stderr, so long builds show where they are."""

    def __init__(self, total: int, echo=print):
        self.total, self.step, self.echo, self.start = total, 0, echo, time.monotonic()

    def stage(self, title: str) -> None:
        self.step += 1
        self.echo(f"[{self.step}/{self.total}] {title}  ({time.monotonic() - self.start:.0f}s)")

    def note(self, message: str) -> None:
        self.echo(f"      {message}")


def build(
    model_ref: str | None,
    profile: Profile,
    out: Path,
    echo=print,
    precision: str | None = None,
    allow_accuracy_loss: bool = False,
    calibration: Path | None = None,
) -> dict:
    """Build the bundle for `profile` at `out`; return its manifest. `precision` overrides the
    profile's; `allow_accuracy_loss` publishes a bundle outside its accuracy budget anyway;
    `calibration` replaces the shipped calibration text for static (QDQ) int8."""
    if precision and precision != profile.quantize.precision:
        from edge_slm.build.quantize.blockwise import PRESETS

        own = profile.quantize
        recipe = PRESETS.get(precision, dataclasses.replace(own, precision=precision))
        if own.int8_format == "qdq":
            # How this device runs int8 (TensorRT's static QDQ) stays the profile's choice.
            recipe = dataclasses.replace(
                recipe,
                int8_format=own.int8_format,
                smooth_alphas=own.smooth_alphas,
                max_product_error=own.max_product_error,
                keep_float=own.keep_float,
                calibration_percentile=own.calibration_percentile,
            )
        profile = dataclasses.replace(profile, quantize=recipe)
    precision = profile.quantize.precision
    if precision not in SUPPORTED_PRECISIONS:
        raise ProfileError(
            f"{profile.name}: precision '{precision}' is not built yet (supported now: "
            f"{', '.join(SUPPORTED_PRECISIONS)}); pass --precision with one of those"
        )
    quantized = precision != "fp32"
    source_path = Path(model_ref) if model_ref and Path(model_ref).exists() else None
    check_output_dir(Path(out), source=source_path)  # before minutes of work, not after
    progress = Progress(total=(7 if quantized else 5) + bool(profile.prune), echo=echo)
    progress.stage(f"loading model {model_ref or 'smollm2-135m (default)'}")
    loaded = load(model_ref, progress=progress.note)
    pruning = None
    if profile.prune:
        progress.stage(f"pruning for {profile.name}")
        loaded, pruning = _pruned(loaded, model_ref, profile, calibration, progress.note)
    model = load_torch_model(loaded.path)
    tokenizer = _load_tokenizer(loaded.path, loaded.add_bos)

    # The fp32 intermediate goes beside the staging directory, named like it, so that the next
    # build sweeps it up too if this one is killed.
    with (
        staging_dir(Path(out)) as stage,
        tempfile.TemporaryDirectory(
            dir=Path(out).parent, prefix=f"{Path(out).name}{STAGING_MARK}scratch-", suffix=f"-{os.getpid()}"
        ) as scratch,
    ):
        fp32_dir = Path(scratch) if quantized else stage
        progress.stage(f"exporting the {profile.export.graph} ONNX graph for {profile.name}")
        exported = export(model, profile, fp32_dir, progress=progress.note)
        progress.note(f"{exported.node_count} nodes, {_mb(fp32_dir / MODEL_FILE, fp32_dir / DATA_FILE)} MB")

        progress.stage("validating the fp32 graph against torch (prefill + 3 decode steps)")
        prompt_ids = _validation_prompt(tokenizer)
        validation = validate(exported.onnx_path, model, prompt_ids, precision="fp32")
        diff = validation["max_abs_diff"]
        progress.note(f"max |diff| logits {diff['logits']:.2e}, present {diff['present']:.2e}: passed")

        quantization = accuracy = None
        if quantized:
            from edge_slm.build import gate

            model_info = {**exported.shape.__dict__, "context_length": profile.export.context_length}
            encode = lambda text: tokenizer(text, add_special_tokens=loaded.add_bos).input_ids  # noqa: E731
            progress.stage(f"converting to {precision}")
            quantization = _reduce_precision(
                exported.onnx_path, profile, stage, model_info, encode, calibration, progress.note
            )
            progress.note(f"{_mb(stage / MODEL_FILE, stage / DATA_FILE)} MB")
            progress.stage(f"accuracy gate: {precision} against fp32 on {EVAL_TEXT.name}")
            measured = gate.measure(stage / MODEL_FILE, exported.onnx_path, model_info, encode)
            accuracy = gate.check(measured, getattr(profile.budget, precision), precision, allow_accuracy_loss)
            verdict = {
                True: "within budget",
                False: "OUTSIDE budget (allowed by --allow-accuracy-loss)",
                None: "no budget",
            }[accuracy["passed"]]
            progress.note(
                f"perplexity {measured['perplexity']:.3f} vs {measured['reference_perplexity']:.3f} "
                f"({100 * measured['ppl_increase']:+.2f}%), top-1 {100 * measured['top1_agreement']:.1f}%, "
                f"KL {measured['mean_kl']:.4f}: {verdict}"
            )

        progress.stage("writing tokenizer and generation settings")
        generation = _write_tokenizer(tokenizer, model, loaded.add_bos, stage)

        progress.stage("writing the manifest and checksums")
        manifest = write_manifest(
            stage,
            {
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "target": profile.name,
                "precision": precision,
                "source": loaded.source,
                "model": {**exported.shape.__dict__, "context_length": profile.export.context_length},
                "graph": graph_signature(
                    stage / MODEL_FILE,
                    exported.graph,
                    profile,
                    prefill_file=((quantization or {}).get("counts") or {}).get("prefill_graph"),
                ),
                "min_onnxruntime": min_onnxruntime(stage / MODEL_FILE),
                "generation": {k: generation[k] for k in ("bos_token_id", "eos_token_ids", "add_bos")},
                "profile": profile.to_dict(),
                "validation": validation,
                "pruning": pruning,
                "quantization": quantization,
                "accuracy": accuracy,
                "versions": tool_versions(),
            },
        )
    return manifest


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
            stage,
            _calibration_ids(calibration, encode, section),
            model_info,
            smooth_alphas=recipe.smooth_alphas,
            percentile=recipe.calibration_percentile,
            keep_float=recipe.keep_float,
            max_error=recipe.max_product_error,
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


def _load_tokenizer(model_dir: Path, add_bos: bool):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if hasattr(tokenizer, "add_bos_token"):
        tokenizer.add_bos_token = add_bos
    return tokenizer


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
