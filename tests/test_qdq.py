"""build/quantize/qdq.py and smooth.py: S8S8 QDQ int8 with static calibration for TensorRT on tiny
models: graph shape, per-token product error, SmoothQuant folding, numerics on the CPU provider,
and the --calibration option."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import onnx
from conftest import prompt_logits
from onnx import numpy_helper

from edge_slm.builder.quantize.qdq import quantize_qdq
from edge_slm.builder.quantize.smooth import Smoothing, fake_int8, per_tensor_error
from edge_slm.core.data import CALIBRATION_TEXT
from edge_slm.core.hashing import sha256_file
from edge_slm.core.targets import Quantize

LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 16
IDS = [1, 40, 41, 42, 43, 44, 45, 46, 47]


def _tokens(tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return tokenizer(CALIBRATION_TEXT.read_text()).input_ids


def _recipe(**changes) -> Quantize:
    """Static S8S8 int8 with every product quantized unless a test says otherwise."""
    base = Quantize("int8", int8_format="qdq", smooth_alphas=(0.0, 0.25, 0.5, 0.75), max_product_error=1.0)
    return dataclasses.replace(base, **changes)


def test_qdq_graph_is_s8s8_everywhere_with_the_tied_table_once(
    jetson_fp32_graph, tiny_llama, tiny_llama_shape, tmp_path
):
    info = tiny_llama_shape
    counts = quantize_qdq(jetson_fp32_graph, _recipe(), tmp_path, _tokens(tiny_llama), info)
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    ops = {}
    for node in graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    # 4 activations a layer (attention norm, attention output, MLP norm, MLP product) + the final norm;
    # 5 weights a layer + the tied embedding / LM head.
    assert ops["QuantizeLinear"] == 4 * LAYERS + 1 == counts["QuantizeLinear"]
    assert ops["DequantizeLinear"] == (4 * LAYERS + 1) + (5 * LAYERS + 1) == counts["DequantizeLinear"]
    assert counts["quantized_matmuls"] == 5 * LAYERS + 1 and counts["float_matmuls_left"] == 0
    producer = {o: n for n in graph.node for o in n.output}
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in (n for n in graph.node if n.op_type in ("MatMul", "Gemm")):
        assert [producer[i].op_type for i in node.input[:2]] == ["DequantizeLinear", "DequantizeLinear"], node.name
        weight_dq = producer[node.input[1]]
        q, zero = inits[weight_dq.input[0]], inits[weight_dq.input[2]]
        assert q.dtype == np.int8 and zero.dtype == np.int8 and not zero.any()  # S8, symmetric
        assert zero.shape == inits[weight_dq.input[1]].shape and zero.ndim == 1  # per output channel
        act_q = producer[producer[node.input[0]].input[0]]
        assert act_q.op_type == "QuantizeLinear" and inits[act_q.input[2]].dtype == np.int8
        assert inits[act_q.input[2]] == 0 and inits[act_q.input[1]].ndim == 0  # per-tensor, static
    gather = next(n for n in graph.node if n.op_type == "Gather" and n.input[1] == "input_ids")
    head = next(n for n in graph.node if n.op_type == "Gemm")
    assert gather.input[0] == head.input[1]  # the embedding and the LM head read one int8 table
    assert "model.embed_tokens.weight" not in inits
    float_bytes = sum(v.nbytes for k, v in inits.items() if v.dtype == np.float32 and v.ndim == 2 and "rotary" not in k)
    assert float_bytes == 0
    ids = _tokens(tiny_llama)[300:364]  # text like the calibration's, not the calibration tokens themselves
    ref, got = prompt_logits(jetson_fp32_graph, ids), prompt_logits(tmp_path / "model.onnx", ids)
    error = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    # Measured 0.126 and 84% on this random model (its x4 weights amplify noise through the layers);
    # the same graph with every activation left float is within 3%: the rest is int8 activations.
    assert error < 0.2 and (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.75

    # Products kept float stay float whole: fp16 weights behind a Cast, no Q/DQ on either input.
    mixed = quantize_qdq(
        jetson_fp32_graph, _recipe(keep_float=("*.gate_up",)), tmp_path / "mixed", _tokens(tiny_llama), info
    )
    assert mixed["quantized_matmuls"] == 4 * LAYERS + 1 and mixed["float_matmuls"] == mixed["fp16_weights"] == LAYERS
    assert mixed["QuantizeLinear"] == 3 * LAYERS + 1 and mixed["shared_embedding_gathers"] == 1
    graph = onnx.load(str(tmp_path / "mixed" / "model.onnx")).graph
    producer = {o: n for n in graph.node for o in n.output}
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    down = [n for n in graph.node if n.op_type == "MatMul" and n.input[0].endswith(".gate_up")]
    assert len(down) == LAYERS
    for node in down:
        cast = producer[node.input[1]]
        assert cast.op_type == "Cast" and inits[cast.input[0]].dtype == np.float16
    assert not any(i.endswith("down_proj.weight") for i in inits)  # no fp32 copy left behind
    float_too = prompt_logits(tmp_path / "mixed" / "model.onnx", ids)
    assert np.linalg.norm(float_too - ref) / np.linalg.norm(ref) < error  # fewer int8 products, less error
    quantize_qdq(jetson_fp32_graph, _recipe(keep_float=("*",)), tmp_path / "float", _tokens(tiny_llama), info)
    all_float = prompt_logits(tmp_path / "float" / "model.onnx", ids)
    assert np.linalg.norm(all_float - ref) / np.linalg.norm(ref) < 1e-3  # fp16 weights only


def test_product_error_is_per_token_so_a_massive_activation_cannot_hide_the_others():
    """The default model's layer-11 MLP product peaks at ~3,000 on a sequence's first token (median
    ~1.5): one int8 scale for that rounds every other token to zero. Measured as one norm over all
    tokens the loss hid behind the one big row and the product went int8: top-1 agreement 95.5%
    instead of 98.4% with it float."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 64)).astype(np.float32)
    x[0, 3] = 3000.0
    w = rng.normal(size=(64, 32)).astype(np.float32)
    ref = x @ w
    wiped = fake_int8(x, axis=None) @ fake_int8(w, axis=0)
    assert np.linalg.norm(wiped - ref) / np.linalg.norm(ref) < 0.05  # the old measure: 4%, looks fine
    assert per_tensor_error(x, w, ref, "w") > 0.9  # per token: the 255 ordinary tokens are lost
    x[0, 3] = 3.0
    assert per_tensor_error(x, w, x @ w, "w") < 0.05


