"""`edge-slm ask INDEX QUESTION [--decoder BUNDLE] [--reader BUNDLE] [-k N] [--json]`: an answer from
your documents, with the passages it came from."""

from __future__ import annotations

import json
from pathlib import Path

import click

from edge_slm.commands.options import open_bundle, threads_option
from edge_slm.core.errors import EdgeSlmError


def open_reader(path: Path, threads):
    """A question-answering encoder bundle, or a one-line refusal naming what `path` is instead."""
    from edge_slm.core.manifest import EncoderManifest

    reader = open_bundle(path, threads, EncoderManifest)
    if reader.task != "question-answering":
        raise EdgeSlmError(
            f"--reader {path} is an encoder bundle for {reader.task}, not question-answering: give one built "
            "from a *ForQuestionAnswering model"
        )
    return reader


@click.command("ask")
@click.argument("index", type=click.Path(path_type=Path))
@click.argument("question")
@click.option(
    "--decoder", "-d", type=click.Path(path_type=Path), help="A decoder bundle: a written answer, not a quote."
)
@click.option(
    "--reader",
    "-r",
    type=click.Path(path_type=Path),
    help="A question-answering encoder bundle: the answer is the span it picks in the passages.",
)
@click.option("--embedder", "-e", type=click.Path(path_type=Path), help="The index's embedder, if it moved.")
@click.option("-k", "k", type=click.IntRange(1, 50), default=3, show_default=True, help="Passages to retrieve.")
@click.option("--min-score", type=click.FloatRange(-1, 1), default=None, help="Below it: nothing relevant [0.31].")
@click.option("--max-new-tokens", "-n", type=click.IntRange(min=1), default=128, show_default=True)
@click.option(
    "--json", "as_json", is_flag=True, help='{"answer": ..., "sources": [{"file", "lines", "text", "score"}]}'
)
@threads_option()
def ask_command(index, question, decoder, reader, embedder, k, min_score, max_new_tokens, as_json, threads) -> None:
    """Answer QUESTION from the documents in INDEX (made by `edge-slm index`)."""
    from edge_slm.core.text import check_text
    from edge_slm.runtime.qa import DEFAULT_MIN_SCORE, open_index

    check_text(question, "QUESTION")
    qa = open_index(index, embedder, threads)
    model = open_bundle(decoder, threads) if decoder else None
    span_reader = open_reader(reader, threads) if reader else None
    stream = model is not None and not as_json
    on_text = (lambda piece: click.echo(piece, nl=False)) if stream else None
    answer = qa.ask(
        question,
        k=k,
        decoder=model,
        min_score=DEFAULT_MIN_SCORE if min_score is None else min_score,
        on_text=on_text,
        max_new_tokens=max_new_tokens,
        reader=span_reader,
    )
    if as_json:
        click.echo(json.dumps(answer.to_dict(), ensure_ascii=False))
        return
    if stream and answer.found:
        click.echo()
    else:
        click.echo(answer.answer)
    for n, source in enumerate(answer.sources, 1):
        click.echo(f"[{n}] {source.file}:{source.lines[0]}-{source.lines[1]}  {source.score:.3f}  {source.text}")
