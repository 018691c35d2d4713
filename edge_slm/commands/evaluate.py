"""`edge-slm eval BUNDLE --text FILE [--reference BUNDLE]`: perplexity on the device, and with a
reference, top-1 agreement and KL."""

from __future__ import annotations

import json
from pathlib import Path

import click

from edge_slm.commands.options import echo_err, open_bundle


@click.command(name="eval")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--text", "text_file", required=True, type=click.Path(path_type=Path), help="UTF-8 text to score.")
@click.option("--reference", type=click.Path(path_type=Path), default=None, help="Usually the fp32 bundle.")
@click.option("--window", type=int, default=None, help="Tokens per window [the bundle's context length].")
@click.option("--threads", type=int, default=None)
@click.option("--json", "as_json", is_flag=True)
def eval_command(
    bundle: Path, text_file: Path, reference: Path | None, window: int | None, threads: int | None, as_json: bool
) -> None:
    """Perplexity over a text; with --reference, top-1 agreement and mean KL divergence."""
    from edge_slm.runtime.evaluate import evaluate, read_text

    if threads is not None and threads < 1:
        raise click.UsageError(f"--threads is {threads}; use 1 or more")
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
