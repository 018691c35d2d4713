"""`edge-slm targets [--json]`: the target profiles this edge-slm knows."""

from __future__ import annotations

import json

import click


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the profiles as JSON.")
def targets(as_json: bool) -> None:
    """List the target profiles."""
    from edge_slm.core.targets import known_targets, load_profile

    profiles = [load_profile(name) for name in known_targets()]
    if as_json:
        click.echo(json.dumps([p.to_dict() for p in profiles], indent=2))
        return
    for p in profiles:
        click.echo(
            f"{p.name:<12} {p.device.arch:<8} {p.quantize.precision:<5} "
            f"{','.join(p.runtime.execution_providers):<55} {p.description}"
        )
