"""`edge-slm classify BUNDLE TEXT... | --file FILE [--json]` and `edge-slm embed BUNDLE TEXT... |
--file FILE [--out vectors.npy]`: an encoder bundle on the device."""

from __future__ import annotations

import io
import json
from pathlib import Path

import click

from edge_slm.commands.options import echo_err, open_bundle, threads_option
from edge_slm.core.atomic import atomic_file
from edge_slm.core.errors import EdgeSlmError


def _texts(texts: tuple[str, ...], file: Path | None) -> list[str]:
    if texts and file:
        raise click.UsageError("give texts or --file, not both")
    if file:
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise EdgeSlmError(f"{file}: cannot be read as UTF-8 text ({exc}); one text per line") from None
        texts = tuple(line for line in lines if line.strip())
        if not texts:
            raise EdgeSlmError(f"{file}: no texts in it (one text per line)")
    if not texts:
        raise click.UsageError("give at least one TEXT, or --file with one text per line")
    return list(texts)


def _common(command):
    for option in reversed(
        [
            click.argument("bundle", type=click.Path(path_type=Path)),
            click.argument("texts", nargs=-1),
            click.option("--file", "-f", type=click.Path(path_type=Path, dir_okay=False), help="One text per line."),
            click.option("--batch-size", type=click.IntRange(1, 1024), default=32, show_default=True),
            click.option("--no-truncate", is_flag=True, help="Refuse texts longer than the bundle takes."),
            threads_option(),
        ]
    ):
        command = option(command)
    return command


@click.command()
@_common
@click.option("--json", "as_json", is_flag=True, help="One JSON object per text with every label's probability.")
def classify(bundle, texts, file, batch_size, no_truncate, threads, as_json) -> None:
    """The intent (label) of each text, with its probability."""
    model = open_bundle(bundle, threads, need="encoder", task="classification")
    items = _texts(texts, file)
    for text, result in zip(items, model.classify(items, batch_size, truncate=not no_truncate)):
        if as_json:
            click.echo(json.dumps({"text": text, **result.to_dict()}))
        else:
            click.echo(f"{result.label}\t{result.probability:.3f}\t{text}")


@click.command()
@_common
@click.option("--out", "-o", type=click.Path(path_type=Path, dir_okay=False), help="Write the vectors as .npy.")
def embed(bundle, texts, file, batch_size, no_truncate, threads, out) -> None:
    """One vector per text: printed as JSON lines, or saved with --out as a [N, D] .npy file."""
    import numpy as np

    if out is not None:
        _check_vectors_path(out)
    model = open_bundle(bundle, threads, need="encoder", task="embedding")
    items = _texts(texts, file)
    vectors = model.embed(items, batch_size, truncate=not no_truncate)
    if out is None:
        for row in vectors:
            click.echo(json.dumps([round(float(x), 6) for x in row]))
        return
    buffer = io.BytesIO()
    np.save(buffer, vectors)
    with atomic_file(out) as tmp:
        tmp.write_bytes(buffer.getvalue())
    echo_err(f"{vectors.shape[0]} vectors of {vectors.shape[1]} dimensions -> {out}")


def _check_vectors_path(out: Path) -> None:
    """A .npy name; an existing file is replaced only if it is a NumPy file (vectors from before)."""
    if out.suffix != ".npy":
        raise EdgeSlmError(f"--out {out}: use a .npy file name")
    if out.exists() or out.is_symlink():
        try:
            is_numpy = out.is_file() and not out.is_symlink() and out.open("rb").read(6) == b"\x93NUMPY"
        except OSError:
            is_numpy = False
        if not is_numpy:
            raise EdgeSlmError(f"--out {out}: exists and is not a NumPy file; edge-slm will not replace it")
