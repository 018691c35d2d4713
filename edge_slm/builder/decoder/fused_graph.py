"""The fused decoder graph, written node by node from a decoder's weights with onnxruntime's
contrib operators. One piece per part of a decoder layer; what differs between families (norm
placement, q/k norms, activation, scales, sliding windows) comes from the family's `Layout`
(`edge_slm.builder.decoder.architectures`), what differs between runtimes (the rotary embedding
inside GroupQueryAttention or beside it) from the caller. A weight the layout leaves unread makes
the build fall back to the generic graph rather than drop it.
`edge_slm.builder.decoder.export.export` calls `build_fused_graph`.
"""

from __future__ import annotations

import numpy as np

from edge_slm.builder.decoder.architectures.base import Layout
from edge_slm.core.capabilities import supports
from edge_slm.core.errors import ExportError
from edge_slm.core.targets import Profile

MS_DOMAIN = "com.microsoft"


class _GraphWriter:
    """Collects initializers and nodes in the order they are written, and which weights were read."""

    def __init__(self, weights: dict):
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.weights, self.initializers, self.nodes = weights, [], []
        self.used: set[str] = set()
        self._shapes: dict[str, tuple[int, ...]] = {}
        self.computed: dict[str, tuple[int, ...]] = {}  # graph-wide tensors made by nodes, and their shapes
        self.qk_norm = "reshape"  # how per-head q/k norms are written (qk_norm_form)

    def const(self, name: str, array: np.ndarray) -> str:
        if name not in self._shapes:  # constants shared by every layer are stored once
            self.initializers.append(self.numpy_helper.from_array(np.ascontiguousarray(array), name))
            self._shapes[name] = array.shape
        return name

    def initializer_shape(self, name: str) -> tuple[int, ...]:
        """The shape of a constant, or of a tensor computed once for the whole graph (`computed`)."""
        return self.computed[name] if name in self.computed else self._shapes[name]

    def weight(self, name: str, transpose: bool = False) -> str:
        if name not in self.weights:
            raise Unfusable(f"the checkpoint has no '{name}', which the fused layout reads")
        value = self.weights[name]
        self.used.add(name)
        return self.const(name, value.T if transpose else value)

    def node(self, op: str, inputs: list[str], outputs: list[str], domain: str = "", **attrs) -> list[str]:
        self.nodes.append(
            self.helper.make_node(op, inputs, outputs, name=outputs[0] + "/" + op, domain=domain, **attrs)
        )
        return outputs


def rotary_tables(rotary, length: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin caches [length, rotary_dim/2] from the model's own rotary module (so any rope
    scaling the config asks for, and a partial rotary width, are applied exactly as in torch)."""
    import torch

    positions = torch.arange(length, dtype=torch.int64)[None, :]
    probe = torch.zeros(1, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = rotary(probe, positions)
    half = cos.shape[-1] // 2
    return cos[0, :, :half].numpy().astype(np.float32), sin[0, :, :half].numpy().astype(np.float32)


ROTARY_MODULES = {"global": "rotary_emb", "local": "rotary_emb_local"}


def _rope_kind(config) -> str | None:
    scaling = getattr(config, "rope_scaling", None) or {}
    return scaling.get("rope_type", scaling.get("type"))


def _rope_switch(config) -> int:
    """The sequence length past which a longrope or dynamic rotary embedding changes frequencies."""
    return getattr(config, "original_max_position_embeddings", None) or config.max_position_embeddings


def longrope_switch(config, length: int) -> int | None:
    """Where a longrope model's bundle (Phi-3.5, Phi-4-mini) switches from the short-factor table to
    the long-factor one, or None when its context never passes the switch (one table) or the model
    has no longrope. transformers picks the long factor for a whole forward pass once the sequence
    is longer than original_max_position_embeddings, so the graph does the same with both tables."""
    switch = _rope_switch(config)
    return switch if _rope_kind(config) == "longrope" and length > switch else None


def check_rope_tables(config, length: int, fused: bool = True) -> None:
    """Refuse a context past the point where the model's rotary embedding changes its frequencies
    with every sequence length (dynamic NTK): no table holds that. Longrope's two tables fit the
    fused graph (`longrope_switch`), not optimum's trace."""
    kind = _rope_kind(config)
    limit = _rope_switch(config)
    if (kind == "dynamic" or (kind == "longrope" and not fused)) and length > limit:
        graph = "" if kind == "dynamic" else " in the generic graph"
        raise ExportError(
            f"rope_scaling '{kind}' changes the rotary frequencies past {limit} positions{graph} and [export] "
            f"context_length is {length}: set context_length to {limit} or less"
        )


