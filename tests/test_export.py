"""Export parity against torch (prefill and decode with past), node counts of the fused graph,
the generic fallback, and refusal of unsupported architectures."""

import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edge_slm.builder.decoder.export import export, load_torch_model
from edge_slm.builder.decoder.validate import Tolerance, validate
from edge_slm.core.errors import ParityError
from edge_slm.core.targets import load_profile

PROMPT = [1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49]
FP32_TOL = Tolerance.for_precision("fp32")
SMOLLM2_LAYERS = 30


def documented_node_counts() -> list[tuple[int, int]]:
    """docs/export.md's "N nodes (A a layer + B)" for SmolLM2-135M, as (A, B): the fused graph, then
    the one with separate RotaryEmbedding nodes. Each N must be A * 30 + B; the tests hold the tiny
    graphs to the same A and B, so the doc's numbers are the tested ones."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "export.md").read_text()
    found = [tuple(map(int, m)) for m in re.findall(r"(\d+) nodes\s+\((\d+) a layer \+ (\d+)\)", text)]
    assert len(found) == 2, f"docs/export.md should state two 'N nodes (A a layer + B)' counts, found {found}"
    for total, per_layer, fixed in found:
        assert total == per_layer * SMOLLM2_LAYERS + fixed, f"docs/export.md: {total} != {per_layer} * 30 + {fixed}"
    return [(per_layer, fixed) for _, per_layer, fixed in found]


def _run_steps(onnx_path, model, prompt, steps):
    """Prefill then `steps` single-token decodes on both sides; return per-step max diffs."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    cfg = model.config
    past_names = [i.name for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    assert len(past_names) == 2 * cfg.num_hidden_layers
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    past = [np.zeros((1, cfg.num_key_value_heads, 0, head_dim), np.float32)] * len(past_names)
    ids, total, cache, diffs = np.array([prompt]), 0, None, []
    for _ in range(steps + 1):
        feed = {
            "input_ids": ids,
            "attention_mask": np.ones((1, total + ids.shape[1]), np.int64),
            "position_ids": np.arange(total, total + ids.shape[1])[None],
            **dict(zip(past_names, past)),
        }
        out = session.run(None, feed)
        with torch.no_grad():
            ref = model(torch.from_numpy(ids), past_key_values=cache, use_cache=True)
        cache = ref.past_key_values
        assert out[0].shape == tuple(ref.logits.shape)
        assert float(ref.logits.std()) > 0.1  # parity on near-zero logits would prove nothing
        keys = [layer.keys.numpy() for layer in cache.layers]
        diffs.append(
            (
                float(np.abs(out[0] - ref.logits.numpy()).max()),
                max(float(np.abs(out[1 + 2 * i] - k).max()) for i, k in enumerate(keys)),
            )
        )
        total += ids.shape[1]
        past = out[1:]
        ids = np.array([[int(ref.logits[0, -1].argmax())]])
    return diffs


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_fused_graph_matches_torch_prefill_and_decode(fixture, request, tmp_path):
    model = load_torch_model(request.getfixturevalue(fixture))
    exported = export(model, load_profile("x86-laptop"), tmp_path)
    diffs = _run_steps(exported.onnx_path, model, PROMPT, steps=8)
    for logits_diff, key_diff in diffs:
        assert logits_diff < FP32_TOL.logits
        assert key_diff < FP32_TOL.present
    # Present shapes grow by one per decode step: prompt 11 + 8 steps = 19 cached positions.
    assert len(diffs) == 9


def test_fused_node_counts(tiny_llama, tiny_qwen2, tmp_path):
    layers = 2
    ops = {}
    graph = onnx.load(
        str(export(load_torch_model(tiny_llama), load_profile("x86-laptop"), tmp_path / "l").onnx_path),
        load_external_data=False,
    ).graph
    for node in graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    per_layer, fixed = documented_node_counts()[0]
    assert (per_layer, fixed) == (11, 15) and len(graph.node) == per_layer * layers + fixed
    assert ops["Slice"] == 1 and ops["Neg"] == 1  # logits_to_keep: the LM head reads the kept positions only
    assert ops["GroupQueryAttention"] == layers
    assert "RotaryEmbedding" not in ops and "Split" not in ops  # rotary inside GroupQueryAttention
    assert ops["SkipSimplifiedLayerNormalization"] == 2 * layers  # 2L-1 inside, plus the final norm
    assert ops["MatMul"] == 5 * layers  # qkv, o, gate, up, down; the tied LM head is a Gemm
    assert ops["Gemm"] == 1
    # The tied embedding is stored once and read by both the Gather and the LM head Gemm.
    embed = [i for i in graph.initializer if i.dims == [graph.output[0].type.tensor_type.shape.dim[2].dim_value, 64]]
    assert len(embed) == 1
    qwen = onnx.load(
        str(export(load_torch_model(tiny_qwen2), load_profile("x86-laptop"), tmp_path / "q").onnx_path),
        load_external_data=False,
    ).graph
    assert sum(n.op_type == "Add" for n in qwen.node) == layers  # q/k/v biases, one packed Add a layer
    assert sum(n.op_type == "Gemm" for n in qwen.node) == 0  # untied head: a plain MatMul


def test_external_data_and_signature(tiny_llama, tmp_path):
    exported = export(load_torch_model(tiny_llama), load_profile("x86-laptop"), tmp_path)
    assert (tmp_path / "model.onnx.data").stat().st_size > (tmp_path / "model.onnx").stat().st_size
    proto = onnx.load(str(exported.onnx_path), load_external_data=False)
    assert proto.ir_version == 8
    assert {o.domain: o.version for o in proto.opset_import}[""] == 17
    names = [i.name for i in proto.graph.input]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names[3:] == [
        "past_key_values.0.key",
        "past_key_values.0.value",
        "past_key_values.1.key",
        "past_key_values.1.value",
        "logits_to_keep",  # with a default (an initializer of that name): callers may leave it out
    ]
    dims = [d.dim_param for d in proto.graph.input[3].type.tensor_type.shape.dim]
    assert dims[0] == "batch" and dims[2] == "past_sequence"


def test_generic_fallback_matches_torch(tiny_llama, tmp_path):
    from edge_slm.core.targets import profile_from_dict

    raw = load_profile("x86-laptop").to_dict()
    raw["export"]["graph"] = "generic"
    model = load_torch_model(tiny_llama)
    exported = export(model, profile_from_dict(raw), tmp_path)
    assert exported.graph == "generic"
    for logits_diff, key_diff in _run_steps(exported.onnx_path, model, PROMPT, steps=3):
        assert logits_diff < FP32_TOL.logits and key_diff < FP32_TOL.present


def test_parity_miss_names_output_and_difference(tiny_llama, tmp_path):
    model = load_torch_model(tiny_llama)
    exported = export(model, load_profile("x86-laptop"), tmp_path)
    with torch.no_grad():  # the graph now disagrees with the model it is checked against
        model.model.layers[1].mlp.down_proj.weight.mul_(1.5)
    with pytest.raises(
        ParityError, match=r"output 'logits' differs from torch by [0-9.e+-]+ at prefill \(tolerance 0.001 for fp32\)"
    ):
        validate(exported.onnx_path, model, PROMPT)


def test_validation_report_numbers(tiny_llama, tmp_path):
    model = load_torch_model(tiny_llama)
    exported = export(model, load_profile("x86-laptop"), tmp_path)
    report = validate(exported.onnx_path, model, PROMPT, decode_steps=3)
    assert report["passed"] and [s["phase"] for s in report["steps"]] == ["prefill"] + ["decode"] * 3
    assert report["steps"][0]["tokens"] == len(PROMPT)
    assert 0 <= report["max_abs_diff"]["logits"] < 1e-4


def test_profiles_with_old_runtimes_get_separate_rotary_nodes(tiny_llama, tmp_path):
    """onnxruntime 1.20 takes no position_ids in GroupQueryAttention: RotaryEmbedding nodes instead,
    the same numbers."""
    from edge_slm.builder.manifest import min_onnxruntime

    profile = load_profile("jetson-orin")  # lists onnxruntime 1.20.0
    model = load_torch_model(tiny_llama)
    exported = export(model, profile, tmp_path)
    graph, ops = onnx.load(str(exported.onnx_path), load_external_data=False).graph, {}
    for node in graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    (_, fused_fixed), (per_layer, fixed) = documented_node_counts()
    assert fixed == fused_fixed  # the rotary nodes are per layer
    assert len(graph.node) == per_layer * 2 + fixed and ops["RotaryEmbedding"] == 4 and ops["Split"] == 2
    assert min_onnxruntime(exported.onnx_path) == "1.20.0"
    for logits_diff, key_diff in _run_steps(exported.onnx_path, model, PROMPT, steps=4):
        assert logits_diff < FP32_TOL.logits and key_diff < FP32_TOL.present
    newer = export(model, load_profile("x86-laptop"), tmp_path / "new")
    assert min_onnxruntime(newer.onnx_path) == "1.24.0"


def test_logits_to_keep_gives_the_last_rows_of_the_full_logits(tiny_llama, tmp_path):
    """Generation asks the LM head for the last position only; it must be the same row as the
    one computed with every position (the input's default, 0, as other runtimes call it)."""
    import numpy as np
    import onnxruntime as ort

    path = export(load_torch_model(tiny_llama), load_profile("x86-laptop"), tmp_path).onnx_path
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_overridable_initializers()] == ["logits_to_keep"]
    ids = np.array([PROMPT], dtype=np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(ids.shape[1])[None]}
    for i in range(2):
        for kind in ("key", "value"):
            feed[f"past_key_values.{i}.{kind}"] = np.zeros((1, 2, 0, 16), np.float32)
    every = session.run(["logits"], feed)[0]
    last = session.run(["logits"], {**feed, "logits_to_keep": np.array([1])})[0]
    three = session.run(["logits"], {**feed, "logits_to_keep": np.array([3])})[0]
    assert every.shape == (1, len(PROMPT), 300) and last.shape == (1, 1, 300) and three.shape == (1, 3, 300)
    assert np.abs(last[0, -1] - every[0, -1]).max() < 1e-5 and np.abs(three[0] - every[0, -3:]).max() < 1e-5
