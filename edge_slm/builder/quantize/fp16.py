"""fp16 weights and activations for GPU targets (Jetson's CUDA provider): ONNX in, ONNX out.

Every float initializer becomes float16, and so do the KV-cache inputs and outputs: on the GPU
that halves the memory traffic of each decode step and runs the matrix products on the tensor
cores. The logits stay float32 (one Cast at the end), so sampling and the accuracy gate read the
same type from every bundle. Norms accumulate in float32 inside the kernels (stash_type 1).
Only the fused graph is converted: its operators (GroupQueryAttention, RotaryEmbedding,
SkipSimplifiedLayerNormalization, MatMul, Gemm) all have float16 kernels on CUDA, and onnxruntime's
CPU provider runs them too, which is how this build machine checks the numerics.
Run by `edge-slm build` when the profile (or `--precision`) asks for fp16.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_slm.builder.decoder.export import save_with_external_data
from edge_slm.core.errors import ExportError


def convert_fp16(onnx_path: Path, out_dir: Path, progress=lambda msg: None) -> dict:
    """Write `out_dir/model.onnx` in float16 with float32 logits; return what was converted."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    proto = onnx.load(str(onnx_path))
    graph = proto.graph
    if not any(n.op_type == "GroupQueryAttention" for n in graph.node):
        raise ExportError('fp16 is built from the fused graph only: set [export] graph = "fused"')
    converted = 0
    for index, init in enumerate(graph.initializer):
        if init.data_type == TensorProto.FLOAT:
            half = numpy_helper.to_array(init).astype(np.float16)
            if not np.isfinite(half).all():
                raise ExportError(f"weight {init.name} overflows float16 (|w| > 65504): this model needs fp32")
            graph.initializer[index].CopyFrom(numpy_helper.from_array(half, init.name))
            converted += 1
    for value in list(graph.input) + list(graph.output):
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = TensorProto.FLOAT16
    for node in graph.node:
        if node.op_type == "Cast" and any(a.name == "to" and a.i == TensorProto.FLOAT for a in node.attribute):
            raise ExportError(f"node {node.name} casts to float32 inside the graph: fp16 conversion cannot keep it")
        node.output[:] = ["logits.fp16" if o == "logits" else o for o in node.output]
    graph.node.append(helper.make_node("Cast", ["logits.fp16"], ["logits"], name="logits/Cast", to=TensorProto.FLOAT))
    next(o for o in graph.output if o.name == "logits").type.tensor_type.elem_type = TensorProto.FLOAT
    progress(f"{converted} weight tensors to float16; KV cache float16, logits float32")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_with_external_data(proto, out_dir)
    return {"float16_initializers": converted, "kv_cache_dtype": "float16", "logits_dtype": "float32"}
