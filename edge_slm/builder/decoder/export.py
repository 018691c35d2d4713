"""Export a Hugging Face causal LM to ONNX with a KV cache: a fused graph, or optimum's generic one.

The fused graph is written node by node from the weights, using onnxruntime's contrib operators
(GroupQueryAttention, RotaryEmbedding, SkipSimplifiedLayerNormalization): at one token per decode
step the cost is the graph's node count, not the Python loop (docs/export.md). The families it
knows are the modules of `edge_slm.builder.decoder.architectures`. The generic graph is optimum's
trace: what any other decoder optimum knows gets, and what `[export] graph = "generic"` asks for.
The build says in one line when it takes the generic graph. Both have the same signature:

  inputs   input_ids [B,S] int64, attention_mask [B,T] int64, position_ids [B,S] int64,
           past_key_values.{i}.key / .value [B, kv_heads, P, head_dim]
  outputs  logits [B,S,V], present.{i}.key / .value [B, kv_heads, T, head_dim]

where T = P + S. Run by `edge-slm build`; validated against torch by `edge_slm.builder.decoder.validate`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from edge_slm.builder.decoder.architectures import layout_for
from edge_slm.builder.decoder.fused_graph import Unfusable, build_fused_graph, check_rope_tables
from edge_slm.builder.decoder.load import check_architecture
from edge_slm.core.capabilities import supports
from edge_slm.core.errors import ExportError
from edge_slm.core.targets import Profile
from edge_slm.runtime.session import CacheShape

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"


def head_dim_of(config) -> int:
    """Attention head width: the config's own `head_dim` where it has one, else hidden / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


_EPS_NAMES = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon")


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
    context_length: int  # positions the graph's rotary tables (and so its KV cache) cover

    @classmethod
    def of(cls, model, context_length: int) -> ModelShape:
        config = model.config
        head_dim = head_dim_of(config)
        # Families outside Llama's naming (GPT-NeoX, ...) have no KV-head count (one per head)
        # and a LayerNorm epsilon under another name.
        eps = next((getattr(config, n) for n in _EPS_NAMES if getattr(config, n, None) is not None), 1e-5)
        return cls(
            architecture=config.model_type,
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=head_dim,
            intermediate_size=getattr(config, "intermediate_size", None) or 4 * config.hidden_size,
            vocab_size=config.vocab_size,
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            rms_norm_eps=float(eps),
            parameters=sum(p.numel() for p in model.parameters()),
            context_length=context_length,
        )

    @property
    def cache(self) -> CacheShape:
        """What a session over this graph needs to know."""
        return CacheShape.of(dataclasses.asdict(self))


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
    """Write `out_dir/model.onnx` (+ external data) for `profile` and return what was written:
    the fused graph where the model's family has a layout and its shapes fit the operators,
    optimum's generic graph otherwise (said in one progress line)."""
    config = model.config
    check_architecture(config.model_type, "export", config.to_dict())
    check_rope_tables(config, profile.export.context_length, fused=profile.export.graph == "fused")
    out_dir.mkdir(parents=True, exist_ok=True)
    shape = ModelShape.of(model, profile.export.context_length)
    proto, why_not = _fused(model, shape, profile, progress) if profile.export.graph == "fused" else (None, None)
    if proto is not None:
        progress(f"writing the fused graph ({shape.num_layers} layers)")
        _save(proto, out_dir, profile.export.external_data)
    else:
        progress(
            f"{why_not}: tracing optimum's generic graph instead"
            if why_not
            else "tracing the generic graph with optimum"
        )
        check_rope_tables(config, profile.export.context_length, fused=False)
        _export_generic(model, profile, out_dir)
    import onnx

    graph = onnx.load(str(out_dir / MODEL_FILE), load_external_data=False).graph
    kind = "fused" if proto is not None else "generic"
    if kind == "generic":
        # The cache as optimum's trace lays it out (its KV heads, whatever names the config uses).
        past = next(i for i in graph.input if i.name == "past_key_values.0.key").type.tensor_type.shape.dim
        heads, width = past[1].dim_value or shape.num_kv_heads, past[3].dim_value or shape.head_dim
        shape = dataclasses.replace(shape, num_kv_heads=heads, head_dim=width)
    return ExportedModel(out_dir / MODEL_FILE, shape, kind, len(graph.node))


def _fused(model, shape: ModelShape, profile: Profile, progress):
    """The fused graph's proto, or None and why the model needs the generic graph."""
    layout = layout_for(model.config)
    if layout is None:
        return None, f"'{shape.architecture}' has no fused layout"
    rotary_in_attention = rotary_inside_attention(model.config, shape, profile, progress)
    try:
        return build_fused_graph(model, shape, profile, layout, rotary_in_attention), None
    except Unfusable as exc:
        return None, str(exc)


def rotary_inside_attention(config, shape: ModelShape, profile: Profile, progress=lambda msg: None) -> bool:
    """Whether GroupQueryAttention applies the rotary embedding itself: it takes position_ids from
    onnxruntime 1.24 on (a profile that lists an older runtime gets RotaryEmbedding nodes), and
    only for heads whose size is a multiple of 16 and a rotated width (partial_rotary_factor) that
    is one too: onnxruntime refuses other shapes when it runs, so RotaryEmbedding nodes take them."""
    oldest = profile.runtime.oldest_onnxruntime
    if oldest is None or not supports("GroupQueryAttention.position_ids", oldest):
        return False
    rotated = int(shape.head_dim * getattr(config, "partial_rotary_factor", 1.0))
    if shape.head_dim % 16 or rotated % 16:
        what = f"head size {shape.head_dim}" if rotated == shape.head_dim else f"rotary width {rotated}"
        progress(
            f"{what} is not a multiple of 16, which GroupQueryAttention's own rotary embedding needs: "
            "RotaryEmbedding nodes instead"
        )
        return False
    return True


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
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ExportError(f"optimum could not export the model: {first}") from None
        proto = onnx.load(str(traced / "model.onnx"))
        _check_generic_signature(proto, model.config)
        proto.ir_version = min(proto.ir_version, profile.export.ir_version)
        _save(proto, out_dir, profile.export.external_data)


def _check_generic_signature(proto, config) -> None:
    """The runtime feeds input_ids, attention_mask, position_ids (where the graph takes them) and a
    key and a value cache per layer [batch, kv_heads, sequence, head_dim]; optimum lays some
    families out otherwise (one fused key/value tensor), which edge-slm cannot run."""
    layers = config.num_hidden_layers
    got = {i.name: i for i in proto.graph.input}
    want = {"input_ids", "attention_mask"} | ({"position_ids"} & set(got))
    want |= {f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")}
    past = got.get("past_key_values.0.key")
    if set(got) != want or len(past.type.tensor_type.shape.dim) != 4:
        odd = sorted(set(got) ^ want)[:3] or ["past_key_values.0.key"]
        raise ExportError(
            f"optimum's graph for '{config.model_type}' has another signature than edge-slm runs "
            f"({', '.join(odd)}): this architecture is not supported"
        )
