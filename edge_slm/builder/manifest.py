"""What the manifest says about the built graph: its signature and operator counts, the oldest
onnxruntime that runs it (from the capability table), and the versions of the tools that made it."""

from __future__ import annotations

import platform
from pathlib import Path

from edge_slm import __version__
from edge_slm.core import capabilities
from edge_slm.core.targets import Profile

MODEL_FILE = "model.onnx"


def min_onnxruntime(onnx_path: Path) -> str:
    """The oldest onnxruntime known to run this graph (`edge_slm.core.capabilities`)."""
    import onnx

    features = set()
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    wide_scales = {t.name for t in graph.initializer if len(t.dims) > 1}
    for n in graph.node:
        if n.op_type == "GatherBlockQuantized":
            features.add("GatherBlockQuantized")
        elif n.op_type == "MatMulNBits" and any(a.name == "bits" and a.i == 8 for a in n.attribute):
            features.add("MatMulNBits.bits=8")
        elif n.op_type == "GroupQueryAttention" and len(n.input) > 9:
            features.add("GroupQueryAttention.position_ids")
        elif n.op_type == "BranchwiseRMSNorm":
            features.add("BranchwiseRMSNorm")
        elif n.op_type == "SimplifiedLayerNormalization" and n.input[1] in wide_scales:
            features.add("SimplifiedLayerNormalization.broadcast_scale")
    return capabilities.min_onnxruntime(features)


def graph_signature(onnx_path: Path, graph_kind: str, profile: Profile, prefill_file: str | None = None) -> dict:
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)

    def describe(values):
        return [
            {
                "name": v.name,
                "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
            }
            for v in values
        ]

    ops: dict[str, int] = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {
        "kind": graph_kind,
        "file": MODEL_FILE,
        "opset": {o.domain or "ai.onnx": o.version for o in proto.opset_import},
        "ir_version": proto.ir_version,
        "nodes": len(proto.graph.node),
        "op_counts": dict(sorted(ops.items())),
        # GroupQueryAttention can write present into the past buffer in place: the runtime binds
        # one preallocated buffer per layer for both and never copies the cache.
        "kv_cache": {"layout": "batch,kv_heads,sequence,head_dim", "shared_buffer": graph_kind == "fused"},
        "inputs": describe(proto.graph.input),
        "outputs": describe(proto.graph.output),
        # A second graph for prompts over the same weights ([quantize] prefill_accuracy_level).
        **({"prefill_file": prefill_file} if prefill_file else {}),
    }


def tool_versions() -> dict:
    import onnx
    import onnxruntime
    import torch
    import transformers

    return {
        "edge_slm": __version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
