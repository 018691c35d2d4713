"""`edge-slm index DOCS --embedder BUNDLE --out INDEX`: a searchable index of a folder of documents."""

from __future__ import annotations

from pathlib import Path

import click

from edge_slm.commands.options import echo_err, threads_option


@click.command("index")
@click.argument("docs", type=click.Path(path_type=Path))
@click.option("--embedder", "-e", type=click.Path(path_type=Path), required=True, help="An embedder bundle.")
@click.option(
    "--out",
    "-o",
    type=click.Path(path_type=Path),
    required=True,
    help="The index folder: new, empty, or an index edge-slm made (unchanged documents are not embedded again).",
)
@threads_option()
def index_command(docs: Path, embedder: Path, out: Path, threads: int | None) -> None:
    """Split the .txt and .md files under DOCS into passages and embed them, for `edge-slm ask`."""
    from edge_slm.core.outputs import check_output_folder
    from edge_slm.runtime.index import build_index

    check_output_folder(out)  # before the embedder loads: a user's folder is refused at once
    stats = build_index(docs, embedder, out, echo=echo_err, threads=threads)
    for note in stats.skipped:
        echo_err(f"skipped {note}")
    echo_err(
        f"index ready: {out} ({stats.documents} documents, {stats.passages} passages: {stats.embedded} embedded, "
        f"{stats.reused} reused; {stats.seconds:.1f}s)"
    )
