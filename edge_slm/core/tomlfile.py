"""TOML files as dicts: tomllib from Python 3.11, tomli before it (JetPack 6 ships 3.10)."""

from __future__ import annotations

import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 devices only
    import tomli as tomllib

TOMLDecodeError = tomllib.TOMLDecodeError


def read_toml(path: Path) -> dict:
    """The file's table; raises OSError / UnicodeDecodeError / TOMLDecodeError for the caller to
    turn into its own one-line error."""
    return tomllib.loads(Path(path).read_text(encoding="utf-8"))
