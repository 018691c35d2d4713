"""OLMo 2: norms after each branch only (the branch reads the raw residual stream) and an RMSNorm
of q and k over all heads at once, before the rotary embedding."""

from edge_slm.builder.decoder.architectures.base import Layout, Norms, mlp_activation, plain_layers

MODEL_TYPES = {"olmo2": "OLMo 2"}
# onnxruntime-genai\'s model type for each (genai_config.json\'s model.type)
# onnxruntime-genai 0.18 refuses "olmo2" ("Unsupported model_type"); its "olmo" is a plain decoder
# with the same inputs and outputs, and the graph carries OLMo 2's own norms.
GENAI_MODEL_TYPES = {"olmo2": "olmo"}


def layout(config) -> Layout:
    norms = Norms(
        attn_pre=None, attn_post="post_attention_layernorm", mlp_pre=None, mlp_post="post_feedforward_layernorm"
    )
    return Layout(
        "olmo2", plain_layers(config), norms=norms, qk_norm="full", activation=mlp_activation(config.hidden_act)
    )
