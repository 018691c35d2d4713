"""Gemma: Llama's norm placement with embeddings times sqrt(hidden), RMSNorm with (1 + weight)
(folded into the weights) and a GELU-tanh gated MLP. `gemma2.py` builds on it."""

import numpy as np

from edge_slm.builder.decoder.architectures.base import Layout, mlp_activation, plain_layers

MODEL_TYPES = {"gemma": "Gemma"}
# onnxruntime-genai\'s model type for each (genai_config.json\'s model.type)
GENAI_MODEL_TYPES = {"gemma": "gemma"}


def plus_one(weights):
    """Gemma's RMSNorm multiplies by (1 + weight): folded, so the graph's norms are the usual ones."""
    return {k: (v + np.float32(1.0) if k.endswith("norm.weight") else v) for k, v in weights.items()}


def embedding_scale(config) -> float:
    return float(np.float32(config.hidden_size**0.5))  # transformers rounds it to the weights' dtype


def layout(config) -> Layout:
    return Layout(
        "gemma",
        plain_layers(config),
        activation=mlp_activation(config.hidden_act),
        embedding_scale=embedding_scale(config),
        weights=plus_one,
    )
