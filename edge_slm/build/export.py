"""Export a Hugging Face causal LM to ONNX with a KV cache: a fused graph, or optimum's generic one.

The fused graph is written node by node from the weights, using onnxruntime's contrib operators
(GroupQueryAttention, RotaryEmbedding, SkipSimplifiedLayerNormalization): at one token per decode
step the cost is the graph's node count, not the Python loop (docs/export.md). The generic graph is
optimum's trace, kept as a fallback (`[export] graph = "generic"`). Both have the same signature:

  inputs   input_ids [B,S] int64, attention_mask [B,T] int64, position_ids [B,S] int64,
           past_key_values.{i}.key / .value [B, kv_heads, P, head_dim]
  outputs  logits [B,S,V], present.{i}.key / .value [B, kv_heads, T, head_dim]

where T = P + S. Run by `edge-slm build`; validated against torch by `edge_slm.build.validate`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_slm.build.load import check_architecture
from edge_slm.core.capabilities import supports
from edge_slm.core.errors import ExportError
from edge_slm.core.targets import Profile

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class ModelShape:
    architecture: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tied_embeddings: bool
    rms_norm_eps: float
    parameters: int

    @classmethod
    def of(cls, model) -> ModelShape:
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            architecture=config.model_type,
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=head_dim,
            intermediate_size=config.intermediate_size,
            vocab_size=config.vocab_size,
            tied_embeddings=bool(config.tie_word_embeddings),
            rms_norm_eps=float(config.rms_norm_eps),
            parameters=sum(p.numel() for p in model.parameters()),
        )


@dataclass(frozen=True)
class ExportedModel:
    onnx_path: Path
    shape: ModelShape
    graph: str  # "fused" or "generic"
    node_count: int


def load_torch_model(model_dir: Path):
    """The fp32 reference model in eval mode (also used by validation)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32", attn_implementation="eager")
    return model.eval()


def export(model, profile: Profile, out_dir: Path, progress=lambda msg: None) -> ExportedModel:
    """Write `out_dir/model.onnx` (+ external data) for `profile` and return what was written."""
    check_architecture(model.config.model_type, "export")
    out_dir.mkdir(parents=True, exist_ok=True)
    shape = ModelShape.of(model)
    if profile.export.graph == "fused":
        progress(f"writing the fused graph ({shape.num_layers} layers)")
        proto = build_fused_graph(model, shape, profile)
        _save(proto, out_dir, profile.export.external_data)
    else:
        progress("tracing the generic graph with optimum")
        _export_generic(model, profile, out_dir)
    import onnx

    graph = onnx.load(str(out_dir / MODEL_FILE), load_external_data=False).graph
    return ExportedModel(out_dir / MODEL_FILE, shape, profile.export.graph, len(graph.node))


def save_with_external_data(proto, out_dir: Path) -> None:
    """`model.onnx` with every tensor over 1 kB in one `model.onnx.data` beside it: the layout
    every bundle has, whichever stage wrote the graph."""
    import onnx

    onnx.save_model(
        proto,
        str(out_dir / MODEL_FILE),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=DATA_FILE,
        size_threshold=1024,
    )


def _save(proto, out_dir: Path, external_data: bool) -> None:
    import onnx

    if external_data:
        save_with_external_data(proto, out_dir)
    else:
        onnx.save_model(proto, str(out_dir / MODEL_FILE))


