"""`edge-slm eval BUNDLE --text FILE [--reference BUNDLE]`: perplexity on the device, and with a
reference, top-1 agreement and KL."""

from __future__ import annotations

import json
from pathlib import Path

import click

from edge_slm.commands.options import echo_err, open_bundle, threads_option


@click.command(name="eval")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--text", "text_file", type=click.Path(path_type=Path), help="Decoders: UTF-8 text to score.")
@click.option(
    "--data",
    type=click.Path(path_type=Path),
    help="Encoders: labelled .jsonl/.csv (classifier) or a retrieval .json [the shipped check] (embedder).",
)
@click.option("--reference", type=click.Path(path_type=Path), default=None, help="Usually the fp32 bundle.")
@click.option("--window", type=int, default=None, help="Tokens per window [the bundle's context length].")
@threads_option()
@click.option("--json", "as_json", is_flag=True)
def eval_command(
    bundle: Path,
    text_file: Path | None,
    data: Path | None,
    reference: Path | None,
    window: int | None,
    threads: int | None,
    as_json: bool,
) -> None:
    """Decoders: perplexity over a text (with --reference, top-1 agreement and mean KL).
    Encoders: a classifier's accuracy on --data, an embedder's retrieval check."""
    from edge_slm.core.bundle import read_manifest
    from edge_slm.core.manifest import EncoderManifest
    from edge_slm.runtime.evaluate import evaluate, read_text

    if isinstance(read_manifest(bundle), EncoderManifest):
        _eval_encoder(bundle, data, threads, as_json)
        return
    if text_file is None:
        raise click.UsageError("a decoder bundle is scored on a text: give --text FILE")
    text = read_text(text_file)
    model = open_bundle(bundle, threads)
    ref_model = open_bundle(reference, threads) if reference else None
    result = evaluate(model, text, ref_model, window, progress=lambda done, total: echo_err(f"  window {done}/{total}"))
    if as_json:
        click.echo(json.dumps(result))
        return
    line = f"perplexity {result['perplexity']:.3f} over {result['scored_tokens']} tokens ({result['windows']} windows)"
    if ref_model:
        line += f"; top-1 agreement {result['top1_agreement']:.1%}, mean KL {result['mean_kl']:.4f}"
    click.echo(line)


def _eval_encoder(bundle: Path, data: Path | None, threads: int | None, as_json: bool) -> None:
    from edge_slm.core.labelled import read_examples, read_retrieval
    from edge_slm.core.manifest import EncoderManifest
    from edge_slm.runtime.encoder_eval import evaluate_classifier, evaluate_retrieval

    model = open_bundle(bundle, threads, need=EncoderManifest)
    if model.task == "classification":
        if data is None:
            raise click.UsageError("a classifier is scored on labelled texts: give --data test.jsonl")
        result = evaluate_classifier(model, read_examples(data, min_classes=1))
        line = (
            f"accuracy {100 * result['accuracy']:.1f}% on {result['examples']} examples  ("
            + ", ".join(f"{label} {100 * r['accuracy']:.0f}%" for label, r in result["per_label"].items())
            + ")"
        )
    else:
        result = evaluate_retrieval(model, read_retrieval(data) if data else read_retrieval())
        line = (
            f"retrieval: recall@1 {100 * result['recall_at_1']:.1f}%, recall@5 {100 * result['recall_at_5']:.1f}%, "
            f"MRR {result['mrr']:.3f} over {result['queries']} queries"
        )
    click.echo(json.dumps(result) if as_json else line)
