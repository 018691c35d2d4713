"""`edge-slm prune --model M --out DIR [--ffn R] [--head-groups N] [--layers N] [--sparsity R]
[--recover-steps N]`: a smaller Hugging Face model directory. For an encoder (a fine-tuned
classifier or a sentence embedder): `--layers N --heads R --ffn R --data TASK [--eval-data TEST]
[--target T]`, distilled on the task's data."""

from __future__ import annotations

from pathlib import Path

import click

from edge_slm.commands.options import echo_err, require_build_set
from edge_slm.core.errors import EdgeSlmError


@click.command()
@click.option("--model", "-m", default=None, help="smollm2-135m (default), a .gguf file or a HF model dir.")
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True, help="Output model directory.")
@click.option(
    "--ffn",
    type=float,
    default=None,
    help="Share of FFN channels to remove in every layer (0.25 keeps 75%) [0, or the --target profile's].",
)
@click.option(
    "--head-groups",
    type=int,
    default=0,
    help="Whole GQA groups (a key/value head and its query heads) to remove per layer.",
)
@click.option(
    "--layers",
    type=int,
    default=None,
    help="Whole layers to remove (those that change their input least) [0, or the --target profile's].",
)
@click.option(
    "--calibration",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Text that importance scores and recovery use [edge_slm/data/calibration.txt].",
)
@click.option(
    "--recover-steps", type=int, default=0, help="Knowledge-distillation steps from the unpruned model (0: none)."
)
@click.option("--recover-minutes", type=float, default=0.0, help="Stop recovery after this many minutes (0: no limit).")
@click.option("--no-compensate", is_flag=True, help="Do not refit the output projections on the remaining channels.")
@click.option(
    "--sparsity",
    type=float,
    default=0.0,
    help="Zero this share of each matrix's weights (Wanda scores): smaller compressed files, no speed.",
)
@click.option("--sparsity-pattern", type=click.Choice(["unstructured", "2:4"]), default="unstructured")
@click.option("--heads", type=float, default=None, help="Encoders: share of attention heads to remove in every layer.")
@click.option(
    "--data",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Encoders: the task's data (a classifier's labelled training split; an embedder's texts, one a line "
    "[shipped texts]).",
)
@click.option(
    "--eval-data",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Encoders: held-out data for the record (labelled for a classifier; an embedder's may be texts, one a line) "
    "[a classifier's eval.jsonl, else the shipped intents test].",
)
@click.option(
    "--target",
    "-t",
    default=None,
    help="Encoders: take the settings from this profile's [classifier_prune] / [embedder_prune] (options override).",
)
def prune(
    model: str | None,
    out: Path,
    ffn: float | None,
    head_groups: int,
    layers: int | None,
    calibration: Path | None,
    recover_steps: int,
    recover_minutes: float,
    no_compensate: bool,
    sparsity: float,
    sparsity_pattern: str,
    heads: float | None,
    data: Path | None,
    eval_data: Path | None,
    target: str | None,
) -> None:
    """Remove layers, attention groups and FFN channels; optionally distil back; write a HF model dir."""
    require_build_set("prune")
    from edge_slm.builder.encoder.source import is_encoder

    if is_encoder(model):
        if head_groups or sparsity or calibration:
            raise EdgeSlmError(
                "--head-groups, --sparsity and --calibration are for decoders; an encoder takes "
                "--layers, --heads, --ffn and --data"
            )
        _prune_encoder(
            model, out, layers, heads, ffn, recover_steps, recover_minutes, data, eval_data, target, not no_compensate
        )
        return
    if heads is not None or data or eval_data or target:
        _refuse_encoder_options(model)
    ffn, layers = ffn or 0.0, layers or 0
    from edge_slm.builder.prune.recover import RecoverySettings
    from edge_slm.builder.prune.structured import PruneSettings, prune_directory

    if calibration is not None and not calibration.is_file():
        raise EdgeSlmError(f"--calibration {calibration}: no such file; pass a UTF-8 text file")
    _check_recovery_options(recover_steps, recover_minutes)
    if sparsity_pattern == "2:4" and not sparsity:
        sparsity = 0.5
    settings = PruneSettings(
        ffn=ffn,
        head_groups=head_groups,
        layers=layers,
        compensate=not no_compensate,
        sparsity=sparsity,
        sparsity_pattern=sparsity_pattern,
    )
    if not (ffn or head_groups or layers or sparsity):
        raise EdgeSlmError("nothing to prune: pass --ffn, --head-groups, --layers and/or --sparsity")
    recovery = RecoverySettings(steps=recover_steps, time_budget_s=60 * recover_minutes) if recover_steps else None
    record = prune_directory(model, settings, out, calibration, recovery, progress=echo_err)
    ppl = record["perplexity"]
    click.echo(
        f"pruned model: {out}  ({record['parameters_before'] / 1e6:.1f}M -> {record['parameters_after'] / 1e6:.1f}M "
        f"parameters; perplexity {ppl['before']:.2f} -> {ppl['pruned']:.2f}"
        + (f" -> {ppl['recovered']:.2f} after recovery" if "recovered" in ppl else "")
        + ")"
    )
    if record.get("sparsity"):
        sp = record["sparsity"]
        click.echo(
            f"sparsity:     {100 * sp['sparsity']:.1f}% zeros ({sp['pattern']}); decoder weights compressed "
            f"{sp['zlib_bytes_dense'] / 1e6:.0f} MB -> {sp['zlib_bytes_sparse'] / 1e6:.0f} MB (zlib); "
            "no speed: the runtimes' CPU kernels are dense"
        )
    click.echo(f"build it:     edge-slm build --target x86-laptop --model {out} --out export/x86-laptop-pruned")


def _prune_encoder(
    model, out, layers, heads, ffn, recover_steps, recover_minutes, data, eval_data, target, refit
) -> None:
    from edge_slm.builder.prune.encoder import EncoderPruneSettings, prune_encoder_directory
    from edge_slm.builder.prune.encoder_recover import EncoderRecoverySettings

    for option, path in (("--data", data), ("--eval-data", eval_data)):
        if path is not None and not path.is_file():
            raise EdgeSlmError(f"{option} {path}: no such file")
    _check_recovery_options(recover_steps, recover_minutes)
    defaults, labels = None, {}
    if target:
        from edge_slm.builder.encoder.pruned import profile_labels, prune_section
        from edge_slm.builder.encoder.source import load_encoder
        from edge_slm.core.targets import load_profile

        profile, task = load_profile(target), load_encoder(model).task
        defaults = prune_section(profile, task)
        # A value the options leave out comes from the profile, and a refusal names it there.
        given = {"layers": layers, "heads": heads, "ffn": ffn}
        from_profile = tuple(name for name, value in given.items() if value is None)
        labels = profile_labels(profile, task, from_profile)[0]
    settings = EncoderPruneSettings(
        layers=layers if layers is not None else (defaults.layers if defaults else 0),
        heads=heads if heads is not None else (defaults.heads if defaults else 0.0),
        ffn=ffn if ffn is not None else (defaults.ffn if defaults else 0.0),
        refit=refit,
    )
    if defaults:
        from edge_slm.builder.encoder.pruned import recovery_settings

        recovery = recovery_settings(defaults, recover_steps, recover_minutes)
    else:
        recovery = (
            EncoderRecoverySettings(steps=recover_steps, time_budget_s=60 * recover_minutes) if recover_steps else None
        )
    record = prune_encoder_directory(model, settings, out, data, eval_data, recovery, echo_err, labels=labels)
    final = record["final"]
    quality = (
        f"accuracy {100 * final['accuracy']:.1f}%"
        if "accuracy" in final
        else f"cosine to the unpruned model {final['mean_cosine']:.4f}, recall@1 {100 * final['recall_at_1']:.1f}%"
    )
    click.echo(
        f"pruned encoder: {out}  ({record['parameters_before'] / 1e6:.1f}M -> {record['parameters_after'] / 1e6:.1f}M "
        f"parameters; {quality})"
    )
    kind = "classifier" if "accuracy" in final else "embedder"
    click.echo(
        f"build it:       edge-slm build --target x86-laptop --model {out} --out export/x86-laptop-{kind}-pruned"
    )


def _check_recovery_options(steps: int, minutes: float) -> None:
    if steps < 0 or not 0 <= minutes < float("inf"):  # `not` in range: nan is refused too
        raise EdgeSlmError("--recover-steps and --recover-minutes must be 0 or more (minutes: 0 for no limit)")


def _refuse_encoder_options(model: str | None) -> None:
    """Encoder options with a --model that is not an encoder: say what the model is, so that a typo
    in a folder's name is not answered with a lecture on decoders."""
    from edge_slm.builder.encoder.source import load_encoder

    if model and Path(model, "config.json").is_file():
        load_encoder(model)  # names what in its config.json makes it no encoder
    what = (
        "no such folder"
        if model and not Path(model).exists()
        else "a folder without a config.json"
        if model and Path(model).is_dir()
        else "not an encoder folder"
    )
    raise EdgeSlmError(
        f"--model {model or 'smollm2-135m (the default)'}: {what}; --heads, --data, --eval-data and --target are for encoders "
        "(a classifier or embedder folder), a decoder takes --head-groups and --calibration"
    )
