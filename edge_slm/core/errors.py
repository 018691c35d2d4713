"""Typed errors whose messages name the bad value and the fix; the CLI prints them as one line.

Raised by every stage; `edge-slm ...` turns them into `error: <message>` and exit code 2
(a traceback only with `--debug`).
"""


class EdgeSlmError(Exception):
    """Base class: a problem the user can fix, reported without a traceback."""


class ProfileError(EdgeSlmError):
    """A target profile is missing, unknown, or has a bad key, type or value."""


class ModelError(EdgeSlmError):
    """A model reference cannot be loaded: missing, unsupported architecture, no network."""


class ExportError(EdgeSlmError):
    """The ONNX export failed."""


class ParityError(ExportError):
    """The exported graph disagrees with torch beyond the tolerance for its precision."""


class BundleError(EdgeSlmError):
    """A bundle is missing, incomplete, corrupt, or of another schema version."""


class AccuracyBudgetError(EdgeSlmError):
    """A quantized (or pruned) model lost more accuracy than its profile allows."""
