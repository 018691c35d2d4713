"""Qwen3: Llama's layout with a per-head RMSNorm of q and k before the rotary embedding."""

from edge_slm.builder.decoder.architectures.base import Layout, mlp_activation, plain_layers

MODEL_TYPES = {"qwen3": "Qwen3"}
# onnxruntime-genai\'s model type for each (genai_config.json\'s model.type)
GENAI_MODEL_TYPES = {"qwen3": "qwen3"}


def layout(config) -> Layout:
    return Layout("qwen3", plain_layers(config), qk_norm="head", activation=mlp_activation(config.hidden_act))
