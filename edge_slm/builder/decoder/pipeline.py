"""The build: model reference + target profile -> validated bundle, as an explicit list of stages.

    load -> [prune] -> export (fp32) -> validate against torch -> [precision -> accuracy gate]
         -> tokenizer -> manifest

`stages(profile)` is that list for one profile; `build_decoder()` runs it in order, numbering the progress
lines from the list, and the manifest records which stages ran. Every stage has one shape,
`run(artifact, section of the profile, out_dir, note) -> artifact` (`edge_slm.builder.runner`); the
artifacts are in `edge_slm.builder.decoder.stages`.
`edge_slm.builder.pipeline.build` calls `build_decoder()` for a decoder model.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from edge_slm.builder.decoder import stages as s
from edge_slm.builder.runner import run_stages
from edge_slm.core.bundle import check_output_dir
from edge_slm.core.errors import ProfileError
from edge_slm.core.targets import Profile

SUPPORTED_PRECISIONS = ("fp32", "fp16", "int8", "int4")


def stages(profile: Profile) -> list[s.Stage]:
    """The ordered stages that build a bundle for `profile`."""
    quantized = profile.quantize.precision != "fp32"
    # A quantized build's fp32 graph is an intermediate: it goes to the scratch directory.
    export = dataclasses.replace(s.EXPORT, into="scratch") if quantized else s.EXPORT
    return [
        s.LOAD,
        *([s.PRUNE] if profile.prune else []),
        export,
        s.VALIDATE,
        *([s.PRECISION, s.GATE] if quantized else []),
        s.TOKENIZER,
        s.MANIFEST,
    ]


def build_decoder(
    model_ref: str | None,
    profile: Profile,
    out: Path,
    echo=print,
    precision: str | None = None,
    allow_accuracy_loss: bool = False,
    calibration: Path | None = None,
    eval_data: Path | None = None,
) -> dict:
    """Build the decoder bundle for `profile` at `out`; return its manifest. `precision` overrides
    the profile's; `allow_accuracy_loss` publishes a bundle outside its accuracy budget anyway;
    `calibration` replaces the shipped calibration text for static (QDQ) int8. Decoders are gated on
    the shipped text, so `eval_data` (a classifier's labelled split) is refused."""
    if eval_data is not None:
        raise ProfileError("--eval-data is a classifier's labelled test split; a decoder is gated on edge-slm's text")
    profile = with_precision(profile, precision)
    check_output_dir(Path(out), source=Path(model_ref) if model_ref and Path(model_ref).exists() else None)
    plan = stages(profile)
    request = s.BuildRequest(
        model_ref=model_ref,
        stages=tuple(stage.name for stage in plan),
        calibration=calibration,
        allow_accuracy_loss=allow_accuracy_loss,
    )
    return run_stages(plan, request, profile, Path(out), echo).manifest


def with_precision(profile: Profile, precision: str | None) -> Profile:
    """`profile` with another precision's recipe (`--precision`); how the device runs int8
    (TensorRT's static QDQ) stays the profile's choice."""
    if precision and precision != profile.quantize.precision:
        from edge_slm.builder.quantize.blockwise import PRESETS

        own = profile.quantize
        recipe = PRESETS.get(precision, dataclasses.replace(own, precision=precision))
        if own.int8_format == "qdq":
            recipe = dataclasses.replace(
                recipe,
                int8_format=own.int8_format,
                smooth_alphas=own.smooth_alphas,
                max_product_error=own.max_product_error,
                keep_float=own.keep_float,
                calibration_percentile=own.calibration_percentile,
            )
        profile = dataclasses.replace(profile, quantize=recipe)
    if profile.quantize.precision not in SUPPORTED_PRECISIONS:
        raise ProfileError(
            f"{profile.name}: precision '{profile.quantize.precision}' is not built yet (supported now: "
            f"{', '.join(SUPPORTED_PRECISIONS)}); pass --precision with one of those"
        )
    return profile
