"""What one decoder family is, in terms of the fused graph's shared pieces.

A `Layout` says which norms sit where, how q and k are normalized, the MLP's activation, the
constant scales of the family, and per layer its sliding window and rotary table. A family module
(`llama.py`, `gemma.py`, ...) maps a Hugging Face config onto a `Layout`; `fused_graph` writes the
graph from it and never asks which family it has. Weights keep Llama's names: a family whose
checkpoint packs them differently (Phi-3's qkv_proj) renames them in `Layout.weights`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

Weights = dict[str, np.ndarray]


@dataclass(frozen=True)
class LayerLayout:
    sliding_window: int | None = None  # keys a query sees, itself included (transformers' meaning)
    rotary: str | None = "global"  # which rotary table ("global", "local"), None: no rotary


@dataclass(frozen=True)
class Norms:
    """The names of a layer's norms (`model.layers.{i}.<name>.weight`); None where there is none.
    Llama has pre-norms; Gemma 2/3 add post-norms on each branch; OLMo 2 has post-norms only."""

    attn_pre: str | None = "input_layernorm"
    attn_post: str | None = None
    mlp_pre: str | None = "post_attention_layernorm"
    mlp_post: str | None = None


@dataclass(frozen=True)
class Layout:
    family: str
    layers: tuple[LayerLayout, ...]
    norms: Norms = Norms()
    qk_norm: str | None = None  # "head": per head before rotary (Qwen3, Gemma3); "full": over all heads (OLMo 2)
    activation: str = "silu"  # of the gated MLP: "silu", "gelu_tanh" or "gelu" (`mlp_activation`)
    embedding_scale: float = 1.0  # embeddings are multiplied by it (Gemma: sqrt(hidden); Granite)
    attention_scale: float | None = None  # None: 1/sqrt(head_dim)
    attention_softcap: float = 0.0  # Gemma 2: tanh soft-capping of the attention scores
    logits_softcap: float = 0.0  # Gemma 2: tanh soft-capping of the logits
    # Renames and folds the checkpoint's weights into Llama's names (and constant scales into them).
    weights: Callable[[Weights], Weights] = field(default=lambda w: w)

    def scale(self, head_dim: int) -> float:
        return self.attention_scale if self.attention_scale is not None else 1.0 / math.sqrt(head_dim)


_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
}


def mlp_activation(name: str) -> str:
    """The fused graph's name for a transformers activation (ACT2FN's key); an unknown one is kept
    as it is, and the fused graph then refuses it (the build takes the generic graph)."""
    return _ACTIVATIONS.get(name, name)


def layer_windows(config) -> list[int | None]:
    """The sliding window of each layer as transformers applies it: `sliding_window` on the layers
    `layer_types` marks "sliding_attention" (on every layer when the config has no layer_types, as
    Mistral's), none when `use_sliding_window` is off."""
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return [None] * config.num_hidden_layers
    types = getattr(config, "layer_types", None)
    if types is None:
        return [int(window)] * config.num_hidden_layers
    return [int(window) if kind == "sliding_attention" else None for kind in types]


def plain_layers(config, rotary: list[str | None] | None = None) -> tuple[LayerLayout, ...]:
    rotary = rotary or ["global"] * config.num_hidden_layers
    return tuple(LayerLayout(window, table) for window, table in zip(layer_windows(config), rotary))


def fold(weights: Weights, suffixes: tuple[str, ...], factor: float) -> Weights:
    """`weights` with every tensor whose name ends with one of `suffixes` multiplied by `factor`
    (a constant scale of the family moved into the weights, so the graph needs no node for it)."""
    if factor == 1.0:
        return weights
    return {k: (v * np.float32(factor) if k.endswith(suffixes) else v) for k, v in weights.items()}
