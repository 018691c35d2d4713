"""Block-wise weight-only quantization of an exported graph: ONNX in, ONNX out.

Every constant weight matrix becomes onnxruntime's `MatMulNBits` (8 or 4 bits, a scale per block
of `block_size` input channels, zero points when asymmetric): the decoder's projections, the MLP,
and the LM head. The embedding table becomes `GatherBlockQuantized`; when it is tied to the LM
head both read the same quantized bytes, so the table is stored once. Activations stay float in
the graph (per-tensor dynamic activation quantization loses far more accuracy on these models:
docs/quantization.md).
Run by `edge-slm build` when the profile (or `--precision`) asks for int8 or int4.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_slm.builder.decoder.export import DATA_FILE, MODEL_FILE, ModelShape, save_with_external_data
from edge_slm.builder.decoder.fused_graph import MS_DOMAIN
from edge_slm.core.capabilities import SINCE, supports
from edge_slm.core.errors import ExportError
from edge_slm.core.targets import Quantize

# Recipes used when `--precision` asks for a precision other than the profile's own.
PRESETS = {
    # 8-bit, symmetric, int8 activations per block (accuracy_level 4: onnxruntime's fast CPU path;
    # levels 0-1 dequantize on every call), blocks of 64 (faster than 32 on AVX2) with SmoothQuant
    # folded in first so that the int8 activation blocks stay within the int8 budget; the tied LM
    # head, whose input cannot be smoothed, keeps blocks of 32.
    # fp16 scales on disk, as llama.cpp's Q8_0 does. The x86-laptop profile's recipe.
    "int8": Quantize(
        "int8",
        block_size=64,
        symmetric=True,
        accuracy_level=4,
        fp16_scales=True,
        block_size_overrides=("embed_tokens:32",),
        smooth_alphas=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    ),
    # 4-bit with a float minimum per block of 32 (GGUF Q4_1's own layout): on weights that came from
    # a Q4_1 file it is exact. The minimum runs as a separate small product (block_minimum
    # "offsets"), so the kernel takes its symmetric fast path. The embedding and tied head stay
    # 8-bit (the source's are Q8_0).
    "int4": Quantize("int4", block_size=32, symmetric=False, accuracy_level=4, fp16_scales=True, embedding_bits=8),
}


@dataclass(frozen=True)
class QuantizedWeight:
    data: np.ndarray  # uint8 [N, blocks, block_size * bits / 8], two 4-bit values a byte
    scales: np.ndarray  # float32 [N, blocks]
    zero_points: np.ndarray | None  # float32 [N, blocks] when asymmetric; None when symmetric
    bits: int
    block_size: int
    k: int  # input channels before padding


def quantize_rows(
    weight: np.ndarray, bits: int, block_size: int, symmetric: bool, fp16_scales: bool = False
) -> QuantizedWeight:
    """Quantize each row of `weight` [N, K] in blocks of `block_size` along K.

    Symmetric: scale = max|w| / (2^(bits-1) - 1), zero point fixed at 2^(bits-1) (the kernels'
    default). Asymmetric: scale = (max - min) / (2^bits - 1) and a float zero point, so that each
    block's minimum and maximum are exact; on weights that came from a GGUF Q4_1 file (min + k*d
    in blocks of 32) 4-bit asymmetric blocks of 32 reproduce them exactly. `fp16_scales`
    (asymmetric): round the scales to fp16 before the weights, so that they stay exact with the
    scales the kernel reads (GGUF's own are fp16).
    """
    n, k = weight.shape
    blocks = -(-k // block_size)
    padded = np.zeros((n, blocks * block_size), np.float32)
    padded[:, :k] = weight
    w = padded.reshape(n, blocks, block_size).astype(np.float64)
    levels = (1 << bits) - 1
    if symmetric:
        middle = 1 << (bits - 1)
        scales = np.abs(w).max(axis=-1) / (middle - 1)
        scales[scales == 0] = 1.0
        q = np.clip(np.rint(w / scales[..., None]) + middle, 0, levels)
        zero = None
    else:
        lo, hi = w.min(axis=-1), w.max(axis=-1)
        scales = (hi - lo) / levels
        if fp16_scales:
            scales = scales.astype(np.float16).astype(np.float64)
        scales[scales == 0] = 1.0
        q = np.clip(np.rint((w - lo[..., None]) / scales[..., None]), 0, levels)
        zero = (-lo / scales).astype(np.float32)  # dequantized value = (q - zero) * scale
    q = q.astype(np.uint8)
    if bits == 4:
        q = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    return QuantizedWeight(q, scales.astype(np.float32), zero, bits, block_size, k)


def dequantize_rows(qw: QuantizedWeight) -> np.ndarray:
    """The float matrix [N, K] the kernels compute with (used by tests and error reports)."""
    q = qw.data
    if qw.bits == 4:
        q = np.stack([q & 0x0F, q >> 4], axis=-1).reshape(q.shape[0], q.shape[1], -1)
    zero = qw.zero_points if qw.zero_points is not None else np.full(qw.scales.shape, 1 << (qw.bits - 1), np.float32)
    w = (q.astype(np.float32) - zero[..., None]) * qw.scales[..., None]
    return w.reshape(q.shape[0], -1)[:, : qw.k]


def quantize(
    onnx_path: Path,
    recipe: Quantize,
    out_dir: Path,
    progress=lambda msg: None,
    oldest_onnxruntime: str | None = None,
    calibration_ids: list[int] | None = None,
    shape: ModelShape | None = None,
) -> dict:
    """Write the quantized graph to `out_dir/model.onnx`; return the counts for the manifest.
    `oldest_onnxruntime`: the oldest runtime the device has; operators it lacks are avoided.
    `calibration_ids` (with the model's `shape`): tokens to pick SmoothQuant strengths on, when the recipe
    lists `smooth_alphas`."""
    import onnx

    bits = {"int8": 8, "int4": 4}.get(recipe.precision)
    if bits is None:
        raise ExportError(f"quantize() handles int8 and int4, not {recipe.precision}")
    model = onnx.load(str(onnx_path))
    if not supports("MatMulNBits.bits=8", oldest_onnxruntime) and 8 in (bits, recipe.embedding_bits):
        raise ExportError(
            f"8-bit MatMulNBits needs onnxruntime >= {SINCE['MatMulNBits.bits=8'].removesuffix('.0')}, but the profile "
            f"lists onnxruntime {oldest_onnxruntime} (it runs 4-bit weights only): drop that version from "
            "[runtime] onnxruntime_versions, or build with --precision fp32"
        )
    plain_gather = not supports("GatherBlockQuantized", oldest_onnxruntime)
    smoothing = None
    if recipe.smooth_alphas:
        if calibration_ids is None or shape is None:
            raise ExportError("the recipe smooths activations (smooth_alphas) but no calibration text was given")
        from edge_slm.builder.quantize.smooth import BlockwiseError, smooth_graph

        # Only int8 activations (accuracy_level 4) gain from smoothing; at lower levels the
        # error model sees float activations and keeps alpha 0 unless the weights gain.
        error = BlockwiseError(recipe.block_size_for, quantize_activations=recipe.accuracy_level >= 4)
        smoothed = smooth_graph(
            onnx_path,
            model,
            calibration_ids,
            shape,
            recipe.smooth_alphas,
            error,
            progress=lambda m: None if "pass" in m else progress(m),
        )
        smoothing = {
            "smoothed_activations": smoothed["smoothed"],
            "activations": smoothed["activations"],
            "calibration_tokens": len(calibration_ids),
            "median_product_error": float(np.median(list(smoothed["errors"].values()))),
        }
        progress(
            f"smoothed {smoothed['smoothed']} of {smoothed['activations']} activations into the weights "
            f"(median int8 product error {100 * smoothing['median_product_error']:.2f}%)"
        )
    rewriter = _Rewriter(model.graph, recipe, bits, plain_gather)
    progress(
        f"quantizing {rewriter.weight_matrices()} weight matrices to {bits} bits "
        f"({'symmetric' if recipe.symmetric else 'asymmetric'}, blocks of {recipe.block_size})"
    )
    counts = rewriter.run()
    if smoothing:
        counts["smoothing"] = smoothing
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in (out_dir / MODEL_FILE, out_dir / DATA_FILE):
        stale.unlink(missing_ok=True)
    save_with_external_data(model, out_dir)
    if recipe.prefill_accuracy_level >= 0:
        counts["prefill_graph"] = write_prefill_graph(out_dir, recipe.prefill_accuracy_level)
        progress(
            f"prompts get their own graph ({PREFILL_FILE}, accuracy_level {recipe.prefill_accuracy_level}, "
            "the same weights)"
        )
    return counts


PREFILL_FILE = "prefill.onnx"


def write_prefill_graph(out_dir: Path, accuracy_level: int) -> str:
    """`prefill.onnx`: the quantized graph with another MatMulNBits accuracy_level, reading the same
    weight file. onnxruntime's int8-activation kernels (level 4) are the fast path for one token
    but slow for a prompt's many rows, where dequantizing to float and running a GEMM wins
    (docs/quantization.md has the trade-off: faster prompts, more memory); the runtime runs
    prompts through this graph and decode steps through the main one, sharing the KV cache."""
    import onnx

    proto = onnx.load(str(out_dir / MODEL_FILE), load_external_data=False)
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits":
            for attribute in node.attribute:
                if attribute.name == "accuracy_level":
                    attribute.i = accuracy_level
    onnx.save_model(proto, str(out_dir / PREFILL_FILE))
    return PREFILL_FILE


class _Rewriter:
    """Replaces float weight consumers node by node; each source initializer is quantized once."""

    def __init__(self, graph, recipe: Quantize, bits: int, plain_gather: bool = False):
        self.graph, self.recipe, self.bits, self.plain_gather = graph, recipe, bits, plain_gather
        self.weights = {init.name: init for init in graph.initializer}
        self.cache: dict[str, tuple[str, str, str | None, QuantizedWeight]] = {}
        self.new_inits: list = []
        self.nodes: list = []
        self.block_sums: dict[tuple[str, int], str] = {}
        self.counts = {
            "MatMulNBits": 0,
            "GatherBlockQuantized": 0,
            "dequantized_gathers": 0,
            "float_matmuls_left": 0,
            "bits": bits,
            "embedding_bits": self._embedding_bits(),
        }
        if bits == 4 and not recipe.symmetric and recipe.block_minimum == "offsets":
            self.counts["block_offset_products"] = 0

    def _embedding_bits(self) -> int:
        return self.recipe.embedding_bits or self.bits

    def weight_matrices(self) -> int:
        return sum(1 for n in self.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in self.weights)

    def _const(self, array: np.ndarray, name: str) -> str:
        from onnx import numpy_helper

        self.new_inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def _node(self, op: str, inputs: list[str], output: str, domain: str = "", **attrs) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, [output], name=output + "/" + op, domain=domain, **attrs))
        return output

    def _quantized(self, name: str, rows: np.ndarray, bits: int):
        """(data, scales, zero points or None, the weight) for `name`, quantized once. Zero points
        are for 4 bits only (onnxruntime's CPU kernel takes 8-bit weights with float zero points
        nowhere, and the default model's 8-bit source, Q8_0, is symmetric), and only when the
        recipe passes them to the kernel (`block_minimum = "zero_points"`); with "offsets" the
        caller adds the blocks' minimum as a separate product."""
        if name not in self.cache:
            qw = quantize_rows(
                rows,
                bits,
                self.recipe.block_size_for(name),
                self.recipe.symmetric or bits == 8,
                fp16_scales=self.recipe.fp16_scales,
            )
            base = _stored_name(name, bits)
            data = self._const(qw.data, base + ".data")
            scales = self._half_stored(qw.scales, base + ".scales")
            zp = None
            if qw.zero_points is not None and self.recipe.block_minimum == "zero_points":
                zp = self._half_stored(qw.zero_points.reshape(-1), base + ".zero_points")
            self.cache[name] = (data, scales, zp, qw)
        return self.cache[name]

    def _half_stored(self, array: np.ndarray, name: str) -> str:
        """Scales and zero points on disk in fp16 when the recipe says so (as llama.cpp's Q8_0
        does: it halves their overhead); a Cast that onnxruntime folds at load gives the kernels
        the float32 they take."""
        if not self.recipe.fp16_scales:
            return self._const(array, name)
        return self._node("Cast", [self._const(array.astype(np.float16), name + ".fp16")], name, to=1)

    def _array(self, name: str) -> np.ndarray:
        from onnx import numpy_helper

        return numpy_helper.to_array(self.weights[name])

    def _matmul_nbits(self, a: str, out: str, name: str, rows: np.ndarray, bits: int, rank: int) -> None:
        data, scales, zp, qw = self._quantized(name, rows, bits)
        offsets = zp is None and qw.zero_points is not None  # asymmetric, run as symmetric + offsets
        product = out + ".symmetric" if offsets else out
        self._node(
            "MatMulNBits",
            [a, data, scales] + ([zp] if zp else []),
            product,
            domain=MS_DOMAIN,
            K=qw.k,
            N=rows.shape[0],
            bits=bits,
            block_size=qw.block_size,
            accuracy_level=self.recipe.accuracy_level,
        )
        self.counts["MatMulNBits"] += 1
        if offsets:
            # w = scale * (q - zero) = scale * (q - 8) + scale * (8 - zero): the symmetric kernel
            # computes the first term; the second is constant over a block, so it contributes
            # (sum of the block's inputs) x offset: one small float product [K / block, N].
            offset = (qw.scales * ((1 << (bits - 1)) - qw.zero_points)).T.astype(np.float32)
            correction = self._node(
                "MatMul",
                [self._block_sums(a, qw, rank), self._const(offset, _stored_name(name, bits) + ".offsets")],
                out + ".offset",
            )
            self._node("Add", [product, correction], out)
            self.counts["block_offset_products"] += 1

    def _block_sums(self, a: str, qw: QuantizedWeight, rank: int) -> str:
        """Sum of `a` over each block of input channels, [..., K / block]; once per activation."""
        key = (a, qw.block_size)
        if key not in self.block_sums:
            if qw.k % qw.block_size:
                raise ExportError(
                    f"input width {qw.k} is not a multiple of block_size {qw.block_size}: "
                    'set [quantize] block_minimum = "zero_points" for this model'
                )
            shape = [0] * (rank - 1) + [qw.k // qw.block_size, qw.block_size]
            blocks = self._node(
                "Reshape",
                [a, self._const(np.array(shape, np.int64), f"{a}.blocks{qw.block_size}.shape")],
                f"{a}.blocks{qw.block_size}",
            )
            self.block_sums[key] = self._node(
                "ReduceSum",
                [blocks, self._const(np.array([-1], np.int64), f"{a}.last_axis")],
                f"{a}.block_sums{qw.block_size}",
                keepdims=0,
            )
        return self.block_sums[key]

    def _tied_table(self, node) -> bool:
        return any(n.op_type == "Gather" and n.input[0] == node.input[1] for n in self.graph.node)

    def run(self) -> dict:
        for node in self.graph.node:
            weight = node.input[1] if len(node.input) > 1 and node.input[1] in self.weights else None
            if node.op_type == "MatMul" and weight and len(self.weights[weight].dims) == 2:
                self._matmul_nbits(node.input[0], node.output[0], weight, self._array(weight).T, self.bits, rank=3)
            elif node.op_type == "Gemm" and weight and len(node.input) == 2 and _attr(node, "transB", 0) == 1:
                # The tied LM head: its bits follow the embedding's, since both read one table.
                bits = self._embedding_bits() if self._tied_table(node) else self.bits
                self._matmul_nbits(node.input[0], node.output[0], weight, self._array(weight), bits, rank=2)
            elif (
                node.op_type == "Gather"
                and node.input[0] in self.weights
                and self.recipe.quantize_embedding
                and _attr(node, "axis", 0) == 0
            ):
                self._gather(node)
            else:
                if node.op_type in ("MatMul", "Gemm") and weight:
                    self.counts["float_matmuls_left"] += 1
                self.nodes.append(node)
        used = {i for n in self.nodes for i in n.input}
        kept = [init for init in self.graph.initializer if init.name in used]
        del self.graph.node[:]
        self.graph.node.extend(self.nodes)
        del self.graph.initializer[:]
        self.graph.initializer.extend(kept + self.new_inits)
        self.counts["shared_tied_embedding"] = any(
            n.op_type in ("GatherBlockQuantized", "Gather")
            and any(m.op_type == "MatMulNBits" and m.input[1] == n.input[0] for m in self.nodes)
            for n in self.nodes
        )
        return self.counts

    def _gather(self, node) -> None:
        table, ids, out = node.input[0], node.input[1], node.output[0]
        bits = self._embedding_bits()
        data, scales, zp, qw = self._quantized(table, self._array(table), bits)
        if qw.k % qw.block_size:
            raise ExportError(f"embedding width {qw.k} is not a multiple of block_size {qw.block_size}")
        rows, blocks = qw.scales.shape
        if zp is None and qw.zero_points is not None:  # an asymmetric table whose LM head runs on offsets
            zp = self._half_stored(qw.zero_points.reshape(-1), _stored_name(table, bits) + ".zero_points")
        if zp is None and not self.plain_gather:
            # GatherBlockQuantized reads the same bytes as the LM head's MatMulNBits; it wants
            # scales of the data's rank, a [V, blocks, 1] view folded by onnxruntime at load.
            scales3d = self._node(
                "Reshape", [scales, self._const(np.array([rows, blocks, 1], np.int64), out + ".s3")], out + ".scales3d"
            )
            picked = self._node(
                "GatherBlockQuantized",
                [data, ids, scales3d],
                out + ".blocks",
                domain=MS_DOMAIN,
                bits=bits,
                block_size=qw.block_size,
                gather_axis=0,
                quantize_axis=2,
            )
            self.counts["GatherBlockQuantized"] += 1
        else:
            # GatherBlockQuantized takes integer zero points only, and older runtimes lack it:
            # gather the rows and dequantize them with plain operators (a few rows a step, so cheap).
            picked = self._node("Gather", [data, ids], out + ".rows")
            if bits == 4:
                four = self._const(np.array(4, np.uint8), out + ".four")
                high = self._node("BitShift", [picked, four], out + ".high", direction="RIGHT")
                low = self._node(
                    "Sub",
                    [picked, self._node("BitShift", [high, four], out + ".high_up", direction="LEFT")],
                    out + ".low",
                )
                last = self._const(np.array([-1], np.int64), out + ".last")
                pairs = self._node(
                    "Concat",
                    [
                        self._node("Unsqueeze", [low, last], out + ".low1"),
                        self._node("Unsqueeze", [high, last], out + ".high1"),
                    ],
                    out + ".pairs",
                    axis=-1,
                )
                picked = self._node(
                    "Reshape",
                    [pairs, self._const(np.array([0, 0, blocks, qw.block_size], np.int64), out + ".qshape")],
                    out + ".q",
                )
            values = self._node("Cast", [picked], out + ".qf", to=1)
            last = self._const(np.array([-1], np.int64), out + ".axis")
            if zp is None:  # symmetric: the kernels' fixed zero point
                zero = self._const(np.array(1 << (bits - 1), np.float32), out + ".z")
            else:
                zero2d = self._node(
                    "Reshape", [zp, self._const(np.array([rows, blocks], np.int64), out + ".zshape")], out + ".zp2d"
                )
                zero = self._node("Unsqueeze", [self._node("Gather", [zero2d, ids], out + ".zrows"), last], out + ".z")
            scale = self._node("Unsqueeze", [self._node("Gather", [scales, ids], out + ".srows"), last], out + ".s")
            picked = self._node("Mul", [self._node("Sub", [values, zero], out + ".centred"), scale], out + ".blocks")
            self.counts["dequantized_gathers"] += 1
        self._node("Reshape", [picked, self._const(np.array([0, 0, qw.k], np.int64), out + ".flat")], out)


def _stored_name(weight: str, bits: int) -> str:
    """Prefix of the quantized tensors of `weight`: model.layers.0.mlp.up_proj.q4(.data, .scales, ...)."""
    return weight.removesuffix(".weight") + f".q{bits}"


def _attr(node, name: str, default):
    for attribute in node.attribute:
        if attribute.name == name:
            from onnx import helper

            return helper.get_attribute_value(attribute)
    return default
