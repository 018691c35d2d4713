"""Granite: Llama's layout with four constant multipliers. The embedding multiplier is one Mul
after the Gather (the table may be the tied LM head too); the residual multiplier is folded into
o_proj and down_proj (each branch's last product); the logits divisor into the final norm's weight
(the LM head's only input)."""

from edge_slm.builder.decoder.architectures.base import Layout, fold, mlp_activation, plain_layers

MODEL_TYPES = {"granite": "Granite 3"}
# onnxruntime-genai\'s model type for each (genai_config.json\'s model.type)
GENAI_MODEL_TYPES = {"granite": "granite"}


def layout(config) -> Layout:
    def weights(w):
        w = fold(w, ("self_attn.o_proj.weight", "mlp.down_proj.weight"), config.residual_multiplier)
        return fold(w, ("model.norm.weight",), 1.0 / config.logits_scaling)

    return Layout(
        "granite",
        plain_layers(config),
        activation=mlp_activation(config.hidden_act),
        embedding_scale=float(config.embedding_multiplier),
        attention_scale=float(config.attention_multiplier),
        weights=weights,
    )
