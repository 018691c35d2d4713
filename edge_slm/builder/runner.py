"""The one shape every build stage has, and the loop that runs a list of them.

A stage is a plain function `run(artifact, section, out_dir, note) -> artifact`: the previous
stage's artifact, the part of the profile it reads (`section(profile)`), the directory it writes
into, and a callback for progress lines. `run_stages` threads the artifacts through the list,
numbering the progress lines from it, inside a staging directory that is published as the bundle
only when every stage succeeded. The decoder and the encoder builds share it."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from edge_slm.core.bundle import STAGING_MARK, staging_dir
from edge_slm.core.cache import cache_root
from edge_slm.core.targets import Profile

Note = Callable[[str], None]


@dataclass(frozen=True)
class Stage:
    """One step of a build. `into` names its output directory: "bundle" (the staging directory
    that becomes the bundle), "scratch" (intermediates beside it, removed after the build) or
    "cache" (edge-slm's cache, for results worth keeping between builds)."""

    name: str
    title: Callable[[Any, Profile], str]  # the progress line, from the incoming artifact and the profile
    section: Callable[[Profile], Any]  # the part of the profile the stage reads
    run: Callable[[Any, Any, Path, Note], Any]
    into: Literal["bundle", "scratch", "cache"] = "bundle"


def no_section(profile: Profile) -> None:
    """The section of a stage that reads nothing of the profile."""
    return None


def whole_profile(profile: Profile) -> Profile:
    """The section of a stage that reads several tables (or records the whole profile)."""
    return profile


class Progress:
    """Numbered stage lines with elapsed time, on stderr, so long builds show where they are."""

    def __init__(self, total: int, echo=print):
        self.total, self.step, self.echo, self.start = total, 0, echo, time.monotonic()

    def stage(self, title: str) -> None:
        self.step += 1
        self.echo(f"[{self.step}/{self.total}] {title}  ({time.monotonic() - self.start:.0f}s)")

    def note(self, message: str) -> None:
        self.echo(f"      {message}")


def run_stages(plan: list[Stage], artifact: Any, profile: Profile, out: Path, echo) -> Any:
    """Run `plan` from `artifact` for `profile`, publishing the staging directory as `out`; return
    the last stage's artifact. The scratch directory sits beside the staging one, named like it, so
    that the next build sweeps it up too if this one is killed."""
    progress = Progress(total=len(plan), echo=echo)
    with (
        staging_dir(Path(out)) as bundle,
        tempfile.TemporaryDirectory(
            dir=Path(out).parent, prefix=f"{Path(out).name}{STAGING_MARK}scratch-", suffix=f"-{os.getpid()}"
        ) as scratch,
    ):
        directories = {"bundle": bundle, "scratch": Path(scratch), "cache": cache_root()}
        for stage in plan:
            progress.stage(stage.title(artifact, profile))
            artifact = stage.run(artifact, stage.section(profile), directories[stage.into], progress.note)
    return artifact