def _rotary(g: _GraphWriter, model, kind: str, length: int) -> None:
    """The cos/sin tables `rotary.{kind}.cos/sin`: constants, or for a longrope model whose context
    passes the switch, the short-factor or long-factor table chosen by the total sequence length
    (a Where on each; rows past the switch of the short table are never read)."""
    rotary = getattr(model.model, ROTARY_MODULES[kind])
    switch = longrope_switch(model.config, length)
    if switch is None:
        cos, sin = rotary_tables(rotary, length)
        g.const(f"rotary.{kind}.cos", cos)
        g.const(f"rotary.{kind}.sin", sin)
        return
    short, long = rotary_tables(rotary, switch), rotary_tables(rotary, length)  # torch picks by length
    if "rotary.use_long" not in g.computed:
        limit = g.const("const.rope_switch", np.array(switch, dtype=np.int32))
        g.node("Greater", ["total_seq_len", limit], ["rotary.use_long"])
        g.computed["rotary.use_long"] = ()
    for i, part in enumerate(("cos", "sin")):
        padded = np.concatenate([short[i], long[i][switch:]], axis=0)
        inputs = ["rotary.use_long", g.const(f"rotary.{kind}.{part}_long", long[i])]
        inputs.append(g.const(f"rotary.{kind}.{part}_short", padded))
        g.node("Where", inputs, [f"rotary.{kind}.{part}"])
        g.computed[f"rotary.{kind}.{part}"] = long[i].shape


def qk_norm_form(oldest_onnxruntime: str | None) -> str:
    """How the per-head q/k norms are written for a device whose oldest onnxruntime is this one
    (`_qk_norm_per_head`). A profile that lists no runtime gets the form every one runs, as
    `rotary_inside_attention` does."""
    if oldest_onnxruntime is None:
        return "reshape"
    if supports("BranchwiseRMSNorm", oldest_onnxruntime):
        return "branchwise"
    return "broadcast" if supports("SimplifiedLayerNormalization.broadcast_scale", oldest_onnxruntime) else "reshape"


class Unfusable(Exception):
    """The fused graph cannot express this model (the export falls back to the generic graph)."""


def build_fused_graph(model, shape, profile: Profile, layout: Layout, rotary_in_attention: bool):
    """A decoder as onnxruntime contrib ops, built from the weights as `layout` describes them.
    With `rotary_in_attention` GroupQueryAttention applies the rotary embedding at the graph's
    position_ids; otherwise RotaryEmbedding nodes do, before it."""
    from onnx import helper

    g = _GraphWriter(layout.weights({k: v.detach().float().numpy() for k, v in model.state_dict().items()}))
    g.qk_norm = qk_norm_form(profile.runtime.oldest_onnxruntime)
    embed = g.weight("model.embed_tokens.weight")
    _sequence_lengths(g)
    for kind in sorted({layer.rotary for layer in layout.layers if layer.rotary}):
        _rotary(g, model, kind, profile.export.context_length)
    g.node("Gather", [embed, "input_ids"], ["embeddings"])
    pending = "embeddings"
    if layout.embedding_scale != 1.0:
        scale = g.const("const.embedding_scale", np.array(layout.embedding_scale, dtype=np.float32))
        pending = g.node("Mul", [pending, scale], ["embeddings_scaled"])[0]
    residual = None
    for i, layer in enumerate(layout.layers):
        pending, residual = _decoder_layer(g, i, layer, layout, shape, pending, residual, rotary_in_attention)
    g.const(LOGITS_TO_KEEP, np.array([0], dtype=np.int64))  # an input with a default: see _lm_head
    _lm_head(g, pending, residual, embed, shape, layout.logits_softcap)
    unused = sorted(set(g.weights) - g.used)
    if unused:
        raise Unfusable(f"the fused graph has no place for the weight '{unused[0]}'")
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


def _decoder_layer(g: _GraphWriter, i: int, layer, layout: Layout, shape, pending: str, residual, rotary_in_attention):
    """One decoder layer: attention, then the MLP, each between the norms `layout.norms` names.
    `pending` is the previous branch's output, not yet added to the `residual` stream; returns
    this layer's (pending, residual)."""

    def weight(norm: str | None) -> str | None:
        return norm and f"model.layers.{i}.{norm}.weight"

    eps, norms = shape.rms_norm_eps, layout.norms
    normed, residual = _merge(g, f"l{i}.attn", pending, residual, weight(norms.attn_pre), eps)
    out = _attention(g, i, normed, shape, layout, layer, rotary_in_attention)
    out = _post_norm(g, f"l{i}.attn", out, weight(norms.attn_post), eps)
    normed, residual = _merge(g, f"l{i}.mlp", out, residual, weight(norms.mlp_pre), eps)
    out = _mlp(g, i, normed, layout.activation)
    return _post_norm(g, f"l{i}.mlp", out, weight(norms.mlp_post), eps), residual


