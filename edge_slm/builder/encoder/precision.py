"""Reduced precision for encoder graphs, with onnxruntime's own quantization tools:

  int8 dynamic  int8 weights per output channel, activations quantized per call
                (MatMulInteger / QAttention): what onnxruntime's CPU kernels run fastest
  int8 qdq      static S8S8 QuantizeLinear/DequantizeLinear around the MatMuls, scales from
                calibration texts: the explicit int8 TensorRT takes
  fp16          float16 weights and activations, float32 inputs and output (Jetson's GPU)

ONNX in, ONNX out; the accuracy gate decides whether the result ships.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_slm.core.targets import Encoder as EncoderSpec

MODEL_FILE = "model.onnx"


def reduce_precision(fp32_path: Path, spec: EncoderSpec, out_dir: Path, calibration_feeds=None) -> dict:
    """Write `out_dir/model.onnx` at `spec.precision`; return the manifest's quantization section."""
    import onnx

    out = out_dir / MODEL_FILE
    if spec.precision == "fp16":
        from onnxruntime.transformers.onnx_model import OnnxModel

        model = OnnxModel(onnx.load(str(fp32_path)))
        model.convert_float_to_float16(keep_io_types=True)
        model.save_model_to_file(str(out))
        method = "fp16"
    elif spec.int8_format == "qdq":
        _quantize_static(fp32_path, out, spec, calibration_feeds)
        method = "qdq-s8s8-static"
    else:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        ops = ["MatMul", "Attention", *(["EmbedLayerNormalization"] if spec.quantize_embeddings else [])]
        kept = after_gelu(onnx.load(str(fp32_path))) if spec.float_after_gelu == "always" else []
        quantize_dynamic(
            str(fp32_path),
            str(out),
            nodes_to_exclude=kept,
            per_channel=spec.per_channel,
            reduce_range=spec.reduce_range,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=ops,
            # The fused contrib operators have no ONNX type inference: their outputs are float.
            extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
        )
        method = "int8-dynamic"
    counts: dict[str, int] = {}
    for node in onnx.load(str(out)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    section = {
        "method": method,
        "recipe": {k: getattr(spec, k) for k in spec.__dataclass_fields__},
        "op_counts": counts,
    }
    if method == "int8-dynamic":
        section["float_matmuls"] = counts.get("MatMul", 0)
    return section


def after_gelu(model) -> list[str]:
    """The MatMuls whose input is a GELU's output: its few large values leave a per-tensor int8
    scale little resolution for the many small ones (the FFN's second half in every layer)."""
    gelu_outputs = {o for n in model.graph.node if n.op_type in ("Gelu", "BiasGelu", "FastGelu") for o in n.output}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[0] in gelu_outputs]


def _quantize_static(fp32_path: Path, out: Path, spec: EncoderSpec, feeds) -> None:
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter(feeds or [])

        def get_next(self):
            return next(self.feeds, None)

    quantize_static(
        str(fp32_path),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=spec.per_channel,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul"],
        extra_options={
            "ActivationSymmetric": True,  # TensorRT takes symmetric int8 only
            "WeightSymmetric": True,
            "MatMulConstBOnly": True,
            "DefaultTensorType": onnx.TensorProto.FLOAT,
        },
    )


def calibration_feeds(graph, texts: list[str], batch_size: int = 8) -> list[dict[str, np.ndarray]]:
    """Padded input batches of `texts`, as the device feeds them, for static calibration."""
    feeds = []
    for start in range(0, len(texts), batch_size):
        encodings = graph.tokenizer.encode_batch(texts[start : start + batch_size])
        feeds.append(graph.feed(encodings))
    return feeds
