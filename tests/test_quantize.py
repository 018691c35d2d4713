"""Weight-only quantization: block math, node counts, the tied table stored once, numerics of the
quantized graph, the accuracy gate and the manifest's quantization section."""

import dataclasses

import numpy as np
import onnx
import pytest
import torch
from conftest import greedy_without_cache, prompt_logits

from edge_slm.builder.decoder.export import export, load_torch_model
from edge_slm.builder.quantize.blockwise import PRESETS, dequantize_rows, quantize, quantize_rows
from edge_slm.core.errors import AccuracyBudgetError, ExportError
from edge_slm.core.targets import AccuracyBudget, Quantize, load_profile

LAYERS = 2


def q4_1_like(shape, seed=0, block=32):
    """Weights as a GGUF Q4_1 file stores them: per block of 32, min + k * d with k in 0..15."""
    rng = np.random.default_rng(seed)
    rows, cols = shape
    mins = rng.standard_normal((rows, cols // block, 1)) * 0.1
    steps = np.abs(rng.standard_normal((rows, cols // block, 1))) * 0.02 + 1e-3
    k = rng.integers(0, 16, (rows, cols // block, block))
    k[..., 0], k[..., -1] = 0, 15
    return (mins + k * steps).reshape(rows, cols).astype(np.float32)


def test_symmetric_int8_error_is_half_a_step():
    w = np.random.default_rng(1).standard_normal((48, 100)).astype(np.float32)  # K not a block multiple
    qw = quantize_rows(w, bits=8, block_size=32, symmetric=True)
    assert qw.data.shape == (48, 4, 32) and qw.scales.shape == (48, 4) and qw.zero_points is None
    error = np.abs(dequantize_rows(qw) - w).reshape(48, -1)
    step = np.repeat(qw.scales, 32, axis=1)[:, :100]
    assert np.all(error <= step / 2 + 1e-7)


def test_asymmetric_int4_reproduces_q4_1_exactly():
    w = q4_1_like((64, 128))
    qw = quantize_rows(w, bits=4, block_size=32, symmetric=False)
    assert qw.data.shape == (64, 4, 16)  # two 4-bit values a byte
    assert np.abs(dequantize_rows(qw) - w).max() < 1e-6
    sym = quantize_rows(w, bits=4, block_size=32, symmetric=True)
    assert np.abs(dequantize_rows(sym) - w).max() > 1e-3  # a symmetric grid cannot


def _ops(path):
    graph = onnx.load(str(path), load_external_data=False).graph
    ops = {}
    for node in graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return graph, ops


@pytest.fixture(scope="module")
def fp32_graph(tiny_llama, tmp_path_factory):
    return export(load_torch_model(tiny_llama), load_profile("x86-laptop"), tmp_path_factory.mktemp("fp32")).onnx_path


def test_int8_quantizes_every_matrix_and_stores_the_tied_table_once(fp32_graph, tmp_path):
    counts = quantize(fp32_graph, Quantize("int8", block_size=32), tmp_path)
    graph, ops = _ops(tmp_path / "model.onnx")
    assert ops["MatMulNBits"] == 5 * LAYERS + 1  # qkv, o, gate, up, down per layer + LM head
    assert ops["GatherBlockQuantized"] == 1
    assert "MatMul" not in ops and "Gemm" not in ops
    assert counts == {
        "MatMulNBits": 11,
        "GatherBlockQuantized": 1,
        "dequantized_gathers": 0,
        "float_matmuls_left": 0,
        "bits": 8,
        "embedding_bits": 8,
        "shared_tied_embedding": True,
    }
    head = next(n for n in graph.node if n.op_type == "MatMulNBits" and n.output[0] == "logits_2d")
    gather = next(n for n in graph.node if n.op_type == "GatherBlockQuantized")
    assert head.input[1] == gather.input[0]  # one table, read by both
    names = [i.name for i in graph.initializer]
    assert "model.embed_tokens.weight" not in names and len(names) == len(set(names))
    ids = [1, 40, 41, 42, 43, 44, 45]
    ref, got = prompt_logits(fp32_graph, ids), prompt_logits(tmp_path / "model.onnx", ids)
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 6 / 7


@pytest.mark.parametrize("block_minimum", ["offsets", "zero_points"])
def test_int4_asymmetric_is_lossless_on_q4_1_weights(tiny_llama, tmp_path, block_minimum):
    model = load_torch_model(tiny_llama)
    with torch.no_grad():  # make every matrix Q4_1-representable, as the default model's are
        for i, (name, param) in enumerate(model.named_parameters()):
            if param.dim() == 2:
                param.copy_(torch.from_numpy(q4_1_like(tuple(param.shape), seed=i)))
    fp32 = export(model, load_profile("x86-laptop"), tmp_path / "fp32").onnx_path
    recipe = Quantize("int4", block_size=32, symmetric=False, accuracy_level=0, block_minimum=block_minimum)
    counts = quantize(fp32, recipe, tmp_path / "q")
    assert counts["dequantized_gathers"] == 1 and counts["MatMulNBits"] == 11 and counts["shared_tied_embedding"]
    graph, ops = _ops(tmp_path / "q" / "model.onnx")
    inputs = {len(n.input) for n in graph.node if n.op_type == "MatMulNBits"}
    if block_minimum == "offsets":
        # The symmetric kernel (no zero-point input) plus one offset product per matrix, the block
        # sums computed once per activation: attention and MLP norms, attention output, gate*up, final norm.
        assert inputs == {3} and counts["block_offset_products"] == 11
        assert ops["ReduceSum"] == 1 + 4 * LAYERS + 1 and ops["MatMul"] == 11 and ops["Add"] == 11
    else:
        assert inputs == {4} and "block_offset_products" not in counts
    ids = [1, 40, 41, 42, 43, 44, 45]
    assert np.abs(prompt_logits(tmp_path / "q" / "model.onnx", ids) - prompt_logits(fp32, ids)).max() < 1e-4

    # 4 bits plus a float scale and minimum per 32 weights: 0.75 bytes a weight instead of 4.
    def matrix_bytes(path):
        graph = onnx.load(str(path)).graph
        return sum(
            onnx.numpy_helper.to_array(i).nbytes
            for i in graph.initializer
            if not i.name.startswith(("rotary", "const"))
        )

    assert matrix_bytes(tmp_path / "q" / "model.onnx") < 0.2 * matrix_bytes(fp32)


def test_embedding_bits_override(fp32_graph, tmp_path):
    counts = quantize(fp32_graph, Quantize("int4", block_size=32, symmetric=True, embedding_bits=8), tmp_path)
    graph, _ = _ops(tmp_path / "model.onnx")
    bits = {
        n.output[0]: next(a.i for a in n.attribute if a.name == "bits")
        for n in graph.node
        if n.op_type == "MatMulNBits"
    }
    assert bits["logits_2d"] == 8 and set(v for k, v in bits.items() if k != "logits_2d") == {4}
    assert counts["embedding_bits"] == 8


def _tight_profile(tiny_profile):
    profile = load_profile(str(tiny_profile))
    budget = dataclasses.replace(profile.budget, int4=AccuracyBudget(max_ppl_increase=0.0001, min_top1=0.999))
    quant = dataclasses.replace(profile.quantize, symmetric=True)
    return dataclasses.replace(profile, budget=budget, quantize=quant)


def test_gate_fails_an_over_quantized_model(tiny_llama, tiny_profile, tmp_path):
    from edge_slm.builder.pipeline import build

    out = tmp_path / "bundle"
    with pytest.raises(
        AccuracyBudgetError,
        match=r"the int4 model is outside its accuracy budget: .*top-1 agreement [0-9.]+% \(budget at least 99.9%\), "
        r"measured against fp32 on \d+ tokens of eval.txt",
    ):
        build(str(tiny_llama), _tight_profile(tiny_profile), out, echo=lambda m: None, precision="int4")
    assert not out.exists()
    manifest = build(
        str(tiny_llama),
        _tight_profile(tiny_profile),
        out,
        echo=lambda m: None,
        precision="int4",
        allow_accuracy_loss=True,
    )
    acc = manifest["accuracy"]
    assert acc["passed"] is False and acc["loss_allowed_by_user"] is True and acc["top1_agreement"] < 0.999
    assert manifest["precision"] == "int4" and manifest["quantization"]["recipe"]["precision"] == "int4"


def test_int8_bundle_manifest_and_runtime(tiny_llama, tiny_profile, tmp_path):
    from edge_slm import runtime
    from edge_slm.builder.pipeline import build

    lines = []
    manifest = build(
        str(tiny_llama), load_profile(str(tiny_profile)), tmp_path / "b", echo=lines.append, precision="int8"
    )
    q, acc = manifest["quantization"], manifest["accuracy"]
    # The progress lines are numbered from the stage list the manifest records.
    assert manifest["stages"] == ["load", "export", "validate", "precision", "gate", "tokenizer", "manifest"]
    assert [line.split("]")[0] for line in lines if line.startswith("[")] == [f"[{i}/7" for i in range(1, 8)]
    assert q["recipe"]["block_size"] == load_profile(str(tiny_profile)).quantize.block_size
    assert q["counts"]["MatMulNBits"] == 11 and q["counts"]["float_matmuls_left"] == 0
    # The int8 preset smooths on the shipped calibration text, recorded with its checksum.
    assert q["counts"]["smoothing"]["activations"] == 4 * 2 + 1 and q["calibration"]["file"] == "calibration.txt"
    assert len(q["calibration"]["sha256"]) == 64
    assert manifest["graph"]["op_counts"]["MatMulNBits"] == 11 and "Gemm" not in manifest["graph"]["op_counts"]
    assert acc["passed"] is True and acc["budget"] == {"max_ppl_increase": 0.015, "min_top1": 0.96}
    assert acc["tokens"] > 2000
    model = runtime.load(tmp_path / "b", threads=1)
    result = model.generate("The capital", max_new_tokens=5)
    want = greedy_without_cache(tmp_path / "b" / "model.onnx", model.encode("The capital"), 5, model.eos_ids)
    assert (result.token_ids, result.stop_reason) == want
    # The gate's top-1 and KL, computed again independently: torch's fp32 logits against the
    # int8 bundle's, window by window as the gate cuts the text.
    top1, kl = _top1_and_kl_against_torch(model, tiny_llama, window=128)
    assert abs(top1 - acc["top1_agreement"]) < 0.005, (top1, acc["top1_agreement"])
    assert abs(kl - acc["mean_kl"]) < 0.05 * acc["mean_kl"] + 1e-4, (kl, acc["mean_kl"])


def _top1_and_kl_against_torch(model, model_dir, window: int) -> tuple[float, float]:
    import torch
    from transformers import AutoModelForCausalLM

    from edge_slm.core.data import EVAL_TEXT

    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = model.encode(EVAL_TEXT.read_text(encoding="utf-8"))
    agree = scored = 0
    kl = 0.0
    for start in range(0, len(ids), window):
        chunk = ids[start : start + window]
        if len(chunk) < 2:
            continue
        with torch.no_grad():
            ref = torch.log_softmax(reference(torch.tensor([chunk])).logits[0, :-1].double(), -1).numpy()
        got = model.logprobs(chunk)
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        kl += float((np.exp(ref) * (ref - got)).sum())
        scored += len(chunk) - 1
    return agree / scored, kl / scored


def test_old_runtimes_get_plain_operators_with_the_same_numbers(tiny_llama, tmp_path):
    """onnxruntime before 1.24 lacks GatherBlockQuantized's `bits` and 8-bit MatMulNBits: a 4-bit
    bundle for it gathers and dequantizes the embedding with standard operators, to the same
    values; an 8-bit one is refused with the reason."""
    fp32_graph = export(load_torch_model(tiny_llama), load_profile("jetson-orin"), tmp_path / "fp32").onnx_path
    recipe = Quantize("int4", block_size=32, symmetric=True)
    quantize(fp32_graph, recipe, tmp_path / "new", oldest_onnxruntime="1.27.0")
    counts = quantize(fp32_graph, recipe, tmp_path / "old", oldest_onnxruntime="1.20.1")
    assert (
        counts["GatherBlockQuantized"] == 0 and counts["dequantized_gathers"] == 1 and counts["shared_tied_embedding"]
    )
    _, ops = _ops(tmp_path / "old" / "model.onnx")
    assert "GatherBlockQuantized" not in ops and ops["MatMulNBits"] == 11
    ids = [1, 40, 41, 42, 43, 44, 45]
    assert (
        np.abs(
            prompt_logits(tmp_path / "old" / "model.onnx", ids) - prompt_logits(tmp_path / "new" / "model.onnx", ids)
        ).max()
        < 1e-5
    )
    from edge_slm.builder.manifest import min_onnxruntime
    from edge_slm.core.errors import ExportError

    assert min_onnxruntime(tmp_path / "new" / "model.onnx") == "1.24.0"  # GatherBlockQuantized
    assert min_onnxruntime(tmp_path / "old" / "model.onnx") == "1.20.0"
    assert min_onnxruntime(fp32_graph) == "1.20.0"
    with pytest.raises(
        ExportError, match=r"8-bit MatMulNBits needs onnxruntime >= 1.24, but the profile lists onnxruntime 1.20.1"
    ):
        quantize(fp32_graph, Quantize("int8", block_size=32), tmp_path / "int8", oldest_onnxruntime="1.20.1")


def test_smoothing_for_int8_activation_blocks(tiny_llama, tiny_llama_shape, tmp_path):
    """A few outlier channels in the norm gains (as real models have) ruin int8 activation blocks;
    SmoothQuant folded before weight-only quantization moves them into the weights: the smoothed
    float graph computes the same logits, and its int8 bundle errs less than the unsmoothed one."""
    from transformers import AutoTokenizer

    from edge_slm.builder.quantize.smooth import BlockwiseError, smooth_graph
    from edge_slm.core.data import CALIBRATION_TEXT

    model = load_torch_model(tiny_llama)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[[3, 37]] *= 40.0
    fp32 = export(model, load_profile("x86-laptop"), tmp_path / "fp32").onnx_path
    info = tiny_llama_shape
    calibration = AutoTokenizer.from_pretrained(tiny_llama)(CALIBRATION_TEXT.read_text()).input_ids[:400]
    ids = [1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]
    ref = prompt_logits(fp32, ids)

    proto = onnx.load(str(fp32))
    stats = smooth_graph(fp32, proto, calibration, info, (0.5,), BlockwiseError(lambda name: 64))
    assert stats["smoothed"] == stats["activations"] - 1  # all but the LM head's (the tied table)
    onnx.save_model(proto, str(tmp_path / "smoothed.onnx"), save_as_external_data=True, location="w.data")
    assert np.abs(prompt_logits(tmp_path / "smoothed.onnx", ids) - ref).max() < 1e-4 * np.abs(ref).max()

    plain = Quantize("int8", block_size=64, block_size_overrides=("embed_tokens:32",))
    smoothed = dataclasses.replace(plain, smooth_alphas=(0.0, 0.25, 0.5, 0.75))
    quantize(fp32, plain, tmp_path / "plain")
    counts = quantize(fp32, smoothed, tmp_path / "smooth", calibration_ids=calibration, shape=info)
    assert counts["MatMulNBits"] == 5 * LAYERS + 1 and counts["smoothing"]["smoothed_activations"] >= 4
    assert counts["smoothing"]["calibration_tokens"] == 400
    graph, _ = _ops(tmp_path / "smooth" / "model.onnx")
    blocks = {
        n.output[0]: next(a.i for a in n.attribute if a.name == "block_size")
        for n in graph.node
        if n.op_type == "MatMulNBits"
    }
    assert blocks.pop("logits_2d") == 32 and set(blocks.values()) == {64}
    plain_error = np.abs(prompt_logits(tmp_path / "plain" / "model.onnx", ids) - ref).mean()
    smooth_error = np.abs(prompt_logits(tmp_path / "smooth" / "model.onnx", ids) - ref).mean()
    assert smooth_error < 0.5 * plain_error, (smooth_error, plain_error)
    with pytest.raises(ExportError, match="no calibration text"):
        quantize(fp32, smoothed, tmp_path / "none")


def test_prefill_graph_runs_prompts_and_shares_the_cache(tiny_llama, tiny_profile, tmp_path):
    """`prefill_accuracy_level`: a second graph over the same weight file; the runtime runs prompts
    through it and decode steps through the main graph, on one KV cache; scoring stays on the
    main graph."""
    from edge_slm import runtime
    from edge_slm.builder.pipeline import build

    profile = load_profile(str(tiny_profile))
    recipe = dataclasses.replace(PRESETS["int8"], prefill_accuracy_level=0)
    profile = dataclasses.replace(profile, quantize=recipe)
    manifest = build(str(tiny_llama), profile, tmp_path / "b", echo=lambda m: None)
    assert manifest["graph"]["prefill_file"] == "prefill.onnx" and "prefill.onnx" in manifest["files"]
    levels = {}
    for name in ("model.onnx", "prefill.onnx"):
        graph, _ = _ops(tmp_path / "b" / name)
        levels[name] = {
            next(a.i for a in n.attribute if a.name == "accuracy_level")
            for n in graph.node
            if n.op_type == "MatMulNBits"
        }
        assert {i.name for i in graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL}  # shared data
    assert levels == {"model.onnx": {4}, "prefill.onnx": {0}}
    assert not list((tmp_path / "b").glob("prefill.onnx.data"))  # the weights are on disk once

    model = runtime.load(tmp_path / "b", threads=1)
    session = model.session
    prompt, step = [1, 40, 41, 42, 43, 44, 45], 46
    first = session.forward(prompt)
    assert np.abs(first - prompt_logits(tmp_path / "b" / "prefill.onnx", prompt)[-1]).max() < 1e-5
    after = session.forward([step])  # the decode graph, reading the cache the prefill graph wrote
    full = prompt_logits(tmp_path / "b" / "prefill.onnx", prompt + [step])[-1]  # float kernels end to end
    assert np.abs(after - full).max() < 0.02 * np.abs(full).max() and after.argmax() == full.argmax()
    scored = session.logprobs(prompt)  # scoring: the main graph, as the accuracy gate measured it
    main = prompt_logits(tmp_path / "b" / "model.onnx", prompt)[:-1]
    main = main - main.max(-1, keepdims=True)
    main = main - np.log(np.exp(main).sum(-1, keepdims=True))
    assert np.abs(scored - main).max() < 1e-4
    assert len(model.generate("The capital", max_new_tokens=4).token_ids) <= 4
