"""Static S8S8 QDQ int8 for TensorRT: ONNX in, ONNX out, with activation ranges from calibration text.

TensorRT's int8 path wants explicit quantization: QuantizeLinear / DequantizeLinear pairs with
signed 8-bit values and zero points of 0 (symmetric) on both inputs of every matrix product, and
static scales, since TensorRT does not quantize activations at run time. So:
- each weight matrix is stored as int8, one scale per output channel, behind a DequantizeLinear;
- each activation entering a MatMul / Gemm gets a QuantizeLinear -> DequantizeLinear pair whose
  scale is max|x| / 127 (or a percentile of |x|) measured by running the fp32 graph over the
  calibration text (the shipped `edge_slm/data/calibration.txt`, or `--calibration FILE`);
- SmoothQuant moves activation outliers into the weights first (folded into the producer: a
  norm's gain, the up projection, the value projection), its strength chosen per activation by
  the least error of the int8 product on calibration tokens (mean per-token relative error);
- products whose int8 error still exceeds `max_error`, and those `keep_float` names, stay float
  as a whole, weights and activation, stored as fp16 behind a Cast (TensorRT runs them in fp16).
  Per-channel int8 weights alone cost this model's top-1 agreement 6 points, so a product with a
  float activation keeps float weights too. Mostly these are the activations with massive
  outliers on a sequence's first token (thousands, against a median of ~1.5), which one static
  scale cannot cover, and the LM head, whose input cannot be smoothed.
The tied embedding is stored once: the Gather and the LM head read the same DequantizeLinear (or
the same fp16 table, when the LM head stays float).
ONNX Runtime's CPU provider runs the result (it fuses the pairs into integer kernels), which is
how the accuracy gate measures it here without a GPU. Run by `edge-slm build --precision int8`
for profiles whose `[quantize] int8_format = "qdq"` (jetson-orin).
"""

from __future__ import annotations

from fnmatch import fnmatch
from pathlib import Path

import numpy as np

from edge_slm.builder.decoder.export import ModelShape, save_with_external_data
from edge_slm.builder.quantize.smooth import per_tensor_error, smooth_graph, transposed
from edge_slm.core.errors import ExportError
from edge_slm.core.targets import Quantize


def quantize_qdq(
    onnx_path: Path,
    recipe: Quantize,
    out_dir: Path,
    calibration_ids: list[int],
    shape: ModelShape,
    threads: int = 2,
    progress=lambda msg: None,
) -> dict:
    """Write `out_dir/model.onnx` with S8S8 QDQ around every MatMul / Gemm whose int8 product errs
    at most the recipe's `max_product_error` on the calibration tokens (the rest fp16); return node
    counts. The recipe also gives the SmoothQuant strengths, the calibration percentile and the
    `keep_float` names."""
    import onnx

    proto = onnx.load(str(onnx_path))
    smoothed = smooth_graph(
        onnx_path, proto, calibration_ids, shape, recipe.smooth_alphas, per_tensor_error, threads, progress
    )
    captured, errors, products = smoothed["captured"], smoothed["errors"], smoothed["products"]
    activations = sorted(captured)
    too_lossy = {name for name, error in errors.items() if error > recipe.max_product_error}
    progress(
        f"smoothed {smoothed['smoothed']} of {len(activations)} activations into the weights; "
        f"{len(too_lossy)} lose more than {100 * recipe.max_product_error:g}% of their product in int8 and stay fp16"
    )
    writer = _QdqWriter(smoothed["weights"], _activation_ranges(smoothed, recipe.calibration_percentile))
    activation_qdq = {
        name: name
        if name in too_lossy or any(fnmatch(name, k) for k in recipe.keep_float)
        else writer.fake_quantized(name)
        for name in activations
    }
    int8_products = [n for n in products if activation_qdq[n.input[0]] != n.input[0]]
    float_products = [n for n in products if activation_qdq[n.input[0]] == n.input[0]]
    graph = proto.graph
    writer.quantize_products(graph, int8_products, activation_qdq)
    float_weights = writer.fp16_weights(graph, {n.input[1] for n in float_products} - set(writer.dequantized))
    product_weights = {n.input[1] for n in products}
    tied_gathers = sum(n.op_type == "Gather" and n.input[0] in product_weights for n in graph.node)
    writer.install(graph, drop=set(writer.dequantized) | float_weights)
    if proto.opset_import[0].version < 13:
        raise ExportError("per-channel DequantizeLinear needs opset 13 or newer: raise [export] opset")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_with_external_data(proto, out_dir)
    quantized_activations = sum(name != qdq_name for name, qdq_name in activation_qdq.items())
    return {
        "QuantizeLinear": quantized_activations,
        "activations_kept_float": len(activations) - quantized_activations,
        "DequantizeLinear": quantized_activations + len(writer.dequantized),
        "quantized_matmuls": len(int8_products),
        "float_matmuls": len(float_products),
        "quantized_weights": len(writer.dequantized),
        "fp16_weights": len(float_weights),
        "shared_embedding_gathers": tied_gathers,
        "float_matmuls_left": sum(n.op_type in ("MatMul", "Gemm") for n in graph.node) - len(int8_products),
        "smoothed_activations": smoothed["smoothed"],
        "smooth_alphas": list(recipe.smooth_alphas),
        "kept_float_by_error": sorted(too_lossy),
        "max_error": recipe.max_product_error,
        "median_product_error": float(np.median(list(errors.values()))),
        "calibration_tokens": len(calibration_ids),
        "percentile": recipe.calibration_percentile,
    }


