"""What the commands share: progress lines on stderr, and the options and model loading of the
commands that run a bundle (generate, chat, eval)."""

from __future__ import annotations

from pathlib import Path

import click


def echo_err(message: str) -> None:
    """Progress and notes go to stderr, so that stdout carries only the result."""
    click.echo(message, err=True)


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


def open_bundle(bundle: Path, threads: int | None):
    from edge_slm import runtime

    return runtime.load(bundle, threads=threads)


def sampling(kw: dict) -> dict:
    return {k: kw[k] for k in ("temperature", "top_k", "top_p", "repetition_penalty", "seed")}
