"""What the commands share: progress lines on stderr, and the options and model loading of the
commands that run a bundle (generate, chat, eval)."""

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


def sampling_options(func):
    for option in reversed(
        [
            click.option("--max-new-tokens", "-n", type=click.IntRange(min=1), default=128, show_default=True),
            click.option("--temperature", type=float, default=0.0, show_default=True, help="0 is greedy."),
            click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="0 is no limit."),
            click.option("--top-p", type=float, default=1.0, show_default=True),
            click.option("--repetition-penalty", type=float, default=1.0, show_default=True),
            click.option("--seed", type=int, default=None, help="Makes sampling reproducible."),
            click.option("--stop", multiple=True, help="Stop when this text appears (repeatable)."),
            click.option("--threads", type=int, default=None, help="CPU threads [the bundle's profile]."),
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
    return {k: kw[k] for k in ("temperature", "top_k", "top_p", "repetition_penalty", "seed")}
