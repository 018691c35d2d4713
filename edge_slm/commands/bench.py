"""`edge-slm bench BUNDLE [--host user@dev | --inventory FILE]`: benchmark records, here or on devices."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from edge_slm.commands.options import echo_err, ssh_device, ssh_options, threads_option


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path), required=False)
@click.option("--prompt-tokens", type=int, default=128, show_default=True)
@click.option("--gen-tokens", type=int, default=64, show_default=True)
@click.option("--repetitions", "-r", type=int, default=5, show_default=True)
@click.option("--warmup", type=int, default=1, show_default=True)
@threads_option(several=True)
@click.option("--reference", type=click.Path(path_type=Path), default=None, help="fp32 bundle for top-1 agreement.")
@click.option("--no-accuracy", is_flag=True, help="Skip the perplexity run.")
@ssh_options()
@click.option(
    "--inventory",
    type=click.Path(path_type=Path),
    default=None,
    help="TOML file of [[device]] host/bundle/target entries, benchmarked in parallel.",
)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Append the records to this JSONL file.")
@click.option("--json", "as_json", is_flag=True, help="Print the records as JSON lines.")
@click.option(
    "--context",
    type=click.IntRange(min=2),
    default=None,
    help="KV cache capacity in tokens [the bundle's context length]; compare runtimes at equal capacity.",
)
def bench(
    bundle: Path | None,
    prompt_tokens: int,
    gen_tokens: int,
    repetitions: int,
    warmup: int,
    threads: list[int] | None,
    reference: Path | None,
    no_accuracy: bool,
    host: str | None,
    port: int,
    identity: str | None,
    strict_host_keys: bool,
    remote_python: str,
    inventory: Path | None,
    out: Path | None,
    as_json: bool,
    context: int | None,
) -> None:
    """Measure load, first token, prefill and decode speed, latency, memory and accuracy."""
    from edge_slm.runtime.bench import bench_bundle, table

    if repetitions < 1 or warmup < 0 or prompt_tokens < 1 or gen_tokens < 2:
        raise click.UsageError("--repetitions must be at least 1, --gen-tokens at least 2, --warmup 0 or more")
    if bundle is None and inventory is None:
        raise click.UsageError("give a BUNDLE (or --inventory FILE)")
    failures = {}
    config = {
        "threads": threads,
        "prompt_tokens": prompt_tokens,
        "gen_tokens": gen_tokens,
        "repetitions": repetitions,
        "warmup": warmup,
        "accuracy": not no_accuracy,
        "context": context,
    }
    if host or inventory:
        from edge_slm.harness.remote import bench_inventory, bench_remote, read_inventory

        if reference:
            raise click.UsageError(
                "--reference works on this machine only; run `edge-slm eval` on the device for top-1"
            )
        if inventory:
            records, failures = bench_inventory(read_inventory(inventory), config, progress=echo_err)
        else:
            device = ssh_device(host, port, identity, remote_python, strict_host_keys)
            records = bench_remote(device, bundle, config, progress=echo_err)
    else:
        records = bench_bundle(bundle, reference=reference, progress=echo_err, **config)
    if out and records:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")
        echo_err(f"appended {len(records)} records to {out}")
    if as_json:
        for record in records:
            click.echo(json.dumps(record))
    elif records:
        families = {(r.get("bundle") or {}).get("family", "decoder") for r in records}
        if families == {"encoder"}:
            from edge_slm.runtime.bench_encoder import encoder_table as table
        click.echo(table(records))
    for where, why in failures.items():
        echo_err(f"error: {why}")
    if failures:
        sys.exit(2)
