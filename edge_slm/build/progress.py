"""Running a build's stages: numbered progress lines, and the staging directory the stages write
into, published only when every stage succeeded (the decoder and encoder builds share this)."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from edge_slm.core.bundle import STAGING_MARK, staging_dir


class Progress:
    """Numbered stage lines with elapsed time, on stderr, so long builds show where they are."""

    def __init__(self, total: int, echo=print):
        self.total, self.step, self.echo, self.start = total, 0, echo, time.monotonic()

    def stage(self, title: str) -> None:
        self.step += 1
        self.echo(f"[{self.step}/{self.total}] {title}  ({time.monotonic() - self.start:.0f}s)")

    def note(self, message: str) -> None:
        self.echo(f"      {message}")


def run_stages(plan: list, state, out: Path, echo) -> None:
    """Run each stage of `plan` over `state` (which gets `out_dir`, the staging directory that
    becomes the bundle, and `scratch_dir` for intermediates). The scratch directory sits beside
    the staging one, named like it, so that the next build sweeps it up too if this one is killed."""
    progress = Progress(total=len(plan), echo=echo)
    with (
        staging_dir(Path(out)) as state.out_dir,
        tempfile.TemporaryDirectory(
            dir=Path(out).parent, prefix=f"{Path(out).name}{STAGING_MARK}scratch-", suffix=f"-{os.getpid()}"
        ) as scratch,
    ):
        state.scratch_dir = Path(scratch)
        for stage in plan:
            progress.stage(stage.title(state))
            stage.run(state, progress.note)
