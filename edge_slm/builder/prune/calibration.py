"""Calibration passes shared by the pruning scores and sparsity: the calibration text as token
batches, and one forward pass over them with hooks that collect what each caller needs."""

from __future__ import annotations

from edge_slm.core.errors import ModelError

CHUNK = 256  # calibration tokens per forward pass


def calibration_batches(tokenizer, text: str, chunk: int = CHUNK) -> list:
    import torch

    ids = tokenizer(text).input_ids
    if len(ids) < 64:
        raise ModelError(f"the calibration text has {len(ids)} tokens; pruning needs a few hundred at least")
    return [torch.tensor([ids[i : i + chunk]]) for i in range(0, len(ids), chunk) if len(ids[i : i + chunk]) >= 16]


def calibration_pass(model, batches, hooks: list) -> None:
    """Run the calibration batches through `model` with `hooks` (handles of registered torch
    hooks) collecting what they need, then remove the hooks whatever happens."""
    import torch

    try:
        with torch.no_grad():
            for batch in batches:
                model(batch)
    finally:
        for h in hooks:
            h.remove()
