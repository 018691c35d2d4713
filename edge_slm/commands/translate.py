"""`edge-slm translate BUNDLE [TEXT...] [--file FILE|-] [--to LANG] [--beams N] [-n N] [--json] [--stream]`:
a seq2seq bundle on the device, one translation per line (or one JSON object per text). With no
TEXT and no --file, the texts are stdin's lines (`echo "Good morning." | edge-slm translate B`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from edge_slm.commands.options import open_bundle, threads_option
from edge_slm.core.errors import EdgeSlmError
from edge_slm.core.manifest import Seq2SeqManifest
from edge_slm.core.text import check_text, decode_lines

BATCH = 16  # lines of a file or stdin translated together: a batch step reads the weights once


def _texts(texts: tuple[str, ...], file: Path | None) -> list[str]:
    if texts and file:
        raise click.UsageError("give texts or --file, not both")
    if texts:
        return [check_text(text, f"TEXT argument {n}") for n, text in enumerate(texts, 1)]
    if file is None and sys.stdin.isatty():
        raise EdgeSlmError("give at least one TEXT to translate (or --file FILE, or text on stdin)")
    where = "stdin" if file is None or str(file) == "-" else str(file)
    try:
        data = sys.stdin.buffer.read() if where == "stdin" else file.read_bytes()
    except OSError as exc:
        raise EdgeSlmError(f"{where}: cannot be read ({exc.strerror}); one text per line") from None
    lines = [check_text(line, f"{where}:{n}") for n, line in decode_lines(data) if line.strip()]
    if not lines:
        raise EdgeSlmError(f"{where}: no text in it (one text per line)")
    return lines


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("texts", nargs=-1)
@click.option(
    "--file",
    "-f",
    type=click.Path(path_type=Path, dir_okay=False, allow_dash=True),
    help="One text per line (-: stdin).",
)
@click.option("--to", "--target-lang", "target_lang", default=None, help="Target language of a multilingual model.")
@click.option("--beams", type=int, default=None, help="Beam width (1: greedy). Default: the model's own.")
@click.option(
    "-n", "--max-new-tokens", "--max-tokens", "max_tokens", type=int, default=None, help="Most tokens per translation."
)
@threads_option()
@click.option("--json", "as_json", is_flag=True, help="One JSON object per text: text, translation and token_ids.")
@click.option("--stream", is_flag=True, help="Print each greedy translation as it is written.")
def translate(bundle, texts, file, target_lang, beams, max_tokens, threads, as_json, stream) -> None:
    """Translate each TEXT (or each line of --file or stdin) with a seq2seq bundle."""
    items = _texts(texts, file)  # bad text is refused before the model loads
    model = open_bundle(bundle, threads, need=Seq2SeqManifest)
    beams = model.generation.default_beams if beams is None else beams
    if stream and (as_json or beams != 1):
        raise EdgeSlmError("--stream prints greedy text as it is written: use it with --beams 1 and without --json")
    for start in range(0, len(items), BATCH):
        batch = items[start : start + BATCH]
        if stream:
            for text in batch:
                for piece in model.stream(text, max_tokens, target_lang):
                    click.echo(piece, nl=False)
                click.echo()
            continue
        for text, out in zip(batch, model.translations(batch, max_tokens, beams, target_lang)):
            row = {"text": text, "translation": out.text, "token_ids": out.token_ids, "sentences": out.sentences}
            click.echo(json.dumps(row, ensure_ascii=False) if as_json else out.text)


def refuse_seq2seq(bundle: Path, command: str) -> None:
    """`verify` measures decoders and encoders; a seq2seq bundle is refused by name."""
    from edge_slm.core.bundle import read_manifest

    if (Path(bundle) / "manifest.json").is_file() and isinstance(read_manifest(bundle), Seq2SeqManifest):
        raise EdgeSlmError(
            f"{bundle} is a seq2seq bundle: `edge-slm {command}` does not measure translation yet; "
            "use `edge-slm translate` (benchmarks/translate_peers.py measures its speed)"
        )
