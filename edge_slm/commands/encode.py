"""`edge-slm classify BUNDLE TEXT... | --file FILE [--json]` and `edge-slm embed BUNDLE TEXT... |
--file FILE [--out vectors.npy]`: an encoder bundle on the device."""

from __future__ import annotations

import io
import json
import os
import stat
from pathlib import Path

import click

from edge_slm.commands.options import echo_err, open_bundle, threads_option
from edge_slm.core.atomic import atomic_file
from edge_slm.core.errors import EdgeSlmError
from edge_slm.core.manifest import EncoderManifest
from edge_slm.core.text import check_text, decode_lines


def _texts(texts: tuple[str, ...], file: Path | None) -> list[str]:
    if texts and file:
        raise click.UsageError("give texts or --file, not both")
    if file:
        try:
            data = file.read_bytes()
        except OSError as exc:
            raise EdgeSlmError(f"{file}: cannot be read ({exc.strerror}); one text per line") from None
        texts = tuple(check_text(line, f"{file}:{n}") for n, line in decode_lines(data) if line.strip())
        if not texts:
            raise EdgeSlmError(f"{file}: no texts in it (one text per line)")
    elif texts:
        for n, text in enumerate(texts, 1):
            check_text(text, f"TEXT argument {n}")
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
    items = _texts(texts, file)  # bad text is refused before the model loads
    model = open_bundle(bundle, threads, need=EncoderManifest, task="classification")
    for text, result in zip(items, model.classify(items, batch_size, truncate=not no_truncate)):
        if as_json:
            click.echo(json.dumps({"text": text, **result.to_dict()}))
        else:
            click.echo(f"{result.label}\t{result.probability:.3f}\t{text}")


@click.command()
@_common
@click.option(
    "--out", "-o", type=click.Path(path_type=Path), help="Write the vectors to this new .npy file (see --overwrite)."
)
@click.option(
    "--overwrite", is_flag=True, help="Let --out replace an existing NumPy .npy file (never any other kind of file)."
)
def embed(bundle, texts, file, batch_size, no_truncate, threads, out, overwrite) -> None:
    """One vector per text: printed as JSON lines, or saved with --out as a [N, D] .npy file."""
    import numpy as np

    if out is not None:
        _check_vectors_path(out, overwrite)
    items = _texts(texts, file)  # bad text is refused before the model loads
    model = open_bundle(bundle, threads, need=EncoderManifest, task="embedding")
    vectors = model.embed(items, batch_size, truncate=not no_truncate)
    if out is None:
        for row in vectors:
            click.echo(json.dumps([round(float(x), 6) for x in row]))
        return
    buffer = io.BytesIO()
    np.save(buffer, vectors)
    _check_vectors_path(out, overwrite)  # again: the path may have changed while the model ran
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as tmp:
        tmp.write_bytes(buffer.getvalue())
    echo_err(f"{vectors.shape[0]} vectors of {vectors.shape[1]} dimensions -> {out}")


def _check_vectors_path(out: Path, overwrite: bool) -> None:
    """A new .npy file; an existing one only with --overwrite, and only a writable NumPy file (vectors
    from before), never a link, a folder, a read-only file or anything else of the user's."""
    if out.suffix != ".npy":
        raise EdgeSlmError(f"--out {out}: use a .npy file name")
    if out.is_symlink():
        raise EdgeSlmError(f"--out {out} is a symbolic link: edge-slm will not write through it; give a new file name")
    if out.is_dir():
        raise EdgeSlmError(f"--out {out} is a directory: give a .npy file name")
    if out.exists():
        is_numpy = False
        if out.is_file():  # never open a FIFO or a device: reading one could block or consume it
            try:
                with out.open("rb") as handle:
                    is_numpy = handle.read(6) == b"\x93NUMPY"
            except OSError:
                pass
        if not is_numpy:
            raise EdgeSlmError(
                f"--out {out} exists and is not a NumPy file; edge-slm will not replace it: choose a new name"
            )
        if not os.access(out, os.W_OK) or not out.stat().st_mode & stat.S_IWUSR:  # root may write anything
            raise EdgeSlmError(f"--out {out} is read-only: edge-slm will not replace it; choose a new name")
        if not overwrite:
            raise EdgeSlmError(f"--out {out} already exists: choose a new name, or add --overwrite to replace it")
    folder = next(p for p in out.absolute().parents if p.exists())  # missing folders are made
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise EdgeSlmError(f"--out {out}: {folder} is not a folder this user can write: choose another --out")
