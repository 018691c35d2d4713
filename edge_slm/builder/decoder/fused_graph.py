"""The fused decoder graph, written node by node from a Llama-family model's weights with
onnxruntime's contrib operators. One piece per part of a decoder layer; what differs between
architectures (Qwen2's q/k/v biases, tied or separate LM head, the rotary embedding inside
GroupQueryAttention or beside it for older onnxruntime) is decided inside the piece it concerns.
`edge_slm.builder.decoder.export.export` calls `build_fused_graph`.
"""

from __future__ import annotations

import math

import numpy as np

from edge_slm.core.capabilities import supports
from edge_slm.core.targets import Profile

MS_DOMAIN = "com.microsoft"


class _GraphWriter:
    """Collects initializers and nodes in the order they are written."""

    def __init__(self, weights: dict):
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.weights, self.initializers, self.nodes = weights, [], []

    def const(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(self.numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def weight(self, name: str, transpose: bool = False) -> str:
        value = self.weights[name]
        return self.const(name, value.T if transpose else value)

    def node(self, op: str, inputs: list[str], outputs: list[str], domain: str = "", **attrs) -> list[str]:
        self.nodes.append(
            self.helper.make_node(op, inputs, outputs, name=outputs[0] + "/" + op, domain=domain, **attrs)
        )
        return outputs


def rotary_tables(model, length: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin caches [length, head_dim/2] from the model's own rotary module (so any rope
    scaling the config asks for is applied exactly as in torch)."""
    import torch

    rotary = model.model.rotary_emb
    positions = torch.arange(length, dtype=torch.int64)[None, :]
    probe = torch.zeros(1, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = rotary(probe, positions)
    half = cos.shape[-1] // 2
    return cos[0, :, :half].numpy().astype(np.float32), sin[0, :, :half].numpy().astype(np.float32)


def build_fused_graph(model, shape, profile: Profile):
    """A Llama-family decoder as onnxruntime contrib ops, built from the weights."""
    from onnx import helper

    g = _GraphWriter({k: v.detach().float().numpy() for k, v in model.state_dict().items()})
    cos, sin = rotary_tables(model, profile.export.context_length)
    g.const("rotary.cos", cos)
    g.const("rotary.sin", sin)
    embed = g.weight("model.embed_tokens.weight")
    _sequence_lengths(g)
    g.node("Gather", [embed, "input_ids"], ["embeddings"])
    # GroupQueryAttention takes position_ids (and so applies the rotary embedding itself) from
    # onnxruntime 1.24 on; a profile that lists an older runtime gets RotaryEmbedding nodes.
    oldest = profile.runtime.oldest_onnxruntime
    rotary_in_attention = oldest is not None and supports("GroupQueryAttention.position_ids", oldest)
    qkv_split = None
    if not rotary_in_attention:
        N, K, H = shape.num_heads, shape.num_kv_heads, shape.head_dim
        qkv_split = g.const("const.qkv_split", np.array([N * H, K * H, K * H], dtype=np.int64))
    hidden, residual = "embeddings", None
    for i in range(shape.num_layers):
        normed, residual = _norm(g, i, hidden, residual, shape.rms_norm_eps)
        attn = _attention(g, i, normed, shape, qkv_split)
        hidden, residual = _mlp(g, i, attn, residual, shape.rms_norm_eps)
    g.const(LOGITS_TO_KEEP, np.array([0], dtype=np.int64))  # an input with a default: see _lm_head
    _lm_head(g, hidden, residual, embed, shape)
    inputs, outputs = _signature(shape)
    graph = helper.make_graph(g.nodes, f"edge-slm-{shape.architecture}", inputs, outputs, g.initializers)
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", profile.export.opset), helper.make_opsetid(MS_DOMAIN, 1)],
        producer_name="edge-slm",
    )
    proto.ir_version = profile.export.ir_version
    return proto


def _sequence_lengths(g: _GraphWriter) -> None:
    """Sequence bookkeeping shared by every layer: GroupQueryAttention wants, per batch row, the
    index of the last valid key (seqlens_k) and the total length of the key sequence."""
    from onnx import TensorProto

    one = g.const("const.one", np.array(1, dtype=np.int64))
    axis1 = g.const("const.axis1", np.array([1], dtype=np.int64))
    g.node("ReduceSum", ["attention_mask", axis1], ["mask_len"], keepdims=0)
    g.node("Sub", ["mask_len", one], ["seqlens_k_64"])
    g.node("Cast", ["seqlens_k_64"], ["seqlens_k"], to=TensorProto.INT32)
    g.node("Shape", ["attention_mask"], ["mask_shape"])
    g.node("Gather", ["mask_shape", one], ["total_len_64"], axis=0)
    g.node("Cast", ["total_len_64"], ["total_seq_len"], to=TensorProto.INT32)


def _norm(g: _GraphWriter, i: int, hidden: str, residual: str | None, eps: float) -> tuple[str, str]:
    """The input norm of layer i; from the second layer on it also adds the residual."""
    ln_in = g.weight(f"model.layers.{i}.input_layernorm.weight")
    if residual is None:
        normed = g.node(
            "SimplifiedLayerNormalization", [hidden, ln_in], [f"l{i}.attn_norm"], epsilon=eps, axis=-1, stash_type=1
        )[0]
        return normed, hidden
    normed, _, _, residual = g.node(
        "SkipSimplifiedLayerNormalization",
        [hidden, residual, ln_in],
        [f"l{i}.attn_norm", "", "", f"l{i}.residual_attn"],
        domain=MS_DOMAIN,
        epsilon=eps,
    )
    return normed, residual


def _qkv(g: _GraphWriter, i: int, normed: str) -> str:
    """One packed q/k/v projection; Qwen2's biases on q, k and v become one Add."""
    a, w = f"model.layers.{i}.self_attn.", g.weights
    w_qkv = np.concatenate([w[a + "q_proj.weight"], w[a + "k_proj.weight"], w[a + "v_proj.weight"]], axis=0).T
    qkv = g.node("MatMul", [normed, g.const(a + "qkv_proj.weight", w_qkv)], [f"l{i}.qkv"])[0]
    if a + "q_proj.bias" in w:
        b_qkv = np.concatenate([w[a + "q_proj.bias"], w[a + "k_proj.bias"], w[a + "v_proj.bias"]])
        qkv = g.node("Add", [qkv, g.const(a + "qkv_proj.bias", b_qkv)], [f"l{i}.qkv_bias"])[0]
    return qkv


def _attention(g: _GraphWriter, i: int, normed: str, shape, qkv_split: str | None) -> str:
    """GroupQueryAttention over the shared KV cache, then the output projection. With `qkv_split`
    None the packed QKV goes straight in and the operator applies the rotary embedding at the
    graph's position_ids; otherwise Split and two RotaryEmbedding nodes come first."""
    N, K, H = shape.num_heads, shape.num_kv_heads, shape.head_dim
    qkv = _qkv(g, i, normed)
    cache = [f"past_key_values.{i}.key", f"past_key_values.{i}.value", "seqlens_k", "total_seq_len"]
    outputs = [f"l{i}.attn", f"present.{i}.key", f"present.{i}.value"]
    common = {"domain": MS_DOMAIN, "num_heads": N, "kv_num_heads": K, "scale": 1.0 / math.sqrt(H)}
    if qkv_split is None:
        inputs = [qkv, "", "", *cache, "rotary.cos", "rotary.sin", "position_ids"]
        attn = g.node("GroupQueryAttention", inputs, outputs, **common, do_rotary=1, rotary_interleaved=0)[0]
    else:
        q, k, v = g.node("Split", [qkv, qkv_split], [f"l{i}.q", f"l{i}.k", f"l{i}.v"], axis=-1)
        rotary = ["position_ids", "rotary.cos", "rotary.sin"]
        q = g.node("RotaryEmbedding", [q, *rotary], [f"l{i}.q_rot"], domain=MS_DOMAIN, num_heads=N, interleaved=0)[0]
        k = g.node("RotaryEmbedding", [k, *rotary], [f"l{i}.k_rot"], domain=MS_DOMAIN, num_heads=K, interleaved=0)[0]
        attn = g.node("GroupQueryAttention", [q, k, v, *cache], outputs, **common)[0]
    o_proj = g.weight(f"model.layers.{i}.self_attn.o_proj.weight", transpose=True)
    return g.node("MatMul", [attn, o_proj], [f"l{i}.attn_out"])[0]


def _mlp(g: _GraphWriter, i: int, attn_out: str, residual: str, eps: float) -> tuple[str, str]:
    """Post-attention norm (adding the residual), then the SiLU-gated MLP."""
    p, m = f"model.layers.{i}.", f"model.layers.{i}.mlp."
    ln_post = g.weight(p + "post_attention_layernorm.weight")
    normed, _, _, residual = g.node(
        "SkipSimplifiedLayerNormalization",
        [attn_out, residual, ln_post],
        [f"l{i}.mlp_norm", "", "", f"l{i}.residual_mlp"],
        domain=MS_DOMAIN,
        epsilon=eps,
    )
    gate = g.node("MatMul", [normed, g.weight(m + "gate_proj.weight", transpose=True)], [f"l{i}.gate"])[0]
    up = g.node("MatMul", [normed, g.weight(m + "up_proj.weight", transpose=True)], [f"l{i}.up"])[0]
    sig = g.node("Sigmoid", [gate], [f"l{i}.gate_sigmoid"])[0]
    act = g.node("Mul", [gate, sig], [f"l{i}.gate_silu"])[0]
    mixed = g.node("Mul", [act, up], [f"l{i}.gate_up"])[0]
    hidden = g.node("MatMul", [mixed, g.weight(m + "down_proj.weight", transpose=True)], [f"l{i}.mlp_out"])[0]
    return hidden, residual


LOGITS_TO_KEEP = "logits_to_keep"


def _lm_head(g: _GraphWriter, hidden: str, residual: str, embed: str, shape) -> None:
    """The final norm and the LM head: with tied embeddings one copy of the table serves the Gather
    and, transposed by Gemm, the head. The head reads only the last `logits_to_keep` positions (an
    input whose default, 0, keeps them all): generation asks for 1 and skips the vocabulary
    product for every other prompt token, scoring and other runtimes get every position."""
    final_norm = g.weight("model.norm.weight")
    g.node(
        "SkipSimplifiedLayerNormalization",
        [hidden, residual, final_norm],
        ["final_norm"],
        domain=MS_DOMAIN,
        epsilon=shape.rms_norm_eps,
    )
    g.node("Neg", [LOGITS_TO_KEEP], ["logits_start"])
    end = g.const("const.int64_max", np.array([np.iinfo(np.int64).max], dtype=np.int64))
    axis1 = g.const("const.sequence_axis", np.array([1], dtype=np.int64))
    normed = g.node("Slice", ["final_norm", "logits_start", end, axis1], ["final_norm_kept"])[0]
    if shape.tied_embeddings:
        flat = g.const("const.flat_shape", np.array([-1, shape.hidden_size], dtype=np.int64))
        vocab = g.const("const.vocab", np.array([shape.vocab_size], dtype=np.int64))
        g.node("Reshape", [normed, flat], ["final_norm_2d"])
        g.node("Gemm", ["final_norm_2d", embed], ["logits_2d"], transB=1)
        g.node("Shape", [normed], ["batch_seq"], start=0, end=2)
        g.node("Concat", ["batch_seq", vocab], ["logits_shape"], axis=0)
        g.node("Reshape", ["logits_2d", "logits_shape"], ["logits"])
    else:
        g.node("MatMul", [normed, g.weight("lm_head.weight", transpose=True)], ["logits"])


def _signature(shape) -> tuple[list, list]:
    from onnx import TensorProto, helper

    f32, i64, K, H = TensorProto.FLOAT, TensorProto.INT64, shape.num_kv_heads, shape.head_dim
    inputs = [
        helper.make_tensor_value_info("input_ids", i64, ["batch", "sequence"]),
        helper.make_tensor_value_info("attention_mask", i64, ["batch", "total_sequence"]),
        helper.make_tensor_value_info("position_ids", i64, ["batch", "sequence"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch", "kept_sequence", shape.vocab_size])]
    for i in range(shape.num_layers):
        for kind in ("key", "value"):
            inputs.append(
                helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", f32, ["batch", K, "past_sequence", H])
            )
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", f32, ["batch", K, "total_sequence", H]))
    inputs.append(helper.make_tensor_value_info(LOGITS_TO_KEEP, i64, [1]))  # last: it has a default
    return inputs, outputs
