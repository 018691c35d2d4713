"""`edge-slm report RESULTS.jsonl... --out DIR`: Markdown and HTML reports with plots."""

from __future__ import annotations

from pathlib import Path

import click

from edge_slm.commands.extras import require_extra


@click.command()
@click.argument("results", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Directory for report.md, report.html and the PNGs: a new or empty folder, or one an earlier "
    "`edge-slm report` wrote (regenerated whole; a folder holding anything else is refused).",
)
def report(results: tuple[Path, ...], out: Path) -> None:
    """Markdown and HTML reports with plots from benchmark records (JSONL)."""
    require_extra("report", "report")
    from edge_slm.harness.report import write_report

    paths = write_report(list(results), out)
    for path in paths:
        click.echo(str(path))
