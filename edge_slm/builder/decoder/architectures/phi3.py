"""Phi-3 / Phi-4-mini: Llama's layout with packed qkv_proj and gate_up_proj (split here into Llama's
names) and a rotary embedding over part of each head (partial_rotary_factor: the tables are
narrower, and the attention rotates only their width)."""

from edge_slm.builder.decoder.architectures.base import Layout, mlp_activation, plain_layers

MODEL_TYPES = {"phi3": "Phi-3, Phi-4-mini"}
# onnxruntime-genai\'s model type for each (genai_config.json\'s model.type)
GENAI_MODEL_TYPES = {"phi3": "phi3"}


def layout(config) -> Layout:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim

    def weights(w):
        out = {}
        for name, value in w.items():
            if name.endswith("self_attn.qkv_proj.weight"):
                prefix = name[: -len("qkv_proj.weight")]
                out[prefix + "q_proj.weight"] = value[:q]
                out[prefix + "k_proj.weight"] = value[q : q + kv]
                out[prefix + "v_proj.weight"] = value[q + kv :]
            elif name.endswith("mlp.gate_up_proj.weight"):
                prefix = name[: -len("gate_up_proj.weight")]
                half = value.shape[0] // 2
                out[prefix + "gate_proj.weight"], out[prefix + "up_proj.weight"] = value[:half], value[half:]
            else:
                out[name] = value
        return out

    return Layout("phi3", plain_layers(config), weights=weights, activation=mlp_activation(config.hidden_act))
