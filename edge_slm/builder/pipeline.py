"""`edge-slm build`: a model reference and a target profile -> a validated bundle, by family.

Each family (`builder/decoder/`, `builder/encoder/`) says which models it claims and builds them
with its own list of stages (`builder.runner`). The first family that claims a model builds it; the
decoder comes last, as it takes the default model (`model_ref` None) and GGUF files. A new family
is a new sub-package and one line in `FAMILIES`.
`edge-slm build --target NAME [--precision P]` and `make <target>` call `build()`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edge_slm.core.errors import ProfileError
from edge_slm.core.targets import Profile


@dataclass(frozen=True)
class BuildFamily:
    name: str
    claims: Callable[[str | None], bool]  # cheap: reads at most the model's config.json
    build: Callable[
        ..., dict
    ]  # (model_ref, profile, out, echo, precision, allow_accuracy_loss, calibration, eval_data)
    prunes_at_build: bool = False  # its build takes prune= / prune_data= (the profile's pruning tables)


def _encoder_claims(model_ref: str | None) -> bool:
    from edge_slm.builder.encoder.source import is_encoder

    return is_encoder(model_ref)


def _build_encoder(
    model_ref, profile, out, echo, precision, allow_accuracy_loss, calibration, eval_data, prune=False, prune_data=None
) -> dict:
    from edge_slm.builder.encoder.pipeline import build_encoder, with_encoder_precision
    from edge_slm.core.bundle import check_output_dir

    profile = with_encoder_precision(profile, precision)
    check_output_dir(Path(out), source=Path(model_ref) if model_ref and Path(model_ref).exists() else None)
    return build_encoder(
        model_ref, profile, out, echo, allow_accuracy_loss, eval_data, calibration, prune=prune, prune_data=prune_data
    )


def _build_decoder(model_ref, profile, out, echo, precision, allow_accuracy_loss, calibration, eval_data) -> dict:
    from edge_slm.builder.decoder.pipeline import build_decoder

    return build_decoder(model_ref, profile, out, echo, precision, allow_accuracy_loss, calibration, eval_data)


def _seq2seq_claims(model_ref: str | None) -> bool:
    from edge_slm.builder.seq2seq.source import is_seq2seq

    return is_seq2seq(model_ref)


def _build_seq2seq(model_ref, profile, out, echo, precision, allow_accuracy_loss, calibration, eval_data) -> dict:
    from edge_slm.builder.seq2seq.pipeline import build_seq2seq
    from edge_slm.core.bundle import check_output_dir

    check_output_dir(Path(out), source=Path(model_ref))
    return build_seq2seq(model_ref, profile, out, echo, precision, allow_accuracy_loss)


FAMILIES = (
    BuildFamily("seq2seq", _seq2seq_claims, _build_seq2seq),
    BuildFamily("encoder", _encoder_claims, _build_encoder, prunes_at_build=True),
    BuildFamily("decoder", lambda model_ref: True, _build_decoder),
)


def build(
    model_ref: str | None,
    profile: Profile,
    out: Path,
    echo=print,
    precision: str | None = None,
    allow_accuracy_loss: bool = False,
    calibration: Path | None = None,
    eval_data: Path | None = None,
    prune: bool = False,
    prune_data: Path | None = None,
) -> dict:
    """Build the bundle for `profile` at `out` with the family that claims `model_ref`; return its
    manifest. The output folder is checked before any work starts. `prune` (encoders: the profile's
    [classifier_prune] / [embedder_prune]) prunes and distils the model first."""
    family = next(f for f in FAMILIES if f.claims(model_ref))
    args = (model_ref, profile, Path(out), echo, precision, allow_accuracy_loss, calibration, eval_data)
    if family.prunes_at_build:
        return family.build(*args, prune=prune, prune_data=prune_data)
    if prune or prune_data:
        raise ProfileError(
            f"--prune and --prune-data are for encoders; a {family.name} is pruned by a profile's [prune] section "
            "(docs/pruning.md) or by `edge-slm prune`"
        )
    return family.build(*args)
