"""`edge-slm bench BUNDLE [--host user@dev | --inventory FILE]`: benchmark records, here or on devices."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from edge_slm.commands.options import echo_err


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path), required=False)
@click.option("--prompt-tokens", type=int, default=128, show_default=True)
@click.option("--gen-tokens", type=int, default=64, show_default=True)
@click.option("--repetitions", "-r", type=int, default=5, show_default=True)
@click.option("--warmup", type=int, default=1, show_default=True)
@click.option("--threads", default=None, help="Thread counts to sweep, e.g. 1,2 [the bundle's profile].")
@click.option("--reference", type=click.Path(path_type=Path), default=None, help="fp32 bundle for top-1 agreement.")
@click.option("--no-accuracy", is_flag=True, help="Skip the perplexity run.")
@click.option("--host", default=None, help="Run on this device over SSH (user@host).")
@click.option("--port", type=int, default=22, show_default=True, help="SSH port of --host.")
@click.option("--identity", default=None, help="SSH private key for --host.")
@click.option(
    "--strict-host-keys",
    is_flag=True,
    help="Only hosts already in known_hosts (default: trust a new host's key on first use, refuse a changed one).",
)
@click.option("--remote-python", default="python3", show_default=True, help="Python on --host.")
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
    threads: str | None,
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
    from edge_slm.runtime.bench import run, table

    if threads is not None:
        try:
            counts = [int(t) for t in threads.split(",")]
        except ValueError:
            raise click.UsageError(f"--threads {threads!r}: give counts like 1,2,4") from None
        if min(counts) < 1:
            raise click.UsageError(f"--threads {threads}: every count must be 1 or more")
    if repetitions < 1 or warmup < 0 or prompt_tokens < 1 or gen_tokens < 2:
        raise click.UsageError("--repetitions must be at least 1, --gen-tokens at least 2, --warmup 0 or more")
    if bundle is None and inventory is None:
        raise click.UsageError("give a BUNDLE (or --inventory FILE)")
    failures = {}
    if host or inventory:
        from edge_slm.harness.remote import Device, bench_inventory, bench_remote, read_inventory

        if reference:
            raise click.UsageError(
                "--reference works on this machine only; run `edge-slm eval` on the device for top-1"
            )
        args = (
            [
                "--prompt-tokens",
                str(prompt_tokens),
                "--gen-tokens",
                str(gen_tokens),
                "-r",
                str(repetitions),
                "--warmup",
                str(warmup),
            ]
            + (["--threads", threads] if threads else [])
            + (["--no-accuracy"] if no_accuracy else [])
            + (["--context", str(context)] if context else [])
        )
        if inventory:
            records, failures = bench_inventory(read_inventory(inventory), args, progress=echo_err)
        else:
            records = bench_remote(
                Device(host, port, identity, remote_python, strict_host_keys=strict_host_keys),
                bundle,
                args,
                progress=echo_err,
            )
    else:
        from edge_slm.core.bundle import read_manifest, verify_bundle
        from edge_slm.core.manifest import EncoderManifest

        counts = counts if threads else [read_manifest(bundle).profile.runtime.threads]
        manifest = verify_bundle(bundle)
    if not (host or inventory) and isinstance(manifest, EncoderManifest):
        from edge_slm.runtime.bench_encoder import run_encoder

        records = run_encoder(bundle, manifest, counts, repetitions, warmup, not no_accuracy, echo_err)
    elif not (host or inventory):
        records = run(
            bundle,
            counts,
            prompt_tokens,
            gen_tokens,
            repetitions,
            warmup,
            reference,
            accuracy=not no_accuracy,
            progress=echo_err,
            context=context,
        )
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
