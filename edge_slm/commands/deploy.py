"""`edge-slm deploy BUNDLE --host user@device [--serve [--listen HOST:PORT]]`: the bundle installed,
verified, smoke-tested and (with --serve) served on a device over SSH; `--status` and `--stop`
manage the service deploy started. `--inventory FILE` does the same on every host of an Ansible
inventory through the edge_slm role (harness/fleet.py)."""

from __future__ import annotations

from pathlib import Path

import click

from edge_slm.commands.options import echo_err, ssh_device, ssh_options, threads_option


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path), required=False)
@ssh_options()
@click.option(
    "--inventory",
    type=click.Path(path_type=Path),
    default=None,
    help="An Ansible inventory (YAML or INI): every host in it, through the edge_slm role.",
)
@click.option("--limit", default=None, help="With --inventory: only the hosts matching this Ansible pattern.")
@click.option("--serial", default=None, help="With --inventory: a rolling update in batches of N hosts or P%.")
@click.option(
    "--max-fail-percentage",
    type=click.IntRange(0, 100),
    default=None,
    help="With --inventory: stop the rollout when more hosts of a batch fail [0 with --serial, else 100].",
)
@click.option(
    "--forks", type=click.IntRange(min=1), default=5, show_default=True, help="With --inventory: hosts at once."
)
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
    host: str | None,
    inventory: Path | None,
    limit: str | None,
    serial: str | None,
    max_fail_percentage: int | None,
    forks: int,
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

    if (host is None) == (inventory is None):
        raise click.UsageError("give --host user@device or --inventory FILE (one of them)")
    address, _, listen_port = listen.rpartition(":")
    if not address or not listen_port.isdigit() or not 0 < int(listen_port) < 65536:
        raise click.UsageError(f"--listen {listen!r}: write HOST:PORT, e.g. 0.0.0.0:8080")
    if inventory is not None:
        ctx = click.get_current_context()
        ssh_given = [
            f"--{name.replace('_', '-')}"
            for name in ("port", "identity", "remote_python", "strict_host_keys")
            if ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT
        ]
        if ssh_given:
            raise click.UsageError(
                f"{', '.join(ssh_given)} go with --host; with --inventory set ansible_port, "
                "ansible_ssh_private_key_file and ansible_python_interpreter per host or group in the inventory"
            )
        # --listen and --threads, when given, hold for every host (else the inventory's or the role's defaults).
        given = click.get_current_context().get_parameter_source("listen") != click.core.ParameterSource.DEFAULT
        overrides = {"edge_slm_listen": listen} if given else {}
        overrides |= {"edge_slm_threads": threads} if threads else {}
        return deploy_inventory(
            inventory, bundle, serve_it, status, stop, limit, serial, max_fail_percentage, forks, overrides
        )
    if limit or serial or max_fail_percentage is not None:
        raise click.UsageError("--limit, --serial and --max-fail-percentage go with --inventory")
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
    result = d.deploy(device, bundle, serve=serve_it, listen=listen, threads=threads, progress=echo_err)
    smoke = result["smoke"]
    click.echo(f"deployed:     {result['bundle']} on {host} (venv {result['venv']})")
    click.echo(f"smoke test:   {smoke['summary']}")
    if serve_it:
        click.echo(f"serving:      http://{listen}/v1 as {result['service']}")
        click.echo(f"manage it:    edge-slm deploy --host {host} --status | --stop")


def deploy_inventory(
    inventory: Path,
    bundle: Path | None,
    serve: bool,
    status: bool,
    stop: bool,
    limit: str | None,
    serial: str | None,
    max_fail_percentage: int | None,
    forks: int,
    overrides: dict,
) -> None:
    """Every host of an Ansible inventory: the recap, one line per failed host, exit 1 if any failed."""
    import re
    import sys

    from edge_slm.harness import fleet

    if not inventory.is_file():
        raise click.UsageError(f"--inventory {inventory}: no such file")
    if serial is not None and not re.fullmatch(r"[1-9][0-9]*%?", serial):
        raise click.UsageError(f"--serial {serial!r}: give a number of hosts (2) or a percentage (25%)")
    if status or stop:
        run = fleet.service_fleet(inventory, "stop" if stop else "status", limit, forks)
        for host, message in sorted(run.messages.items()):
            click.echo(f"{host}: {message}")
    else:
        if serial and max_fail_percentage is None:
            max_fail_percentage = 0  # a rolling update stops at the first failed host
        run = fleet.deploy_fleet(
            inventory, bundle, serve, limit, serial, max_fail_percentage, forks, echo_err, overrides=overrides
        )
    click.echo("PLAY RECAP")
    for line in run.recap_lines():
        click.echo(line)
    for host, why in sorted(run.failures.items()):
        echo_err(f"error: {host}: {why}")
    hosts = [h for h in run.recap if h != "localhost"]
    failed = len(run.failures)
    click.echo(f"{len(hosts) - failed} of {len(hosts)} hosts ok" + (f", {failed} failed" if failed else ""))
    if failed or run.rc:
        sys.exit(1)
