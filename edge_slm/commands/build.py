"""`edge-slm build --target NAME|FILE [--model REF] [--out DIR] [--precision P] [--calibration FILE] [--prune]
[--allow-accuracy-loss]`: one model, built, validated and gated into a bundle for one target."""

from __future__ import annotations

from pathlib import Path

import click

from edge_slm.commands.options import echo_err, require_build_set
from edge_slm.core.errors import EdgeSlmError
from edge_slm.core.manifest import DecoderManifest, EncoderManifest, Seq2SeqManifest


@click.command()
@click.option("--target", "-t", required=True, help="Target name (see `edge-slm targets`) or a .toml profile.")
@click.option("--model", "-m", default=None, help="smollm2-135m (default), a .gguf file, a HF model dir, or a hub id.")
@click.option("--out", "-o", type=click.Path(path_type=Path), default=None, help="Bundle directory [export/<target>].")
@click.option(
    "--precision",
    "-p",
    type=click.Choice(["fp32", "fp16", "int8", "int4"]),
    default=None,
    help="Override the profile's precision.",
)
@click.option("--allow-accuracy-loss", is_flag=True, help="Publish the bundle even if it misses its accuracy budget.")
@click.option(
    "--calibration",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Calibration text for static int8 (QDQ) [edge_slm/data/calibration.txt].",
)
@click.option(
    "--eval-data",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="A classifier's labelled test split for its accuracy gate [the model's eval.jsonl, else the shipped intents].",
)
@click.option(
    "--prune",
    is_flag=True,
    help="Encoders: prune and distil first, as the profile's [classifier_prune] / [embedder_prune] says "
    "(cached), and gate against the unpruned model.",
)
@click.option(
    "--prune-data",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="With --prune: the task's data (a classifier's labelled training split; an embedder's texts, one a line "
    "[shipped texts]).",
)
def build(
    target: str,
    model: str | None,
    out: Path | None,
    precision: str | None,
    allow_accuracy_loss: bool,
    calibration: Path | None,
    eval_data: Path | None,
    prune: bool,
    prune_data: Path | None,
) -> None:
    """Build, validate and bundle a model for one target."""
    require_build_set("build")
    from edge_slm.core.targets import load_profile

    profile = load_profile(target)  # fail fast, before the heavy imports
    if prune_data is not None and not prune:
        raise EdgeSlmError("--prune-data is the data of --prune: add --prune, or leave --prune-data out")
    for option, path in (("--calibration", calibration), ("--eval-data", eval_data), ("--prune-data", prune_data)):
        if path is not None and not path.is_file():
            raise EdgeSlmError(f"{option} {path}: no such file")
    from edge_slm.core.bundle import check_output_dir, read_manifest

    out = out or Path("export") / profile.name
    check_output_dir(out, source=Path(model) if model and Path(model).exists() else None)
    from edge_slm.builder.pipeline import build as run_build

    run_build(
        model,
        profile,
        out,
        echo=echo_err,
        precision=precision,
        allow_accuracy_loss=allow_accuracy_loss,
        calibration=calibration,
        eval_data=eval_data,
        prune=prune,
        prune_data=prune_data,
    )
    manifest = read_manifest(out)  # as a device will read it
    checked = "validated against torch" + (", accuracy gate passed" if manifest.accuracy_passed else "")
    pruning_gate = (manifest.pruning or {}).get("gate") or {}
    if pruning_gate.get("passed") is False:
        checked += "; OUTSIDE the pruning budget against the unpruned model (published by --allow-accuracy-loss)"
    click.echo(f"bundle ready: {out}  ({manifest.precision}, {manifest.size_bytes / 1e6:.0f} MB, {checked})")
    click.echo(f"inspect it:   edge-slm inspect {out}")
    click.echo(f"run it:       {RUN_IT[type(manifest)](manifest, out)}")


# The manifest's type -> the first command a user runs on it, as printed after a build.
RUN_IT = {
    DecoderManifest: lambda m, out: f'edge-slm generate {out} "What is the capital of France?" --chat',
    EncoderManifest: lambda m, out: (
        f'edge-slm ask INDEX "How many user codes can the lock store?" --reader {out}'
        if m.model.task == "question-answering"
        else f'edge-slm {"classify" if m.model.task == "classification" else "embed"} {out} "turn off the kitchen lights"'
    ),
    Seq2SeqManifest: lambda m, out: f'edge-slm translate {out} "The weather will be sunny tomorrow."',
}
