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
  the least error of the int8 product on calibration tokens; activations whose int8 product
  still errs by more than `max_error` stay float (TensorRT runs them in fp16).
The tied embedding is quantized once: the Gather and the LM head read the same DequantizeLinear.
ONNX Runtime's CPU provider runs the result (it fuses the pairs into integer kernels), which is
how the accuracy gate measures it here without a GPU. Run by `edge-slm build --precision int8`
for profiles whose `[quantize] int8_format = "qdq"` (jetson-orin).
"""

from __future__ import annotations

from fnmatch import fnmatch
from pathlib import Path

import numpy as np

from .errors import ExportError
from .export import DATA_FILE, MODEL_FILE

CALIBRATION_TEXT = Path(__file__).parent / "data" / "calibration.txt"
CHUNK = 128  # tokens per calibration forward pass: prefill-sized activations, like the device sees


def calibration_chunks(token_ids: list[int], chunk: int = CHUNK) -> list[list[int]]:
    if len(token_ids) < 16:
        raise ExportError(f"the calibration text has {len(token_ids)} tokens; static int8 needs at least "
                          "a few hundred: pass a longer --calibration FILE")
    return [token_ids[i:i + chunk] for i in range(0, len(token_ids), chunk) if len(token_ids[i:i + chunk]) >= 16]


def capture_activations(onnx_path: Path, tensor_names: list[str], chunks: list[list[int]], model_info: dict,
                        threads: int = 2, progress=lambda msg: None) -> dict[str, np.ndarray]:
    """Each named tensor over every calibration token, as [tokens, channels] float32."""
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(onnx_path), load_external_data=False)
    existing = {o.name for o in proto.graph.output}
    for name in tensor_names:
        if name not in existing:
            proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # Optimizations could fuse away the very tensors being measured.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    # Saved beside the original so that its external-data references still resolve.
    probe_path = Path(onnx_path).with_name("calibration-probe.onnx")
    onnx.save_model(proto, str(probe_path))
    try:
        session = ort.InferenceSession(str(probe_path), options, providers=["CPUExecutionProvider"])
    finally:
        probe_path.unlink()
    layers, kv, head_dim = model_info["num_layers"], model_info["num_kv_heads"], model_info["head_dim"]
    captured: dict[str, list[np.ndarray]] = {name: [] for name in tensor_names}
    for n, chunk in enumerate(chunks, 1):
        ids = np.asarray([chunk], dtype=np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(ids.shape[1])[None]}
        for i in range(layers):
            for kind in ("key", "value"):
                feed[f"past_key_values.{i}.{kind}"] = np.zeros((1, kv, 0, head_dim), np.float32)
        values = session.run(tensor_names, feed)
        for name, value in zip(tensor_names, values):
            captured[name].append(value.reshape(-1, value.shape[-1]))
        progress(f"calibration pass {n}/{len(chunks)}")
    return {name: np.concatenate(parts) for name, parts in captured.items()}


def quantize_qdq(onnx_path: Path, out_dir: Path, calibration_ids: list[int], model_info: dict,
                 smooth_alphas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75), percentile: float = 100.0,
                 keep_float: tuple[str, ...] = (), max_error: float = 1.0, threads: int = 2,
                 progress=lambda msg: None) -> dict:
    """Write `out_dir/model.onnx` with S8S8 QDQ around every MatMul / Gemm; return node counts."""
    import onnx
    from onnx import helper, numpy_helper

    proto = onnx.load(str(onnx_path))
    graph = proto.graph
    weights = {init.name: numpy_helper.to_array(init).astype(np.float32) for init in graph.initializer
               if init.data_type == onnx.TensorProto.FLOAT}
    products = [n for n in graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights]
    activations = sorted({n.input[0] for n in products})
    progress(f"measuring {len(activations)} activations on {len(calibration_ids)} calibration tokens")
    captured = capture_activations(onnx_path, activations, calibration_chunks(calibration_ids), model_info,
                                   threads, progress)
    smoothing = Smoothing(graph, weights, model_info, smooth_alphas)
    ranges, errors, alphas = {}, {}, {}
    for name in activations:
        scale, alphas[name], errors[name] = smoothing.apply(
            name, captured[name], [n for n in products if n.input[0] == name])
        ranges[name] = float(np.percentile(np.abs(captured[name] / scale), percentile))
    too_lossy = {name for name, error in errors.items() if error > max_error}
    progress(f"smoothed {sum(a > 0 for a in alphas.values())} of {len(activations)} activations into the weights; "
             f"{len(too_lossy)} lose more than {100 * max_error:.0f}% of their product in int8 and stay float")

    new_inits, new_nodes, dequantized = [], [], {}
    zero_i8 = "qdq.zero_int8"
    new_inits.append(numpy_helper.from_array(np.array(0, np.int8), zero_i8))

    def dequantized_weight(name: str, channel_axis: int) -> str:
        # A weight shared by Gather and Gemm (the tied embedding) is quantized once.
        if name in dequantized:
            return dequantized[name]
        w = weights[name]
        reduce_axes = tuple(a for a in range(w.ndim) if a != channel_axis)
        scale = np.abs(w).max(axis=reduce_axes) / 127.0
        scale[scale == 0] = 1.0
        shape = [1] * w.ndim
        shape[channel_axis] = -1
        q = np.clip(np.rint(w / scale.reshape(shape)), -127, 127).astype(np.int8)
        new_inits.append(numpy_helper.from_array(q, name + ".int8"))
        new_inits.append(numpy_helper.from_array(scale.astype(np.float32), name + ".scale"))
        new_inits.append(numpy_helper.from_array(np.zeros(scale.shape, np.int8), name + ".zero"))
        new_nodes.append(helper.make_node("DequantizeLinear", [name + ".int8", name + ".scale", name + ".zero"],
                                          [name + ".dq"], name=name + "/DequantizeLinear", axis=channel_axis))
        dequantized[name] = name + ".dq"
        return dequantized[name]

    def fake_quantized(name: str) -> str:
        scale = name + ".act_scale"
        new_inits.append(numpy_helper.from_array(np.array(max(ranges[name], 1e-8) / 127.0, np.float32), scale))
        new_nodes.append(helper.make_node("QuantizeLinear", [name, scale, zero_i8], [name + ".q"],
                                          name=name + "/QuantizeLinear"))
        new_nodes.append(helper.make_node("DequantizeLinear", [name + ".q", scale, zero_i8], [name + ".qdq"],
                                          name=name + "/DequantizeLinear"))
        return name + ".qdq"

    activation_qdq = {name: name if name in too_lossy or any(fnmatch(name, k) for k in keep_float)
                      else fake_quantized(name) for name in activations}
    for node in products:
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        # Output channels: columns of a [K, N] MatMul weight, rows of a transposed Gemm weight.
        weight_dq = dequantized_weight(node.input[1], channel_axis=0 if trans_b else 1)
        node.input[0], node.input[1] = activation_qdq[node.input[0]], weight_dq
    embedding_gathers = 0
    for node in graph.node:
        if node.op_type == "Gather" and node.input[0] in dequantized:
            node.input[0] = dequantized[node.input[0]]
            embedding_gathers += 1

    replaced = set(dequantized) | smoothing.changed
    kept = [init for init in graph.initializer if init.name not in replaced]
    kept += [numpy_helper.from_array(weights[name], name) for name in smoothing.changed - set(dequantized)]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(new_nodes + nodes)  # Q/DQ of weights first; activations' Q/DQ read their producers
    _topological_sort(graph)
    if proto.opset_import[0].version < 13:
        raise ExportError("per-channel DequantizeLinear needs opset 13 or newer: raise [export] opset")
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx.save_model(proto, str(out_dir / MODEL_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=1024)
    quantized_activations = sum(name != qdq_name for name, qdq_name in activation_qdq.items())
    return {"QuantizeLinear": quantized_activations, "activations_kept_float": len(activations) - quantized_activations, "DequantizeLinear": quantized_activations + len(dequantized),
            "quantized_matmuls": len(products), "quantized_weights": len(dequantized),
            "shared_embedding_gathers": embedding_gathers,
            "float_matmuls_left": sum(n.op_type in ("MatMul", "Gemm") for n in graph.node) - len(products),
            "smoothed_activations": sum(a > 0 for a in alphas.values()), "smooth_alphas": list(smooth_alphas),
            "kept_float_by_error": sorted(too_lossy), "max_error": max_error,
            "median_product_error": float(np.median(list(errors.values()))),
            "calibration_tokens": len(calibration_ids), "percentile": percentile}


class Smoothing:
    """SmoothQuant: divide an activation's outlier channels by s and multiply the matching weight
    rows by s, so both quantize well; the product is unchanged. 1/s is folded into whatever made
    the activation: a norm's gain (QKV, gate/up inputs), the up projection's columns (down
    projection input: silu(gate) * up), or the value projection's columns (output projection
    input: attention is linear in V; GQA's query heads sharing a value head share its s).
    Activations with no foldable producer (the LM head, whose weight is the tied embedding) keep
    s = 1."""

    def __init__(self, graph, weights: dict[str, np.ndarray], model_info: dict, alphas: tuple[float, ...]):
        self.weights, self.alphas, self.info = weights, tuple(alphas), model_info
        self.producer = {o: n for n in graph.node for o in n.output}
        self.changed: set[str] = set()

    def apply(self, name: str, x: np.ndarray, consumers) -> tuple[np.ndarray, float, float]:
        """Pick the strength whose int8 product (per-tensor activation, per-channel weight) is
        closest to the float product on calibration tokens, fold it, and return (s, alpha, error)."""
        fold = self._fold_for(name) if all(n.op_type == "MatMul" for n in consumers) else None
        mats = [self._as_kn(n) for n in consumers]
        sample = x[:: max(1, len(x) // 256)]
        exact = [sample @ w for w in mats]
        act_max = fold.group(np.abs(x).max(axis=0)) if fold else None
        best = (np.ones(x.shape[1], np.float32), 0.0, np.inf)
        for alpha in (self.alphas if fold else (0.0,)):
            s = np.ones(x.shape[1], np.float32)
            if alpha > 0:
                w_max = fold.group(np.max([np.abs(w).max(axis=1) for w in mats], axis=0))
                s = fold.ungroup(np.clip(np.maximum(act_max, 1e-5) ** alpha / np.maximum(w_max, 1e-5) ** (1 - alpha),
                                         1e-3, 1e3)).astype(np.float32)
            xq = _fake_int8(sample / s, axis=None)
            error = max(np.linalg.norm(xq @ _fake_int8(w * s[:, None], axis=0) - ref) / np.linalg.norm(ref)
                        for w, ref in zip(mats, exact))
            if error < best[2]:
                best = (s, alpha, float(error))
        s, alpha, error = best
        if alpha > 0:
            fold.divide(s)
            for n in consumers:
                self.weights[n.input[1]] *= s[:, None]
                self.changed.add(n.input[1])
        return s, alpha, error

    def _as_kn(self, node) -> np.ndarray:
        w = self.weights[node.input[1]]
        return w.T if any(a.name == "transB" and a.i for a in node.attribute) else w

    def _fold_for(self, name: str):
        node = self.producer.get(name)
        if node is None or node.output[0] != name:
            return None
        if node.op_type == "SimplifiedLayerNormalization":
            return _Fold(self, [(node.input[1], None)])
        if node.op_type == "SkipSimplifiedLayerNormalization":
            return _Fold(self, [(node.input[2], None)])
        if node.op_type == "Mul":  # silu(gate) * up: fold into the up projection's output columns
            for operand in node.input:
                up = self.producer.get(operand)
                if up is not None and up.op_type == "MatMul" and up.input[1] in self.weights:
                    return _Fold(self, [(up.input[1], "columns")])
            return None
        if node.op_type == "GroupQueryAttention":
            return self._value_fold(node)
        return None

    def _value_fold(self, gqa):
        n_heads, kv_heads, head_dim = self.info["num_heads"], self.info["num_kv_heads"], self.info["head_dim"]
        packed = gqa.input[1] == ""
        source = gqa.input[0] if packed else gqa.input[2]
        node = self.producer.get(source)
        if node is not None and node.op_type == "Split":
            node = self.producer.get(node.input[0])
        targets = []
        if node is not None and node.op_type == "Add" and node.input[1] in self.weights:  # Qwen2's bias
            targets.append((node.input[1], "vector"))
            node = self.producer.get(node.input[0])
        if node is None or node.op_type != "MatMul" or node.input[1] not in self.weights:
            return None
        targets.append((node.input[1], "columns"))
        v_start = (n_heads + kv_heads) * head_dim
        return _Fold(self, targets, columns=slice(v_start, v_start + kv_heads * head_dim),
                     groups=(n_heads, kv_heads, head_dim))


class _Fold:
    """Where 1/s goes: norm gains (whole vector), weight columns, or the value part of packed QKV
    where channel (query head h, d) reads value head h // (heads / kv_heads), channel d."""

    def __init__(self, owner: Smoothing, targets, columns: slice | None = None, groups=None):
        self.owner, self.targets, self.columns, self.groups = owner, targets, columns, groups

    def group(self, per_channel: np.ndarray) -> np.ndarray:
        if self.groups is None:
            return per_channel
        n_heads, kv_heads, head_dim = self.groups
        return per_channel.reshape(kv_heads, n_heads // kv_heads, head_dim).max(axis=1)

    def ungroup(self, s: np.ndarray) -> np.ndarray:
        if self.groups is None:
            return s
        n_heads, kv_heads, _ = self.groups
        return np.repeat(s, n_heads // kv_heads, axis=0).reshape(-1)

    def divide(self, s: np.ndarray) -> None:
        value_s = None
        if self.groups is not None:
            n_heads, kv_heads, head_dim = self.groups
            value_s = s.reshape(kv_heads, n_heads // kv_heads, head_dim)[:, 0, :].reshape(-1)
        for name, how in self.targets:
            w = self.owner.weights[name]
            if how is None:
                w /= s
            elif self.columns is not None:
                if how == "columns":
                    w[:, self.columns] /= value_s
                else:
                    w[self.columns] /= value_s
            else:
                w /= s[None, :]
            self.owner.changed.add(name)


def _fake_int8(values: np.ndarray, axis: int | None) -> np.ndarray:
    """Symmetric int8 round trip: one scale for the whole tensor (axis None), or one per slice
    reduced along `axis` (axis 0 of a [K, N] weight: one per output channel)."""
    scale = np.abs(values).max(axis=axis, keepdims=axis is not None) / 127.0
    scale = np.where(scale == 0, 1.0, scale)
    return np.clip(np.rint(values / scale), -127, 127) * scale


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
