"""SmolLM3: Llama's layout where the layers `no_rope_layers` marks 0 have no rotary embedding."""

from edge_slm.builder.decoder.architectures.base import Layout, mlp_activation, plain_layers

MODEL_TYPES = {"smollm3": "SmolLM3"}
# onnxruntime-genai\'s model type for each (genai_config.json\'s model.type)
GENAI_MODEL_TYPES = {"smollm3": "smollm3"}


def layout(config) -> Layout:
    rotary = ["global" if use else None for use in config.no_rope_layers]
    return Layout("smollm3", plain_layers(config, rotary), activation=mlp_activation(config.hidden_act))