def _merge(g: _GraphWriter, tag: str, branch: str, residual: str | None, norm: str | None, eps: float):
    """Add a branch's output to the residual stream and normalize it for the next branch: one
    SkipSimplifiedLayerNormalization (a plain norm before the first layer). Without a pre-norm
    (OLMo 2) the next branch reads the sum itself. Returns (the next branch's input, the stream)."""
    if norm is None:
        total = branch if residual is None else g.node("Add", [branch, residual], [f"{tag}_residual"])[0]
        return total, total
    weight = g.weight(norm)
    if residual is None:
        normed = g.node(
            "SimplifiedLayerNormalization", [branch, weight], [f"{tag}_norm"], epsilon=eps, axis=-1, stash_type=1
        )[0]
        return normed, branch
    normed, _, _, total = g.node(
        "SkipSimplifiedLayerNormalization",
        [branch, residual, weight],
        [f"{tag}_norm", "", "", f"{tag}_residual"],
        domain=MS_DOMAIN,
        epsilon=eps,
    )
    return normed, total


def _post_norm(g: _GraphWriter, tag: str, out: str, norm: str | None, eps: float) -> str:
    """The norm on a branch's output before it joins the residual (Gemma 2/3, OLMo 2)."""
    if norm is None:
        return out
    weight = g.weight(norm)
    return g.node(
        "SimplifiedLayerNormalization", [out, weight], [f"{tag}_post_norm"], epsilon=eps, axis=-1, stash_type=1
    )[0]


def _qkv(g: _GraphWriter, i: int, normed: str) -> str:
    """One packed q/k/v projection; Qwen2's biases on q, k and v become one Add."""
    a, w = f"model.layers.{i}.self_attn.", g.weights
    for x in "qkv":
        if a + f"{x}_proj.weight" not in w:
            raise Unfusable(f"the checkpoint has no '{a}{x}_proj.weight', which the fused layout reads")
    w_qkv = np.concatenate([w[a + "q_proj.weight"], w[a + "k_proj.weight"], w[a + "v_proj.weight"]], axis=0).T
    g.used.update(a + f"{x}_proj.weight" for x in "qkv")
    qkv = g.node("MatMul", [normed, g.const(a + "qkv_proj.weight", w_qkv)], [f"l{i}.qkv"])[0]
    if a + "q_proj.bias" in w:
        b_qkv = np.concatenate([w[a + "q_proj.bias"], w[a + "k_proj.bias"], w[a + "v_proj.bias"]])
        g.used.update(a + f"{x}_proj.bias" for x in "qkv")
        qkv = g.node("Add", [qkv, g.const(a + "qkv_proj.bias", b_qkv)], [f"l{i}.qkv_bias"])[0]
    return qkv


def _qk_norm_full(g: _GraphWriter, i: int, x: str, which: str, shape) -> str:
    """RMSNorm of q or k over all heads at once (OLMo 2): one node on the projection as it is."""
    weight = g.weight(f"model.layers.{i}.self_attn.{which}_norm.weight")
    return g.node(
        "SimplifiedLayerNormalization",
        [x, weight],
        [f"l{i}.{which}_normed"],
        epsilon=shape.rms_norm_eps,
        axis=-1,
        stash_type=1,
    )[0]


