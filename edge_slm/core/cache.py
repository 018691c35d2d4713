"""Where edge-slm keeps what is worth keeping between runs (dequantized models, pruned models, the
emulated Pi's Python): `EDGE_SLM_CACHE`, else `$XDG_CACHE_HOME/edge-slm`, else `~/.cache/edge-slm`."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    base = os.environ.get("EDGE_SLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "edge-slm"
    )
    return Path(base)
