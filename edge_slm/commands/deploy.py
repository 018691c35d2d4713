"""`edge-slm deploy BUNDLE --host user@device [--serve [--listen HOST:PORT]]`: the bundle installed,
verified, smoke-tested and (with --serve) served on a device over SSH; `--status` and `--stop`
manage the service deploy started."""

from __future__ import annotations

from pathlib import Path

import click

from edge_slm.commands.options import echo_err, ssh_device, ssh_options, threads_option


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path), required=False)
@ssh_options(host_required=True)
@click.option("--serve", "serve_it", is_flag=True, help="Start `edge-slm serve` there and wait until it answers.")
@click.option(
    "--listen",
    default="127.0.0.1:8080",
    show_default=True,
    help="Where the server listens on the device (0.0.0.0:8080: every interface).",
)
@threads_option()
@click.option("--status", is_flag=True, help="Say whether the service deploy started is running.")
@click.option("--stop", is_flag=True, help="Stop the service deploy started.")
def deploy(
    bundle: Path | None,
    host: str,
    port: int,
    identity: str | None,
    remote_python: str,
    strict_host_keys: bool,
    serve_it: bool,
    listen: str,
    threads: int | None,
    status: bool,
    stop: bool,
) -> None:
    """Install the runtime in a venv on a device, copy and verify the bundle, smoke-test it, serve it."""
    from edge_slm.harness import deploy as d

    device = ssh_device(host, port, identity, remote_python, strict_host_keys)
    if status:
        click.echo(f"{host}: {d.service_status(device)}")
        return
    if stop:
        with d.device_lock(device, "deploy --stop"):  # not while a deploy is starting a server
            click.echo(f"{host}: {d.stop_service(device)}")
        return
    if bundle is None:
        raise click.UsageError("give a BUNDLE to deploy (or --status / --stop)")
    address, _, listen_port = listen.rpartition(":")
    if not address or not listen_port.isdigit() or not 0 < int(listen_port) < 65536:
        raise click.UsageError(f"--listen {listen!r}: write HOST:PORT, e.g. 0.0.0.0:8080")
    result = d.deploy(device, bundle, serve=serve_it, listen=listen, threads=threads, progress=echo_err)
    smoke = result["smoke"]
    click.echo(f"deployed:     {result['bundle']} on {host} (venv {result['venv']})")
    click.echo(f"smoke test:   {smoke['summary']}")
    if serve_it:
        click.echo(f"serving:      http://{listen}/v1 as {result['service']}")
        click.echo(f"manage it:    edge-slm deploy --host {host} --status | --stop")
