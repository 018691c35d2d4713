"""Gemma 2 and Gemma 3 (text): Gemma (`gemma.py`) plus a norm after each branch, the attention
scale from query_pre_attn_scalar and a sliding window on the layers `layer_types` marks. Gemma 2
soft-caps the attention scores and the logits; Gemma 3 normalizes q and k per head and gives its
sliding layers their own rotary table (rope_local_base_freq)."""

from edge_slm.builder.decoder.architectures.base import Layout, Norms, mlp_activation, plain_layers
from edge_slm.builder.decoder.architectures.gemma import embedding_scale, plus_one

MODEL_TYPES = {"gemma2": "Gemma 2", "gemma3_text": "Gemma 3 (text)"}
# onnxruntime-genai\'s model type for each (genai_config.json\'s model.type)
GENAI_MODEL_TYPES = {"gemma2": "gemma2", "gemma3_text": "gemma3_text"}
NORMS = Norms("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")


def layout(config) -> Layout:
    gemma3 = config.model_type == "gemma3_text"
    rotary = ["local" if kind == "sliding_attention" else "global" for kind in config.layer_types] if gemma3 else None
    return Layout(
        config.model_type,
        plain_layers(config, rotary),
        norms=NORMS,
        qk_norm="head" if gemma3 else None,
        activation=mlp_activation(config.hidden_activation),
        embedding_scale=embedding_scale(config),
        attention_scale=float(config.query_pre_attn_scalar) ** -0.5,
        attention_softcap=float(getattr(config, "attn_logit_softcapping", None) or 0.0),
        logits_softcap=float(getattr(config, "final_logit_softcapping", None) or 0.0),
        weights=plus_one,
    )
