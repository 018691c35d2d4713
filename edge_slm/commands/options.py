"""What the commands share: progress lines on stderr, the options declared once (`--threads`, the
SSH options of the commands that reach a device) and the model loading of the commands that run a
bundle (generate, chat, eval)."""

from __future__ import annotations

from pathlib import Path

import click

from edge_slm.commands.extras import require_extra
from edge_slm.core.errors import EdgeSlmError
from edge_slm.core.manifest import DecoderManifest, Manifest


def echo_err(message: str) -> None:
    """Progress and notes go to stderr, so that stdout carries only the result."""
    click.echo(message, err=True)


def require_build_set(command: str) -> None:
    """The build commands need torch, transformers and onnx (the build extra)."""
    require_extra("build", command)


class ThreadCounts(click.ParamType):
    """CPU threads: a count of 1 or more, or with `several` a comma list of them (a sweep). More
    than the cores of the machine that runs the bundle is capped there, with a warning (the
    runtime's `capped_threads`): a device's count is not this machine's to judge."""

    def __init__(self, several: bool = False):
        self.several = several
        self.name = "counts" if several else "count"  # the help's metavar: COUNT, COUNTS

    def convert(self, value, param, ctx):
        if isinstance(value, (int, list)):
            return value
        parts = str(value).split(",") if self.several else [str(value)]
        try:
            counts = [int(part) for part in parts]
        except ValueError:
            counts = []
        if not counts or min(counts) < 1:
            example = "counts of 1 or more, e.g. 1,2,4" if self.several else "a count of 1 or more, e.g. 2"
            self.fail(f"{value!r}: give {example}", param, ctx)
        return counts if self.several else counts[0]


def threads_option(several: bool = False):
    """`--threads`, the one declaration every command uses; `several` takes a comma list (bench)."""
    help_text = (
        "Thread counts to sweep, e.g. 1,2 [the bundle's profile]."
        if several
        else "CPU threads [the bundle's profile]; at most the cores of the machine that runs it."
    )
    return click.option("--threads", type=ThreadCounts(several), default=None, help=help_text)


def ssh_options(host_required: bool = False):
    """The options of a command that reaches a device over SSH (deploy, bench --host); `ssh_device`
    makes the checked `Device` of their values."""
    options = [
        click.option(
            "--host",
            required=host_required,
            default=None,
            help="The device over SSH: user@hostname, hostname or user@[IPv6].",
        ),
        click.option("--port", type=click.IntRange(1, 65535), default=22, show_default=True, help="Its SSH port."),
        click.option("--identity", default=None, help="SSH private key for it."),
        click.option(
            "--strict-host-keys",
            is_flag=True,
            help="Only a host already in known_hosts (default: trust a new host's key on first use, refuse a changed one).",
        ),
        click.option(
            "--remote-python", default="python3", show_default=True, help="The Python there that makes edge-slm's venv."
        ),
    ]

    def decorate(func):
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def ssh_device(host: str, port: int, identity: str | None, remote_python: str, strict_host_keys: bool):
    from edge_slm.harness.ssh import Device

    return Device(host, port, identity, remote_python, strict_host_keys=strict_host_keys)


def sampling_options(func):
    for option in reversed(
        [
            click.option("--max-new-tokens", "-n", type=click.IntRange(min=1), default=128, show_default=True),
            click.option("--temperature", type=float, default=0.0, show_default=True, help="0 is greedy."),
            click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="0 is no limit."),
            click.option("--top-p", type=float, default=1.0, show_default=True, help="0 is greedy."),
            click.option(
                "--min-p",
                type=float,
                default=0.0,
                show_default=True,
                help="Keep tokens this likely relative to the best.",
            ),
            click.option("--repetition-penalty", type=float, default=1.0, show_default=True),
            click.option("--presence-penalty", type=float, default=0.0, show_default=True, help="OpenAI's, -2 to 2."),
            click.option("--frequency-penalty", type=float, default=0.0, show_default=True, help="OpenAI's, -2 to 2."),
            click.option("--seed", type=int, default=None, help="Makes sampling reproducible."),
            click.option("--stop", multiple=True, help="Stop when this text appears (repeatable)."),
            threads_option(),
        ]
    ):
        func = option(func)
    return func


def open_bundle(bundle: Path, threads: int | None, need: type[Manifest] = DecoderManifest, task: str | None = None):
    """The loaded bundle, refused in one line (naming the bundle's own family) when its manifest
    is not of the type the command works with, or not the encoder task it needs."""
    from edge_slm import runtime

    model = runtime.load(bundle, threads=threads)
    manifest = model.manifest
    if not isinstance(manifest, need):
        raise EdgeSlmError(f"{bundle} is {manifest.article} bundle: {manifest.used_with}")
    if task and model.task != task:
        other = "classify" if model.task == "classification" else "embed"
        raise EdgeSlmError(f"{bundle} is a {model.task} bundle, not a {task} one: use `edge-slm {other}` with it")
    return model


def sampling(kw: dict) -> dict:
    names = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
    return {k: kw[k] for k in (*names, "seed")}
