"""Parity of an exported ONNX graph against the torch model it came from.

Runs a real prompt through both (prefill), then a few greedy decode steps feeding each side its
own cache, and compares the logits and every present key/value. A miss raises `ParityError`
naming the output and the max difference. Called by `edge-slm build` right after export;
tolerances per precision live in `edge_slm/parity.toml`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_slm.builder.decoder.architectures.base import layer_windows
from edge_slm.core.errors import ParityError
from edge_slm.core.tomlfile import read_toml

_TOLERANCES = read_toml(Path(__file__).parent / "parity.toml")


@dataclass(frozen=True)
class Tolerance:
    logits: float
    present: float

    @classmethod
    def for_precision(cls, precision: str) -> Tolerance:
        return cls(**_TOLERANCES[precision])


def _torch_presents(cache) -> list[np.ndarray]:
    """Flatten a transformers cache into [k0, v0, k1, v1, ...] as numpy (a decoder-only model that
    keeps an encoder-decoder cache, as GPT-BigCode does, has its keys in the self-attention part)."""
    cache = getattr(cache, "self_attention_cache", cache)
    if hasattr(cache, "layers"):
        pairs = [(layer.keys, layer.values) for layer in cache.layers]
    else:
        pairs = list(cache)
    return [t.numpy() for pair in pairs for t in pair]


def validate(onnx_path: Path, model, prompt_ids: list[int], precision: str = "fp32", decode_steps: int = 3) -> dict:
    """Compare `onnx_path` with `model` on `prompt_ids` and `decode_steps` greedy steps."""
    import onnxruntime as ort
    import torch

    tolerance = Tolerance.for_precision(precision)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: logits_to_keep is an input with a default, on purpose
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    past_names = [i.name for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    output_names = [o.name for o in session.get_outputs()]
    # KV heads and head size as the graph has them (fixed dimensions in fused and generic graphs).
    _, kv_heads, _, head_dim = next(i.shape for i in session.get_inputs() if i.name == past_names[0])
    empty = np.zeros((1, kv_heads, 0, head_dim), np.float32)
    windows = layer_windows(model.config)
    takes_positions = any(i.name == "position_ids" for i in session.get_inputs())
    onnx_past = [empty for _ in past_names]

    ids = np.array([prompt_ids], dtype=np.int64)
    torch_cache, total = None, 0
    worst = {"logits": 0.0, "present": 0.0}
    worst_name = {"logits": "logits", "present": ""}
    steps = []
    for step in range(decode_steps + 1):
        seq = ids.shape[1]
        feed = {
            "input_ids": ids,
            "attention_mask": np.ones((1, total + seq), np.int64),
            "position_ids": np.arange(total, total + seq, dtype=np.int64)[None, :],
            **dict(zip(past_names, onnx_past)),
        }
        if not takes_positions:  # a generic graph that derives positions from the mask
            del feed["position_ids"]
        onnx_out = session.run(output_names, feed)
        with torch.no_grad():
            ref = model(torch.from_numpy(ids), past_key_values=torch_cache, use_cache=True)
        torch_cache = ref.past_key_values
        ref_out = [ref.logits.numpy()] + _torch_presents(torch_cache)

        step_diff = {}
        for name, got, want in zip(output_names, onnx_out, ref_out):
            kind = "logits" if name == "logits" else "present"
            if kind == "present" and windows[int(name.split(".")[1])] and 0 < want.shape[2] < got.shape[2]:
                # A sliding-window layer's torch cache keeps its last keys only; the graph keeps all.
                got = got[:, :, -want.shape[2] :]
            if got.shape != want.shape:
                raise ParityError(f"output '{name}' has shape {list(got.shape)}, torch gives {list(want.shape)}")
            diff = float(np.abs(got - want).max())
            step_diff[kind] = max(step_diff.get(kind, 0.0), diff)
            if diff > worst[kind]:
                worst[kind], worst_name[kind] = diff, name
            if diff > getattr(tolerance, kind):
                phase = "prefill" if step == 0 else f"decode step {step}"
                raise ParityError(
                    f"output '{name}' differs from torch by {diff:.3g} at {phase} "
                    f"(tolerance {getattr(tolerance, kind):g} for {precision})"
                )
        steps.append({"phase": "prefill" if step == 0 else "decode", "tokens": seq, **step_diff})
        total += seq
        onnx_past = onnx_out[1:]
        ids = np.array([[int(ref.logits[0, -1].argmax())]], dtype=np.int64)

    return {
        "passed": True,
        "precision": precision,
        "prompt_tokens": len(prompt_ids),
        "decode_steps": decode_steps,
        "tolerance": {"logits": tolerance.logits, "present": tolerance.present},
        "max_abs_diff": {"logits": worst["logits"], "present": worst["present"]},
        "worst_output": worst_name,
        "steps": steps,
    }
