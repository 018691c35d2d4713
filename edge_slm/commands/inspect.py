"""`edge-slm inspect BUNDLE [--json] [--no-checksums]`: a bundle's manifest in a few lines, every
file verified; each manifest type prints its own lines (`core.manifest_text`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from edge_slm.core.manifest import Manifest


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@click.option("--no-checksums", is_flag=True, help="Check sizes only (fast), not sha256.")
def inspect(bundle: Path, as_json: bool, no_checksums: bool) -> None:
    """Show a bundle's manifest and verify every file's checksum."""
    from edge_slm.core.bundle import verify_bundle

    manifest = verify_bundle(bundle, checksums=not no_checksums)
    if as_json:
        click.echo(json.dumps(manifest.raw, indent=2))
        return
    _print_files(manifest.summary_lines(bundle), manifest, no_checksums)


def _print_files(lines: list[str], manifest: Manifest, no_checksums: bool) -> None:
    lines.append("files")
    for name, info in manifest.files.items():
        lines.append(
            f"  {name:<22} {info.bytes / 1e6:>9.2f} MB  sha256 {info.sha256[:16]}…  "
            f"{'size ok' if no_checksums else 'ok'}"
        )
    click.echo("\n".join(lines))
    click.echo("sizes verified" if no_checksums else "all checksums verified")