def _qk_norm_per_head(g: _GraphWriter, i: int, qkv: str, shape) -> tuple[str, str, str]:
    """Per-head RMSNorm of q and k (Qwen3, Gemma 3), in the fewest nodes the device's oldest
    onnxruntime runs (`_GraphWriter.qk_norm`). Returns q, k, v.
    - "branchwise" (1.31): a Split, then one BranchwiseRMSNorm on each of q and k, which normalizes
      every head of a packed [B, S, heads * head_dim] tensor in place of a Reshape around a norm: 3 nodes;
    - "broadcast" (1.24): q and k kept together as [B, S, heads + kv_heads, head_dim] and normalized by
      one SimplifiedLayerNormalization whose [heads + kv_heads, head_dim] scale holds the q weight on
      the q rows and the k weight on the k rows (1.20 refuses a scale wider than the normalized axis):
      Split, Reshape, norm, Reshape, Split, 5 nodes;
    - "reshape": a Split, then Reshape, norm and Reshape for each of q and k, 7 nodes."""
    N, K, H = shape.num_heads, shape.num_kv_heads, shape.head_dim
    eps, a = shape.rms_norm_eps, f"model.layers.{i}.self_attn."
    if g.qk_norm == "broadcast":
        weights = [g.weights.get(a + f"{which}_norm.weight") for which in "qk"]
        if any(w is None for w in weights):
            g.weight(a + ("q" if weights[0] is None else "k") + "_norm.weight")  # raises Unfusable, naming it
        g.used.update(a + f"{which}_norm.weight" for which in "qk")
        scale = np.concatenate([np.broadcast_to(weights[0], (N, H)), np.broadcast_to(weights[1], (K, H))])
        split = g.const("const.qk_v_split", np.array([(N + K) * H, K * H], dtype=np.int64))
        qk, v = g.node("Split", [qkv, split], [f"l{i}.qk", f"l{i}.v"], axis=-1)
        qk = _reshape(g, qk, [0, 0, N + K, H], f"l{i}.qk_heads")
        qk = g.node(
            "SimplifiedLayerNormalization",
            [qk, g.const(a + "qk_norm.weight", scale.astype(np.float32))],
            [f"l{i}.qk_normed"],
            epsilon=eps,
            axis=-1,
            stash_type=1,
        )[0]
        qk = _reshape(g, qk, [0, 0, (N + K) * H], f"l{i}.qk_flat")
        q_k = g.const("const.q_k_split", np.array([N * H, K * H], dtype=np.int64))
        q, k = g.node("Split", [qk, q_k], [f"l{i}.q", f"l{i}.k"], axis=-1)
        return q, k, v
    split = g.const("const.qkv_split", np.array([N * H, K * H, K * H], dtype=np.int64))
    q, k, v = g.node("Split", [qkv, split], [f"l{i}.q", f"l{i}.k", f"l{i}.v"], axis=-1)
    normed = []
    for which, x, heads in (("q", q, N), ("k", k, K)):
        weight = g.weight(a + f"{which}_norm.weight")
        if g.qk_norm == "branchwise":
            normed.append(
                g.node(
                    "BranchwiseRMSNorm",
                    [x, weight],
                    [f"l{i}.{which}_normed"],
                    domain=MS_DOMAIN,
                    num_branches=heads,
                    epsilon=eps,
                )[0]
            )
            continue
        x = _reshape(g, x, [0, 0, heads, H], f"l{i}.{which}_heads")
        x = g.node(
            "SimplifiedLayerNormalization", [x, weight], [f"l{i}.{which}_normed"], epsilon=eps, axis=-1, stash_type=1
        )[0]
        normed.append(_reshape(g, x, [0, 0, heads * H], f"l{i}.{which}_flat"))
    return normed[0], normed[1], v


def _reshape(g: _GraphWriter, x: str, shape: list[int], out: str) -> str:
    target = g.const("const.shape_" + "_".join(map(str, shape)), np.array(shape, dtype=np.int64))
    return g.node("Reshape", [x, target], [out])[0]


def _attention(g: _GraphWriter, i: int, normed: str, shape, layout: Layout, layer, rotary_in_attention: bool) -> str:
    """GroupQueryAttention over the shared KV cache, then the output projection. The packed QKV
    goes straight in when nothing happens between the projection and the attention; otherwise a
    Split first, then the q/k norms and RotaryEmbedding nodes the layout and runtime ask for."""
    N, K, H = shape.num_heads, shape.num_kv_heads, shape.head_dim
    qkv = _qkv(g, i, normed)
    cache = [f"past_key_values.{i}.key", f"past_key_values.{i}.value", "seqlens_k", "total_seq_len"]
    outputs = [f"l{i}.attn", f"present.{i}.key", f"present.{i}.value"]
    attrs = {"domain": MS_DOMAIN, "num_heads": N, "kv_num_heads": K, "scale": layout.scale(H)}
    if layer.sliding_window:
        attrs["local_window_size"] = layer.sliding_window  # the same count as transformers' (tested)
    if layout.attention_softcap:
        attrs["softcap"] = layout.attention_softcap
    rotary = layer.rotary and [f"rotary.{layer.rotary}.cos", f"rotary.{layer.rotary}.sin"]
    if layout.qk_norm is None and (rotary_in_attention or not rotary):
        q, k, v = qkv, "", ""
    elif layout.qk_norm == "head":
        q, k, v = _qk_norm_per_head(g, i, qkv, shape)
    else:
        split = g.const("const.qkv_split", np.array([N * H, K * H, K * H], dtype=np.int64))
        q, k, v = g.node("Split", [qkv, split], [f"l{i}.q", f"l{i}.k", f"l{i}.v"], axis=-1)
        if layout.qk_norm == "full":
            q = _qk_norm_full(g, i, q, "q", shape)
            k = _qk_norm_full(g, i, k, "k", shape)
    if rotary and rotary_in_attention:
        inputs = [q, k, v, *cache, *rotary, "position_ids"]
        attn = g.node("GroupQueryAttention", inputs, outputs, **attrs, do_rotary=1, rotary_interleaved=0)[0]
    else:
        if rotary:
            # RotaryEmbedding's inputs are (x, position_ids, cos, sin); the width rotated is the table's.
            rot = {"domain": MS_DOMAIN, "interleaved": 0}
            width = g.initializer_shape(rotary[0])[1] * 2
            if width != H:
                rot["rotary_embedding_dim"] = width
            q = g.node("RotaryEmbedding", [q, "position_ids", *rotary], [f"l{i}.q_rot"], num_heads=N, **rot)[0]
            k = g.node("RotaryEmbedding", [k, "position_ids", *rotary], [f"l{i}.k_rot"], num_heads=K, **rot)[0]
        attn = g.node("GroupQueryAttention", [q, k, v, *cache], outputs, **attrs)[0]
    o_proj = g.weight(f"model.layers.{i}.self_attn.o_proj.weight", transpose=True)
    return g.node("MatMul", [attn, o_proj], [f"l{i}.attn_out"])[0]


