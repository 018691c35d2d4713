"""Which onnxruntime version first runs each operator form that edge-slm emits: one table that the
export, the quantizers and the bundle's `min_onnxruntime` all read.

The versions were found by running the graphs: 1.20.1 runs the fused graph and 4-bit MatMulNBits
(also under an emulated Cortex-A72); it refuses 8-bit MatMulNBits, GatherBlockQuantized with
`bits`, GroupQueryAttention with position_ids and a SimplifiedLayerNormalization scale that
broadcasts over more than the normalized axis, which 1.24.1 runs; BranchwiseRMSNorm is in 1.31.0,
not in 1.30.0. 1.20.1's CPU kernel of GroupQueryAttention with `local_window_size` gives wrong
logits once a prompt is longer than the window (1.24.1 is right); the Jetson's 1.20 runs it on CUDA,
not checked here.
"""

from __future__ import annotations

BASELINE = "1.20.0"  # the fused graph: GroupQueryAttention, RotaryEmbedding, SkipSimplifiedLayerNormalization

SINCE = {
    "GroupQueryAttention.position_ids": "1.24.0",
    "MatMulNBits.bits=8": "1.24.0",
    "GatherBlockQuantized": "1.24.0",
    "SimplifiedLayerNormalization.broadcast_scale": "1.24.0",  # a scale wider than the normalized axis
    "BranchwiseRMSNorm": "1.31.0",
}


def version_tuple(text: str) -> tuple[int, ...]:
    """Version text as a comparable tuple of three: 1.24.1 -> (1, 24, 1), 1.24 -> (1, 24, 0); a
    local suffix such as +cpu is ignored."""
    parts = tuple(int(part) for part in text.split("+")[0].split(".")[:3] if part.isdigit())
    return parts + (0,) * (3 - len(parts))


def supports(feature: str, onnxruntime_version: str | None) -> bool:
    """True if `onnxruntime_version` runs `feature` (a key of SINCE); None means the newest."""
    return onnxruntime_version is None or version_tuple(onnxruntime_version) >= version_tuple(SINCE[feature])


def min_onnxruntime(features: set[str]) -> str:
    """The oldest onnxruntime that runs every one of `features`."""
    return max([BASELINE, *(SINCE[f] for f in features)], key=version_tuple)
