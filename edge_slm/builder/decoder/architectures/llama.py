"""Llama and the families with its layout: pre-norm RMSNorm, SiLU-gated MLP, rotary on every layer.
Qwen2 differs only by q/k/v biases (found in the weights); Mistral by a sliding window."""

from edge_slm.builder.decoder.architectures.base import Layout, mlp_activation, plain_layers

MODEL_TYPES = {"llama": "Llama, SmolLM2, TinyLlama", "qwen2": "Qwen2, Qwen2.5", "mistral": "Mistral, Ministral"}
# onnxruntime-genai\'s model type for each (genai_config.json\'s model.type)
GENAI_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "mistral": "mistral"}


def layout(config) -> Layout:
    return Layout(config.model_type, plain_layers(config), activation=mlp_activation(config.hidden_act))
