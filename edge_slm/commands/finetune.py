"""`edge-slm finetune --model M --data train.jsonl [--eval eval.jsonl] --out DIR [--epochs N]
[--lr 1e-5] [--batch-size 32] [--max-minutes M]`: an encoder fine-tuned into a classifier, or with
`--task qa --data squad.json` into an extractive reader."""

from __future__ import annotations

import random
from pathlib import Path

import click

from edge_slm.commands.options import echo_err, require_build_set


@click.command()
@click.option("--model", "-m", default="all-minilm-l6-v2", show_default=True, help="An encoder: HF directory or name.")
@click.option(
    "--task",
    type=click.Choice(["classification", "qa"]),
    default="classification",
    show_default=True,
    help="qa: an extractive reader (*ForQuestionAnswering) from SQuAD-format --data.",
)
@click.option(
    "--data",
    required=True,
    type=click.Path(path_type=Path),
    help="Training data: .jsonl or .csv (text, label); SQuAD-format JSON with --task qa.",
)
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
def finetune(model, task, data, eval_data, out, epochs, lr, batch_size, max_minutes, max_length, seed) -> None:
    """Fine-tune an encoder into a classifier (first-token head, dropout, cross-entropy, Adam), or
    into an extractive reader (--task qa: start/end head, cross-entropy on both, Adam)."""
    require_build_set("finetune")
    from edge_slm.builder.encoder.finetune import FinetuneSettings, check_finetune_output
    from edge_slm.builder.encoder.finetune import finetune as run
    from edge_slm.core.labelled import read_examples

    check_finetune_output(out)
    settings = FinetuneSettings(
        epochs=epochs, lr=lr, batch_size=batch_size, max_minutes=max_minutes, max_length=max_length, seed=seed
    )
    if task == "qa":
        finetune_reader(model, data, eval_data, out, settings)
        return
    train = read_examples(data)
    if eval_data:
        evaluation = read_examples(eval_data, min_classes=1)
    else:
        shuffled = random.Random(seed).sample(train, len(train))
        cut = max(1, len(train) // 10)
        evaluation, train = shuffled[:cut], shuffled[cut:]
        echo_err(f"holding out {len(evaluation)} of the examples for validation (give --eval to choose them)")
    echo_err(f"fine-tuning {model} on {len(train)} examples, {len(evaluation)} for validation, {epochs} epochs")
    record = run(model, train, evaluation, settings, out, progress=echo_err)
    best = record["best"]
    click.echo(
        f"classifier ready: {out}  (best epoch {best['epoch']}: validation loss {best['validation_loss']:.4f}, "
        f"accuracy {100 * best['accuracy']:.1f}%)"
    )
    click.echo(f"build it:         edge-slm build --target x86-laptop --model {out} --out export/x86-laptop-classifier")


def finetune_reader(model, data, eval_data, out, settings) -> None:
    from edge_slm.builder.encoder.finetune_qa import finetune_qa
    from edge_slm.core.labelled import DataError
    from edge_slm.core.squad import read_squad

    train = read_squad(data)
    if eval_data:
        evaluation = read_squad(eval_data)
    else:
        if len(train) < 2:
            raise DataError(f"{data}: one question; give more, or validation questions with --eval")
        shuffled = random.Random(settings.seed).sample(train, len(train))
        cut = max(1, len(train) // 10)
        evaluation, train = shuffled[:cut], shuffled[cut:]
        echo_err(f"holding out {len(evaluation)} of the questions for validation (give --eval to choose them)")
    echo_err(f"fine-tuning {model} into a reader on {len(train)} questions, {len(evaluation)} for validation")
    record = finetune_qa(model, train, evaluation, settings, out, progress=echo_err)
    best = record["best"]
    click.echo(
        f"reader ready: {out}  (best epoch {best['epoch']}: validation loss {best['validation_loss']:.4f}, "
        f"span accuracy {100 * best['span_accuracy']:.1f}%)"
    )
    click.echo(f"build it:     edge-slm build --target x86-laptop --model {out} --out export/x86-laptop-reader")