def rotary_tables(model, length: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin caches [length, rotary_dim/2], straight from the model's own rotary module so that
    every rope variant (theta, llama3 / linear / dynamic scaling) comes out as torch computes it."""
    import torch

    rotary = model.model.rotary_emb
    positions = torch.arange(length, dtype=torch.int64)[None, :]
    probe = torch.zeros(1, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = rotary(probe, positions)
    half = cos.shape[-1] // 2
    return cos[0, :, :half].numpy().astype(np.float32), sin[0, :, :half].numpy().astype(np.float32)


def build_fused_graph(model, shape: ModelShape, profile: Profile):
    """A Llama-family decoder as onnxruntime contrib ops, built from the weights."""
    from onnx import TensorProto, helper, numpy_helper

    weights = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    initializers: list = []
    nodes: list = []

    def const(name: str, array: np.ndarray) -> str:
        initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(op: str, inputs: list[str], outputs: list[str], domain: str = "", **attrs) -> list[str]:
        nodes.append(helper.make_node(op, inputs, outputs, name=outputs[0] + "/" + op, domain=domain, **attrs))
        return outputs

    N, K, H = shape.num_heads, shape.num_kv_heads, shape.head_dim
    D, eps = shape.hidden_size, shape.rms_norm_eps
    cos, sin = rotary_tables(model, profile.export.context_length)
    const("rotary.cos", cos)
    const("rotary.sin", sin)
    embed = const("model.embed_tokens.weight", weights["model.embed_tokens.weight"])

    # Sequence bookkeeping shared by every layer: GroupQueryAttention wants, per batch row, the
    # index of the last valid key (seqlens_k) and the total length of the key sequence.
    one = const("const.one", np.array(1, dtype=np.int64))
    axis1 = const("const.axis1", np.array([1], dtype=np.int64))
    node("ReduceSum", ["attention_mask", axis1], ["mask_len"], keepdims=0)
    node("Sub", ["mask_len", one], ["seqlens_k_64"])
    node("Cast", ["seqlens_k_64"], ["seqlens_k"], to=TensorProto.INT32)
    node("Shape", ["attention_mask"], ["mask_shape"])
    node("Gather", ["mask_shape", one], ["total_len_64"], axis=0)
    node("Cast", ["total_len_64"], ["total_seq_len"], to=TensorProto.INT32)

    node("Gather", [embed, "input_ids"], ["embeddings"])
    # GroupQueryAttention takes position_ids (and so can apply the rotary embedding itself) from
    # onnxruntime 1.24 on (1.20.1 accepts 9 inputs at most; 1.24.1 ran it under emulation).
    oldest = profile.runtime.oldest_onnxruntime
    rotary_in_attention = oldest is not None and supports("GroupQueryAttention.position_ids", oldest)
    qkv_split = (
        None if rotary_in_attention else const("const.qkv_split", np.array([N * H, K * H, K * H], dtype=np.int64))
    )
    hidden, residual = "embeddings", None
    for i in range(shape.num_layers):
        p = f"model.layers.{i}."
        ln_in = const(p + "input_layernorm.weight", weights[p + "input_layernorm.weight"])
        if residual is None:
            normed = node(
                "SimplifiedLayerNormalization", [hidden, ln_in], [f"l{i}.attn_norm"], epsilon=eps, axis=-1, stash_type=1
            )[0]
            residual = hidden
        else:
            normed, _, _, residual = node(
                "SkipSimplifiedLayerNormalization",
                [hidden, residual, ln_in],
                [f"l{i}.attn_norm", "", "", f"l{i}.residual_attn"],
                domain=MS_DOMAIN,
                epsilon=eps,
            )

        a = p + "self_attn."
        w_qkv = np.concatenate(
            [weights[a + "q_proj.weight"], weights[a + "k_proj.weight"], weights[a + "v_proj.weight"]], axis=0
        ).T
        qkv = node("MatMul", [normed, const(a + "qkv_proj.weight", w_qkv)], [f"l{i}.qkv"])[0]
        if a + "q_proj.bias" in weights:  # Qwen2 has biases on q, k and v
            b_qkv = np.concatenate([weights[a + "q_proj.bias"], weights[a + "k_proj.bias"], weights[a + "v_proj.bias"]])
            qkv = node("Add", [qkv, const(a + "qkv_proj.bias", b_qkv)], [f"l{i}.qkv_bias"])[0]
        if rotary_in_attention:
            # Packed QKV straight into GroupQueryAttention, which applies the rotary embedding
            # itself at the graph's position_ids: two RotaryEmbedding and a Split fewer a layer.
            attn = node(
                "GroupQueryAttention",
                [
                    qkv,
                    "",
                    "",
                    f"past_key_values.{i}.key",
                    f"past_key_values.{i}.value",
                    "seqlens_k",
                    "total_seq_len",
                    "rotary.cos",
                    "rotary.sin",
                    "position_ids",
                ],
                [f"l{i}.attn", f"present.{i}.key", f"present.{i}.value"],
                domain=MS_DOMAIN,
                num_heads=N,
                kv_num_heads=K,
                scale=1.0 / math.sqrt(H),
                do_rotary=1,
                rotary_interleaved=0,
            )[0]
        else:
            q, k, v = node("Split", [qkv, qkv_split], [f"l{i}.q", f"l{i}.k", f"l{i}.v"], axis=-1)
            q = node(
                "RotaryEmbedding",
                [q, "position_ids", "rotary.cos", "rotary.sin"],
                [f"l{i}.q_rot"],
                domain=MS_DOMAIN,
                num_heads=N,
                interleaved=0,
            )[0]
            k = node(
                "RotaryEmbedding",
                [k, "position_ids", "rotary.cos", "rotary.sin"],
                [f"l{i}.k_rot"],
                domain=MS_DOMAIN,
                num_heads=K,
                interleaved=0,
            )[0]
            attn = node(
                "GroupQueryAttention",
                [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", "seqlens_k", "total_seq_len"],
                [f"l{i}.attn", f"present.{i}.key", f"present.{i}.value"],
                domain=MS_DOMAIN,
                num_heads=N,
                kv_num_heads=K,
                scale=1.0 / math.sqrt(H),
            )[0]
        o = node("MatMul", [attn, const(a + "o_proj.weight", weights[a + "o_proj.weight"].T)], [f"l{i}.attn_out"])[0]

        ln_post = const(p + "post_attention_layernorm.weight", weights[p + "post_attention_layernorm.weight"])
        normed, _, _, residual = node(
            "SkipSimplifiedLayerNormalization",
            [o, residual, ln_post],
            [f"l{i}.mlp_norm", "", "", f"l{i}.residual_mlp"],
            domain=MS_DOMAIN,
            epsilon=eps,
        )
        m = p + "mlp."
        gate = node(
            "MatMul", [normed, const(m + "gate_proj.weight", weights[m + "gate_proj.weight"].T)], [f"l{i}.gate"]
        )[0]
        up = node("MatMul", [normed, const(m + "up_proj.weight", weights[m + "up_proj.weight"].T)], [f"l{i}.up"])[0]
        sig = node("Sigmoid", [gate], [f"l{i}.gate_sigmoid"])[0]
        act = node("Mul", [gate, sig], [f"l{i}.gate_silu"])[0]
        mixed = node("Mul", [act, up], [f"l{i}.gate_up"])[0]
        hidden = node(
            "MatMul", [mixed, const(m + "down_proj.weight", weights[m + "down_proj.weight"].T)], [f"l{i}.mlp_out"]
        )[0]

    final_norm = const("model.norm.weight", weights["model.norm.weight"])
    normed = node(
        "SkipSimplifiedLayerNormalization",
        [hidden, residual, final_norm],
        ["final_norm"],
        domain=MS_DOMAIN,
        epsilon=eps,
    )[0]
    if shape.tied_embeddings:
        # One copy of the tied table serves the Gather above and, transposed by Gemm, the LM head.
        flat = const("const.flat_shape", np.array([-1, D], dtype=np.int64))
        vocab = const("const.vocab", np.array([shape.vocab_size], dtype=np.int64))
        node("Reshape", [normed, flat], ["final_norm_2d"])
        node("Gemm", ["final_norm_2d", embed], ["logits_2d"], transB=1)
        node("Shape", ["input_ids"], ["batch_seq"])
        node("Concat", ["batch_seq", vocab], ["logits_shape"], axis=0)
        node("Reshape", ["logits_2d", "logits_shape"], ["logits"])
    else:
        node("MatMul", [normed, const("lm_head.weight", weights["lm_head.weight"].T)], ["logits"])

    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [
        helper.make_tensor_value_info("input_ids", i64, ["batch", "sequence"]),
        helper.make_tensor_value_info("attention_mask", i64, ["batch", "total_sequence"]),
        helper.make_tensor_value_info("position_ids", i64, ["batch", "sequence"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch", "sequence", shape.vocab_size])]
    for i in range(shape.num_layers):
        for kind in ("key", "value"):
            inputs.append(
                helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", f32, ["batch", K, "past_sequence", H])
            )
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", f32, ["batch", K, "total_sequence", H]))

    graph = helper.make_graph(nodes, f"edge-slm-{shape.architecture}", inputs, outputs, initializers)
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", profile.export.opset), helper.make_opsetid(MS_DOMAIN, 1)],
        producer_name="edge-slm",
    )
    proto.ir_version = profile.export.ir_version
    return proto


def _export_generic(model, profile: Profile, out_dir: Path) -> None:
    import tempfile

    import onnx
    from optimum.exporters.onnx import main_export

    with tempfile.TemporaryDirectory(dir=out_dir) as staging:
        model.save_pretrained(staging)
        traced = Path(staging) / "onnx"
        try:
            main_export(
                staging,
                output=traced,
                task="text-generation-with-past",
                opset=profile.export.opset,
                do_validation=False,
                no_post_process=True,
                device="cpu",
                library_name="transformers",
            )
        except Exception as exc:
            raise ExportError(f"optimum could not export the model: {exc}") from None
        proto = onnx.load(str(traced / "model.onnx"))
        proto.ir_version = min(proto.ir_version, profile.export.ir_version)
        _save(proto, out_dir, profile.export.external_data)
