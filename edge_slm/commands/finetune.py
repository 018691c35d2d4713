"""`edge-slm finetune --model M --data train.jsonl [--eval eval.jsonl] --out DIR [--epochs N]
[--lr 1e-5] [--batch-size 32] [--max-minutes M]`: an encoder fine-tuned into a classifier."""

from __future__ import annotations

import random
from pathlib import Path

import click

from edge_slm.commands.options import echo_err, require_build_set


@click.command()
@click.option("--model", "-m", default="all-minilm-l6-v2", show_default=True, help="An encoder: HF directory or name.")
@click.option("--data", required=True, type=click.Path(path_type=Path), help="Training data: .jsonl or .csv.")
@click.option("--eval", "eval_data", type=click.Path(path_type=Path), help="Held-out data [10% of --data].")
@click.option(
    "--out",
    "-o",
    required=True,
    type=click.Path(path_type=Path),
    help="Output model directory: a new or empty folder, or one an earlier `edge-slm finetune` wrote "
    "(replaced whole; a folder holding anything else is refused).",
)
@click.option("--epochs", type=click.IntRange(1, 1000), default=3, show_default=True)
@click.option("--lr", type=click.FloatRange(0, 1, min_open=True), default=1e-5, show_default=True)
@click.option("--batch-size", type=click.IntRange(1, 4096), default=32, show_default=True)
@click.option("--max-minutes", type=click.FloatRange(0, None, min_open=True), default=None, help="Time budget.")
@click.option("--max-length", type=click.IntRange(8, 8192), default=128, show_default=True, help="Tokens per text.")
@click.option("--seed", type=int, default=0, show_default=True)
def finetune(model, data, eval_data, out, epochs, lr, batch_size, max_minutes, max_length, seed) -> None:
    """Fine-tune an encoder into a classifier (first-token head, dropout, cross-entropy, Adam)."""
    require_build_set("finetune")
    from edge_slm.builder.encoder.finetune import FinetuneSettings, check_finetune_output
    from edge_slm.builder.encoder.finetune import finetune as run
    from edge_slm.core.labelled import read_examples

    check_finetune_output(out)
    train = read_examples(data)
    if eval_data:
        evaluation = read_examples(eval_data, min_classes=1)
    else:
        shuffled = random.Random(seed).sample(train, len(train))
        cut = max(1, len(train) // 10)
        evaluation, train = shuffled[:cut], shuffled[cut:]
        echo_err(f"holding out {len(evaluation)} of the examples for validation (give --eval to choose them)")
    settings = FinetuneSettings(
        epochs=epochs, lr=lr, batch_size=batch_size, max_minutes=max_minutes, max_length=max_length, seed=seed
    )
    echo_err(f"fine-tuning {model} on {len(train)} examples, {len(evaluation)} for validation, {epochs} epochs")
    record = run(model, train, evaluation, settings, out, progress=echo_err)
    best = record["best"]
    click.echo(
        f"classifier ready: {out}  (best epoch {best['epoch']}: validation loss {best['validation_loss']:.4f}, "
        f"accuracy {100 * best['accuracy']:.1f}%)"
    )
    click.echo(f"build it:         edge-slm build --target x86-laptop --model {out} --out export/x86-laptop-classifier")