def test_smoothing_folds_leave_the_function_unchanged(jetson_fp32_graph, tiny_llama, tiny_llama_shape, tmp_path):
    """Dividing activations by s and multiplying weights by s must not change the float model:
    norm gains, the up projection (MLP product) and the grouped value projection (attention output)."""
    from edge_slm.builder.quantize.smooth import calibration_chunks, capture_activations

    info = tiny_llama_shape
    proto = onnx.load(str(jetson_fp32_graph))
    weights = {
        i.name: numpy_helper.to_array(i).astype(np.float32)
        for i in proto.graph.initializer
        if i.data_type == onnx.TensorProto.FLOAT
    }
    products = [n for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    names = sorted({n.input[0] for n in products})
    captured = capture_activations(jetson_fp32_graph, names, calibration_chunks(_tokens(tiny_llama)[:200]), info)
    smoothing = Smoothing(proto.graph, weights, info, alphas=(0.75,))
    folded = {
        name: smoothing.apply(name, captured[name], [n for n in products if n.input[0] == name])[1] for name in names
    }
    assert folded == {name: 0.75 for name in names}  # every kind of producer could take its s
    assert any(n.endswith(".attn") for n in names) and any(n.endswith(".gate_up") for n in names)
    for init in proto.graph.initializer:
        if init.name in smoothing.changed:
            init.CopyFrom(numpy_helper.from_array(weights[init.name], init.name))
    assert len(smoothing.changed) == (2 + 5) * LAYERS  # two norm gains and five matrices a layer (up, qkv fold too)
    onnx.save_model(proto, str(tmp_path / "smoothed.onnx"), save_as_external_data=True, location="w.data")
    ref, got = prompt_logits(jetson_fp32_graph, IDS), prompt_logits(tmp_path / "smoothed.onnx", IDS)
    assert np.abs(got - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())


def test_calibration_option(tiny_llama, jetson_profile, tmp_path):
    cli = [
        sys.executable,
        "-m",
        "edge_slm.cli",
        "build",
        "--target",
        str(jetson_profile),
        "--model",
        str(tiny_llama),
        "--precision",
        "int8",
        "--allow-accuracy-loss",
    ]
    missing = subprocess.run(
        cli + ["--calibration", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert (
        missing.stderr.strip().splitlines()[-1].startswith("error: --calibration ") and "no such file" in missing.stderr
    )
    own = tmp_path / "mine.txt"
    own.write_text(CALIBRATION_TEXT.read_text()[:1500] + "\nMy own notes about sensors and batteries.\n" * 5)
    done = subprocess.run(
        cli + ["--calibration", str(own), "--out", str(tmp_path / "b")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    quant = manifest["quantization"]
    assert quant["method"] == "qdq-s8s8-static" and quant["calibration"] == {
        "file": "mine.txt",
        "sha256": sha256_file(own),
    }
    assert manifest["graph"]["op_counts"]["QuantizeLinear"] == quant["counts"]["QuantizeLinear"] > 0
    assert "MatMulNBits" not in manifest["graph"]["op_counts"]  # TensorRT gets QDQ, not onnxruntime's contrib op
    shown = subprocess.run(
        [sys.executable, "-m", "edge_slm.cli", "inspect", str(tmp_path / "b")], capture_output=True, text=True
    )
    assert "int8 S8S8 QDQ (TensorRT), static activation scales from mine.txt" in shown.stdout