def _activation_ranges(smoothed: dict, percentile: float) -> dict[str, float]:
    """Each activation's static range: a percentile of |x| over the calibration tokens, after the
    SmoothQuant division."""
    return {
        name: float(np.percentile(np.abs(values / smoothed["scales"][name]), percentile))
        for name, values in sorted(smoothed["captured"].items())
    }


class _QdqWriter:
    """Collects the new initializers and Q/DQ nodes, in the order they are made."""

    ZERO = "qdq.zero_int8"

    def __init__(self, weights: dict, ranges: dict[str, float]):
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.weights, self.ranges = weights, ranges
        self.inits = [numpy_helper.from_array(np.array(0, np.int8), self.ZERO)]
        self.nodes: list = []
        self.dequantized: dict[str, str] = {}

    def dequantized_weight(self, name: str, channel_axis: int) -> str:
        """Per-output-channel symmetric int8 weight and its DequantizeLinear; a weight shared by
        Gather and Gemm (the tied embedding) is quantized once."""
        if name in self.dequantized:
            return self.dequantized[name]
        w = self.weights[name]
        reduce_axes = tuple(a for a in range(w.ndim) if a != channel_axis)
        scale = np.abs(w).max(axis=reduce_axes) / 127.0
        scale[scale == 0] = 1.0
        shape = [1] * w.ndim
        shape[channel_axis] = -1
        q = np.clip(np.rint(w / scale.reshape(shape)), -127, 127).astype(np.int8)
        self.inits.append(self.numpy_helper.from_array(q, name + ".int8"))
        self.inits.append(self.numpy_helper.from_array(scale.astype(np.float32), name + ".scale"))
        self.inits.append(self.numpy_helper.from_array(np.zeros(scale.shape, np.int8), name + ".zero"))
        self.nodes.append(
            self.helper.make_node(
                "DequantizeLinear",
                [name + ".int8", name + ".scale", name + ".zero"],
                [name + ".dq"],
                name=name + "/DequantizeLinear",
                axis=channel_axis,
            )
        )
        self.dequantized[name] = name + ".dq"
        return self.dequantized[name]

    def fake_quantized(self, name: str) -> str:
        """QuantizeLinear + DequantizeLinear of an activation with its static scale."""
        scale = name + ".act_scale"
        self.inits.append(
            self.numpy_helper.from_array(np.array(max(self.ranges[name], 1e-8) / 127.0, np.float32), scale)
        )
        self.nodes.append(
            self.helper.make_node(
                "QuantizeLinear", [name, scale, self.ZERO], [name + ".q"], name=name + "/QuantizeLinear"
            )
        )
        self.nodes.append(
            self.helper.make_node(
                "DequantizeLinear", [name + ".q", scale, self.ZERO], [name + ".qdq"], name=name + "/DequantizeLinear"
            )
        )
        return name + ".qdq"

    def quantize_products(self, graph, products: list, activation_qdq: dict[str, str]) -> None:
        for node in products:
            # Output channels: columns of a [K, N] MatMul weight, rows of a transposed Gemm weight.
            weight_dq = self.dequantized_weight(node.input[1], channel_axis=0 if transposed(node) else 1)
            node.input[0], node.input[1] = activation_qdq[node.input[0]], weight_dq
        for node in graph.node:
            if node.op_type == "Gather" and node.input[0] in self.dequantized:
                node.input[0] = self.dequantized[node.input[0]]

    def fp16_weights(self, graph, names: set[str]) -> set[str]:
        """Weights of products kept float, stored fp16 behind a Cast: what TensorRT computes them
        in anyway, at half the bytes; the CPU provider folds the Cast away at load."""
        import onnx

        for name in sorted(names):
            self.inits.append(self.numpy_helper.from_array(self.weights[name].astype(np.float16), name + ".fp16"))
            self.nodes.append(
                self.helper.make_node(
                    "Cast", [name + ".fp16"], [name + ".float"], name=name + "/Cast", to=onnx.TensorProto.FLOAT
                )
            )
        for node in graph.node:
            for i, name in enumerate(node.input):
                if name in names:
                    node.input[i] = name + ".float"
        return names

    def install(self, graph, drop: set[str]) -> None:
        """Replace the float initializers in `drop` with the new ones, put the new nodes in, sort."""
        kept = [init for init in graph.initializer if init.name not in drop]
        del graph.initializer[:]
        graph.initializer.extend(kept + self.inits)
        nodes = list(graph.node)
        del graph.node[:]
        graph.node.extend(self.nodes + nodes)  # Q/DQ of weights first; activations' Q/DQ read their producers
        _topological_sort(graph)


def _topological_sort(graph) -> None:
    """Reorder nodes so each comes after the producers of its inputs (ONNX requires it)."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise ExportError("the quantized graph has a cycle or a dangling input")
        for n in ready:
            ordered.append(n)
            available.update(n.output)
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
    del graph.node[:]
    graph.node.extend(ordered)
