"""The optional dependency sets (pyproject's extras) and the one-line refusal when one is missing:
a device's runtime-only install, or a build host without the report extra, is told which extra to
add instead of meeting an import error."""

from __future__ import annotations

import importlib.util

from edge_slm.core.errors import EdgeSlmError

# The modules each extra brings, as imported (pyproject lists distributions, whose names differ).
EXTRAS = {
    "build": ("torch", "transformers", "onnx", "optimum", "gguf", "accelerate"),
    "serve": ("starlette", "uvicorn", "sse_starlette", "prometheus_client"),
    "report": ("matplotlib",),
    "fleet": ("ansible_runner", "ansible"),
    "grammar": ("llguidance",),
}
_WHERE = {"build": " on a build host; a device needs only the runtime"}


class MissingExtraError(EdgeSlmError):
    """An optional dependency set is not installed."""


def missing_extra_message(command: str, extra: str, module: str) -> str:
    return (
        f"edge-slm {command} needs the {extra} extra ({module} is not installed): "
        f"pip install 'edge-slm[{extra}]'{_WHERE.get(extra, '')}"
    )


def require_extra(extra: str, command: str) -> None:
    """Refuse up front, before any heavy import, when a module of `extra` is not installed."""
    for module in EXTRAS[extra]:
        if importlib.util.find_spec(module) is None:  # None also when sys.modules holds None for it
            raise MissingExtraError(missing_extra_message(command, extra, module))


def extra_of(exc: ModuleNotFoundError, command: str) -> MissingExtraError | None:
    """The same refusal for an import that failed deeper down, or None when the missing module is
    not one of an extra's."""
    top = (exc.name or "").split(".")[0]
    for extra, modules in EXTRAS.items():
        if top in modules:
            return MissingExtraError(missing_extra_message(command, extra, top))
    return None
