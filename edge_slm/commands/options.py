"""What the commands share: progress lines on stderr, and the options and model loading of the
commands that run a bundle (generate, chat, eval)."""

from __future__ import annotations

import math
from pathlib import Path

import click


def echo_err(message: str) -> None:
    """Progress and notes go to stderr, so that stdout carries only the result."""
    click.echo(message, err=True)


class FiniteFloat(click.ParamType):
    """A float within bounds; unlike click.FloatRange, NaN and infinity are refused too."""

    name = "number"

    def __init__(self, low: float, high: float = math.inf, low_open: bool = False):
        self.low, self.high, self.low_open = low, high, low_open

    def convert(self, value, param, ctx):
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        above = number > self.low if self.low_open else number >= self.low
        if not (math.isfinite(number) and above and number <= self.high):
            bound = f"{'above' if self.low_open else 'at least'} {self.low:g}" + (
                f" and at most {self.high:g}" if math.isfinite(self.high) else ""
            )
            self.fail(f"{value} is not a finite number {bound}", param, ctx)
        return number


def sampling_options(func):
    for option in reversed(
        [
            click.option("--max-new-tokens", "-n", type=click.IntRange(min=1), default=128, show_default=True),
            click.option("--temperature", type=FiniteFloat(0.0), default=0.0, show_default=True, help="0 is greedy."),
            click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="0 is no limit."),
            click.option("--top-p", type=FiniteFloat(0.0, 1.0, low_open=True), default=1.0, show_default=True),
            click.option("--repetition-penalty", type=FiniteFloat(0.0, low_open=True), default=1.0, show_default=True),
            click.option(
                "--seed", type=click.IntRange(0, 2**63 - 1), default=None, help="Makes sampling reproducible."
            ),
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