def _mlp(g: _GraphWriter, i: int, normed: str, activation: str) -> str:
    """The gated MLP: act(gate) * up, then down. SiLU as Sigmoid and Mul; GELU-tanh as FastGelu,
    exact GELU as Gelu (both onnxruntime's)."""
    m = f"model.layers.{i}.mlp."
    gate = g.node("MatMul", [normed, g.weight(m + "gate_proj.weight", transpose=True)], [f"l{i}.gate"])[0]
    up = g.node("MatMul", [normed, g.weight(m + "up_proj.weight", transpose=True)], [f"l{i}.up"])[0]
    if activation == "silu":
        sig = g.node("Sigmoid", [gate], [f"l{i}.gate_sigmoid"])[0]
        act = g.node("Mul", [gate, sig], [f"l{i}.gate_silu"])[0]
    elif activation == "gelu_tanh":
        act = g.node("FastGelu", [gate], [f"l{i}.gate_gelu"], domain=MS_DOMAIN)[0]
    elif activation == "gelu":
        act = g.node("Gelu", [gate], [f"l{i}.gate_gelu"], domain=MS_DOMAIN)[0]
    else:
        raise Unfusable(f"the fused graph has no MLP activation '{activation}'")
    mixed = g.node("Mul", [act, up], [f"l{i}.gate_up"])[0]
    return g.node("MatMul", [mixed, g.weight(m + "down_proj.weight", transpose=True)], [f"l{i}.mlp_out"])[0]


LOGITS_TO_KEEP = "logits_to_keep"


def _lm_head(g: _GraphWriter, hidden: str, residual: str, embed: str, shape, softcap: float) -> None:
    """The final norm and the LM head: with tied embeddings one copy of the table serves the Gather
    and, transposed by Gemm, the head. The head reads only the last `logits_to_keep` positions (an
    input whose default, 0, keeps them all): generation asks for 1 and skips the vocabulary
    product for every other prompt token, scoring and other runtimes get every position. Gemma 2
    soft-caps the logits: softcap * tanh(logits / softcap)."""
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
    head = "logits_uncapped" if softcap else "logits"
    if shape.tied_embeddings:
        g.used.add("lm_head.weight")  # the embedding table itself
        flat = g.const("const.flat_shape", np.array([-1, shape.hidden_size], dtype=np.int64))
        vocab = g.const("const.vocab", np.array([shape.vocab_size], dtype=np.int64))
        g.node("Reshape", [normed, flat], ["final_norm_2d"])
        g.node("Gemm", ["final_norm_2d", embed], ["logits_2d"], transB=1)
        g.node("Shape", [normed], ["batch_seq"], start=0, end=2)
        g.node("Concat", ["batch_seq", vocab], ["logits_shape"], axis=0)
        g.node("Reshape", ["logits_2d", "logits_shape"], [head])
    else:
        g.node("MatMul", [normed, g.weight("lm_head.weight", transpose=True)], [head])
    if softcap:
        cap = g.const("const.logits_softcap", np.array(softcap, dtype=np.float32))
        g.node("Div", [head, cap], ["logits_over_cap"])
        g.node("Tanh", ["logits_over_cap"], ["logits_tanh"])
        g.node("Mul", ["logits_tanh", cap], ["logits"])


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
