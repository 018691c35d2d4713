"""`edge-slm translate BUNDLE TEXT... [--beams N] [--max-tokens N] [--target-lang L] [--json]`:
a seq2seq bundle on the device, one translation per line (or one JSON object per text)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from edge_slm.commands.options import open_bundle, threads_option
from edge_slm.core.errors import EdgeSlmError
from edge_slm.core.manifest import Seq2SeqManifest
from edge_slm.core.text import check_text


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("texts", nargs=-1)
@click.option("--beams", type=int, default=None, help="Beam width (1: greedy). Default: the model's own.")
@click.option("--max-tokens", type=int, default=None, help="Most tokens per translation (default: the bundle's cap).")
@click.option("--target-lang", default=None, help="Target language of a multilingual model (e.g. deu).")
@threads_option()
@click.option("--json", "as_json", is_flag=True, help="One JSON object per text: text and translation.")
def translate(bundle, texts, beams, max_tokens, target_lang, threads, as_json) -> None:
    """Translate each TEXT with a seq2seq (Marian / OPUS-MT, T5) bundle."""
    if not texts:
        raise EdgeSlmError("give at least one TEXT to translate")
    for n, text in enumerate(texts, 1):
        check_text(text, f"TEXT argument {n}")
    model = open_bundle(bundle, threads, need=Seq2SeqManifest)
    beams = model.generation.default_beams if beams is None else beams
    for text, out in zip(texts, model.translate(list(texts), max_tokens, beams, target_lang)):
        click.echo(json.dumps({"text": text, "translation": out}, ensure_ascii=False) if as_json else out)


def refuse_seq2seq(bundle: Path, command: str) -> None:
    """`bench` and `verify` measure decoders and encoders; a seq2seq bundle is refused by name."""
    from edge_slm.core.bundle import read_manifest

    if (Path(bundle) / "manifest.json").is_file() and isinstance(read_manifest(bundle), Seq2SeqManifest):
        raise EdgeSlmError(
            f"{bundle} is a seq2seq bundle: `edge-slm {command}` does not measure translation yet; "
            "use `edge-slm translate` (benchmarks/translate_peers.py measures its speed)"
        )
