"""SmoothQuant for int8 activations: calibration activations in, float weights folded in place.

Int8 activations lose most where a few channels carry outliers: one scale must then cover them and
everything else rounds to a handful of levels. SmoothQuant divides such channels by s and
multiplies the matching weight rows by s, so both quantize well while the float product is
unchanged. 1/s is folded into whatever made the activation: a norm's gain (QKV, gate/up inputs),
the up projection's columns (the down projection's input, silu(gate) * up), or the value
projection's columns (the output projection's input: attention is linear in V). The strength
alpha is chosen per activation by the least error of the quantized product on calibration tokens,
under the quantizer the target runs:
- `per_tensor_error`: one static scale per activation, one per weight output channel (TensorRT's
  S8S8 QDQ, `edge_slm.builder.quantize.qdq`), scored per token so that a massive first-token activation cannot
  hide what its scale does to every other token;
- `BlockwiseError`: activations in blocks along K per token, as onnxruntime's MatMulNBits does at
  accuracy_level 4, weights in blocks of the same size (`edge_slm.builder.quantize.blockwise`).
Used by `edge-slm build` when the profile's `[quantize] smooth_alphas` lists strengths.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from edge_slm.builder.decoder.export import ModelShape
from edge_slm.core.errors import ExportError

CHUNK = 128  # tokens per calibration forward pass: prefill-sized activations, like the device sees

# (activation sample [T, K], weight [K, N], their float product [T, N], weight name)
#   -> relative error of the quantized product
ProductError = Callable[[np.ndarray, np.ndarray, np.ndarray, str], float]


def calibration_chunks(token_ids: list[int], chunk: int = CHUNK) -> list[list[int]]:
    if len(token_ids) < 16:
        raise ExportError(
            f"the calibration text has {len(token_ids)} tokens; static int8 needs at least "
            "a few hundred: pass a longer --calibration FILE"
        )
    return [token_ids[i : i + chunk] for i in range(0, len(token_ids), chunk) if len(token_ids[i : i + chunk]) >= 16]


def capture_activations(
    onnx_path: Path,
    tensor_names: list[str],
    chunks: list[list[int]],
    shape: ModelShape,
    threads: int = 2,
    progress=lambda msg: None,
) -> dict[str, np.ndarray]:
    """Each named tensor over every calibration token, as [tokens, channels] float32."""
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(onnx_path), load_external_data=False)
    existing = {o.name for o in proto.graph.output}
    for name in tensor_names:
        if name not in existing:
            proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: logits_to_keep is an input with a default, on purpose
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
    layers, kv, head_dim = shape.num_layers, shape.num_kv_heads, shape.head_dim
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


def smooth_graph(
    onnx_path: Path,
    proto,
    calibration_ids: list[int],
    shape: ModelShape,
    alphas: tuple[float, ...],
    product_error: ProductError,
    threads: int = 2,
    progress=lambda msg: None,
) -> dict:
    """Fold the best SmoothQuant scales into `proto`'s float weights (in place, the function of
    the graph unchanged) and return, per activation of a weight product: its calibration values
    (`captured`, before smoothing), the scale s it is now divided by, alpha and product error; the
    float weights as they now are (`weights`) and the MatMul / Gemm nodes reading them (`products`)."""
    import onnx
    from onnx import numpy_helper

    graph = proto.graph
    weights = {
        init.name: numpy_helper.to_array(init).astype(np.float32)
        for init in graph.initializer
        if init.data_type == onnx.TensorProto.FLOAT
    }
    products = [n for n in graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights]
    activations = sorted({n.input[0] for n in products})
    progress(f"measuring {len(activations)} activations on {len(calibration_ids)} calibration tokens")
    captured = capture_activations(
        onnx_path, activations, calibration_chunks(calibration_ids), shape, threads, progress
    )
    smoothing = Smoothing(graph, weights, shape, alphas, product_error)
    scales, chosen, errors = {}, {}, {}
    for name in activations:
        scales[name], chosen[name], errors[name] = smoothing.apply(
            name, captured[name], [n for n in products if n.input[0] == name]
        )
    for i, init in enumerate(graph.initializer):
        if init.name in smoothing.changed:
            graph.initializer[i].CopyFrom(numpy_helper.from_array(weights[init.name], init.name))
    return {
        "captured": captured,
        "scales": scales,
        "alphas": chosen,
        "errors": errors,
        "weights": weights,
        "products": products,
        "smoothed": sum(a > 0 for a in chosen.values()),
        "activations": len(activations),
    }


def per_tensor_error(x: np.ndarray, w: np.ndarray, ref: np.ndarray, weight_name: str) -> float:
    """Int8 product error with one static scale for the activation (its max over `x`), one per
    weight output channel."""
    return token_error(fake_int8(x, axis=None) @ fake_int8(w, axis=0), ref)


per_tensor_error.static_scale = True  # Smoothing scores it on samples holding each channel's peak


class BlockwiseError:
    """Int8 product error of MatMulNBits at accuracy_level 4: activations quantized per token in
    blocks of the weight's block size along K (symmetric, as the kernels do), weights per output
    channel in the same blocks. `block_size_for(weight name)` gives the block."""

    def __init__(self, block_size_for: Callable[[str], int], quantize_activations: bool = True):
        self.block_size_for, self.quantize_activations = block_size_for, quantize_activations

    def __call__(self, x: np.ndarray, w: np.ndarray, ref: np.ndarray, weight_name: str) -> float:
        block = self.block_size_for(weight_name)
        xq = fake_int8_blocks(x, block) if self.quantize_activations else x
        wq = fake_int8_blocks(w.T, block).T
        # One norm over all tokens, not per token as for static scales: each token has its own
        # scales here, so a massive token cannot wipe the others.
        return float(np.linalg.norm(xq @ wq - ref) / np.linalg.norm(ref))


class Smoothing:
    """Per activation: s = max|x|^alpha / max|w|^(1 - alpha) for each alpha tried, the one whose
    quantized product errs least is folded (module docstring). GQA's query heads sharing a value
    head share its s. Activations with no foldable producer (the LM head, whose weight is the tied
    embedding) keep s = 1."""

    def __init__(
        self,
        graph,
        weights: dict[str, np.ndarray],
        shape: ModelShape,
        alphas: tuple[float, ...],
        product_error: ProductError = per_tensor_error,
    ):
        self.weights, self.alphas, self.shape, self.error = weights, tuple(alphas), shape, product_error
        self.producer = {o: n for n in graph.node for o in n.output}
        self.changed: set[str] = set()

    def apply(self, name: str, x: np.ndarray, consumers) -> tuple[np.ndarray, float, float]:
        """Pick the strength whose quantized product is closest to the float product on
        calibration tokens, fold it, and return (s, alpha, error)."""
        fold = self._fold_for(name) if all(n.op_type == "MatMul" for n in consumers) else None
        mats = [self._as_kn(n) for n in consumers]
        rows = np.arange(0, len(x), max(1, len(x) // 256))
        if getattr(self.error, "static_scale", False):
            # Plus, per channel, the token where it peaks: the per-tensor scale is then the
            # calibration-wide one whatever s is, and the rare outlier tokens are scored.
            rows = np.union1d(rows, np.abs(x).argmax(axis=0))
        sample = x[rows]
        exact = [sample @ w for w in mats]  # the float product, the same for every strength
        act_max = fold.group(np.abs(x).max(axis=0)) if fold else None
        w_max = fold.group(np.max([np.abs(w).max(axis=1) for w in mats], axis=0)) if fold else None
        best = (np.ones(x.shape[1], np.float32), 0.0, np.inf)
        for alpha in self.alphas if fold else (0.0,):
            s = np.ones(x.shape[1], np.float32)
            if alpha > 0:
                s = fold.ungroup(
                    np.clip(np.maximum(act_max, 1e-5) ** alpha / np.maximum(w_max, 1e-5) ** (1 - alpha), 1e-3, 1e3)
                ).astype(np.float32)
            error = max(
                self.error(sample / s, w * s[:, None], ref, n.input[1]) for w, ref, n in zip(mats, exact, consumers)
            )
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
        return w.T if transposed(node) else w

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
        n_heads, kv_heads, head_dim = self.shape.num_heads, self.shape.num_kv_heads, self.shape.head_dim
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
        return _Fold(
            self, targets, columns=slice(v_start, v_start + kv_heads * head_dim), groups=(n_heads, kv_heads, head_dim)
        )


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


def transposed(node) -> bool:
    """A Gemm with transB: its weight is stored [N, K] (the tied LM head)."""
    return any(a.name == "transB" and a.i for a in node.attribute)


def token_error(product: np.ndarray, ref: np.ndarray) -> float:
    """Mean over tokens of each token's relative product error. Not one norm over all tokens: a
    massive activation (thousands, on a sequence's first token, in some layers) would outweigh
    every other token, and a per-tensor scale that rounds all the others to zero would look fine."""
    per_token = np.linalg.norm(product - ref, axis=1) / np.maximum(np.linalg.norm(ref, axis=1), 1e-12)
    return float(per_token.mean())


def fake_int8(values: np.ndarray, axis: int | None) -> np.ndarray:
    """Symmetric int8 round trip: one scale for the whole tensor (axis None), or one per slice
    reduced along `axis` (axis 0 of a [K, N] weight: one per output channel)."""
    scale = np.abs(values).max(axis=axis, keepdims=axis is not None) / 127.0
    scale = np.where(scale == 0, 1.0, scale)
    return np.clip(np.rint(values / scale), -127, 127) * scale


def fake_int8_blocks(values: np.ndarray, block: int) -> np.ndarray:
    """Symmetric int8 round trip of each row of [R, K] in blocks of `block` along K (the last
    block zero-padded, as the kernels pad)."""
    rows, k = values.shape
    padded = np.zeros((rows, -(-k // block) * block), np.float32)
    padded[:, :k] = values
    blocks = padded.reshape(rows, -1, block)
    scale = np.abs(blocks).max(axis=-1, keepdims=True) / 127.0
    scale = np.where(scale == 0, 1.0, scale)
    return (np.clip(np.rint(blocks / scale), -127, 127) * scale).reshape(rows, -1)[:, :k]
