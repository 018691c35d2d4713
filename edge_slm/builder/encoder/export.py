"""Export an encoder to ONNX with dynamic batch and sequence axes, then fuse it with onnxruntime's
transformers optimizer (EmbedLayerNormalization, Attention, BiasGelu, and SkipLayerNormalization
where the profile asks for it): a well-kept tool that already knows BERT layouts, so nothing here
rewrites nodes by hand.

  inputs   input_ids [B,S] int64, attention_mask [B,S] int64, (token_type_ids [B,S] int64 for BERT)
  output   logits [B, labels] (classifier: the head on the first token)
           sentence_embedding [B, D] (embedder: mean or CLS pooling over unpadded tokens, L2-normed
           when the model says so)
           span_logits [B, S, 2] (question-answering: each token's start and end logit, in that
           order; one output, so the device reads every task's graph the same way)

The pooling is part of the graph, so the device needs nothing but the session and the tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edge_slm.builder.encoder.source import EncoderSource
from edge_slm.core.errors import ExportError
from edge_slm.core.targets import Profile

MODEL_FILE = "model.onnx"
# Each task's graph output, the transformers class whose head it is, and its dynamic axes.
OUTPUTS = {"classification": "logits", "embedding": "sentence_embedding", "question-answering": "span_logits"}
AUTO_CLASSES = {
    "classification": "AutoModelForSequenceClassification",
    "embedding": "AutoModel",
    "question-answering": "AutoModelForQuestionAnswering",
}
OUTPUT_AXES = {"question-answering": {0: "batch", 1: "sequence"}}
FUSED_OPS = (
    "EmbedLayerNormalization",
    "Attention",
    "MultiHeadAttention",
    "SkipLayerNormalization",
    "BiasGelu",
    "FastGelu",
    "Gelu",
)


@dataclass(frozen=True)
class ExportedEncoder:
    onnx_path: Path
    inputs: tuple[str, ...]
    output: str
    fused: dict  # fused operator -> count
    node_count: int
    shape: dict  # the manifest's model section
    layer_norms: str  # "fused" (SkipLayerNormalization) or "unfused" (Add + LayerNormalization): the profile's choice


def load_torch_encoder(source: EncoderSource):
    """The torch module whose outputs the graph reproduces (eval mode, eager attention: the
    traced attention is what the optimizer recognises)."""
    import torch
    import transformers

    cls = getattr(transformers, AUTO_CLASSES[source.task])
    try:
        model = cls.from_pretrained(str(source.path), attn_implementation="eager", dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise ExportError(f"{source.path}: transformers cannot load it ({exc})") from None
    return EncoderHead(model, source).eval()


def input_names(source: EncoderSource) -> tuple[str, ...]:
    return ("input_ids", "attention_mask", *(("token_type_ids",) if source.model_type == "bert" else ()))


def EncoderHead(model, source: EncoderSource):  # noqa: N802 - a factory that reads like the class it makes
    import torch

    class _Head(torch.nn.Module):
        """The model plus what turns its hidden states into the bundle's one output."""

        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra)
            if source.task == "classification":
                return out.logits
            if source.task == "question-answering":
                return torch.stack([out.start_logits, out.end_logits], dim=-1)
            hidden = out.last_hidden_state
            if source.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1) if source.normalize else pooled

    return _Head()


def export_encoder(head, source: EncoderSource, tokenizer, profile: Profile, out_dir: Path, progress=lambda m: None):
    """Trace `head` to `out_dir/model.onnx` and fuse it; return what was written."""
    import onnx
    import torch
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    out_dir.mkdir(parents=True, exist_ok=True)
    names = input_names(source)
    output = OUTPUTS[source.task]
    sample = tokenizer(
        ["a short one", "a somewhat longer sample sentence for the trace"], padding=True, return_tensors="pt"
    )
    args = tuple(sample[name] for name in names)
    axes = {name: {0: "batch", 1: "sequence"} for name in names} | {output: OUTPUT_AXES.get(source.task, {0: "batch"})}
    traced = out_dir / "traced.onnx"
    try:
        with torch.no_grad():
            torch.onnx.export(
                head,
                args,
                str(traced),
                input_names=list(names),
                output_names=[output],
                dynamic_axes=axes,
                opset_version=profile.export.opset,
                dynamo=False,
            )
    except Exception as exc:  # the tracer's failures are many and varied; the message says which
        raise ExportError(f"torch.onnx.export failed for {source.architecture}: {exc}") from None
    head.eval()  # the exporter restores the mode the wrapper had: keep dropout off for validation
    config = head.model.config
    heads = attention_heads(config)
    fusions = FusionOptions("bert")
    # The profile decides (targets/*.toml [encoder] fuse_skip_layer_norm): unfused, the bias add
    # stays next to its MatMul, where onnxruntime folds it into the (quantized) MatMul at load.
    fusions.enable_skip_layer_norm = fusions.enable_bias_skip_layer_norm = profile.encoder.fuse_skip_layer_norm
    optimized = optimize_model(
        str(traced),
        model_type="bert",
        optimization_options=fusions,
        # A pruned model's attention is narrower than its hidden size (9 heads of 32 in 384): 0 lets
        # the optimizer read both from the graph's reshapes (given, it asserts they divide).
        num_heads=0 if heads < config.num_attention_heads else heads,
        hidden_size=0 if heads < config.num_attention_heads else config.hidden_size,
        opt_level=0,  # fusions only: onnxruntime's own graph optimizations run at load on the device
        use_gpu=False,
    )
    fused = {op: n for op, n in optimized.get_fused_operator_statistics().items() if op in FUSED_OPS and n}
    optimized.model.ir_version = min(optimized.model.ir_version, profile.export.ir_version)
    path = out_dir / MODEL_FILE
    optimized.save_model_to_file(str(path))  # adds the com.microsoft opset the fused nodes need
    proto = onnx.load(str(path))
    traced.unlink()
    progress(
        "fused: " + (", ".join(f"{n} {op}" for op, n in fused.items()) or "nothing (the layout was not recognised)")
    )
    shape = {
        "architecture": source.architecture,
        "model_type": source.model_type,
        "task": source.task,
        "num_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "num_heads": heads,
        "vocab_size": config.vocab_size,
        "max_sequence_length": min(profile.encoder.max_sequence_length, _usable_positions(source)),
        "output_dim": {"classification": len(source.labels), "question-answering": 2}.get(
            source.task, config.hidden_size
        ),
        "pooling": source.pooling,
        "normalize": source.normalize,
        **({"labels": list(source.labels)} if source.labels else {}),
        "parameters": sum(p.numel() for p in head.model.parameters()),
    }
    layer_norms = "fused" if profile.encoder.fuse_skip_layer_norm else "unfused"
    return ExportedEncoder(path, names, output, fused, len(proto.graph.node), shape, layer_norms)


def attention_heads(config) -> int:
    """Heads per layer: fewer than the config's count after `edge-slm prune` (transformers keeps the
    removed ones in `pruned_heads`; pruning removes the same number from every layer)."""
    pruned = getattr(config, "pruned_heads", None) or {}
    return config.num_attention_heads - max((len(h) for h in pruned.values()), default=0)


def _usable_positions(source: EncoderSource) -> int:
    # RoBERTa's positions start after the padding index: two of its table's rows are never used.
    return source.max_positions - (2 if source.model_type == "roberta" else 0)
