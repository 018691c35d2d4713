"""build/quantize/fp16.py: the Jetson's fp16 bundle for the CUDA provider: weight and KV cache types,
accuracy against fp32 and the runtime on the CPU provider."""

import numpy as np
import onnx
from conftest import greedy_without_cache, prompt_logits

from edge_slm.builder.decoder.export import export, load_torch_model
from edge_slm.core.targets import load_profile

LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 16
IDS = [1, 40, 41, 42, 43, 44, 45, 46, 47]


def test_fp16_bundle_types_accuracy_and_runtime(tiny_llama, jetson_profile, tmp_path):
    from edge_slm import runtime
    from edge_slm.builder.pipeline import build

    manifest = build(str(tiny_llama), load_profile(str(jetson_profile)), tmp_path / "b", echo=lambda m: None)
    assert manifest["precision"] == "fp16" and manifest["quantization"]["method"] == "fp16"
    graph = onnx.load(str(tmp_path / "b" / "model.onnx"), load_external_data=False).graph
    types = {i.data_type for i in graph.initializer} - {onnx.TensorProto.INT64}
    assert types == {onnx.TensorProto.FLOAT16}  # no float32 weight left
    signature = {v["name"]: v["dtype"] for v in manifest["graph"]["inputs"] + manifest["graph"]["outputs"]}
    assert signature["past_key_values.0.key"] == "float16" and signature["present.1.value"] == "float16"
    assert signature["logits"] == "float32"
    assert manifest["graph"]["op_counts"]["Cast"] == 2 + 1  # the graph's two int casts + logits to float32
    acc = manifest["accuracy"]
    assert acc["passed"] is True and acc["budget"]["max_ppl_increase"] == 0.001 and acc["ppl_increase"] < 0.001
    assert acc["top1_agreement"] > 0.97
    # Numerics against the fp32 graph on the CPU provider: fp16 rounding only.
    got = prompt_logits(tmp_path / "b" / "model.onnx", IDS, dtype=np.float16)
    ref = prompt_logits(
        export(load_torch_model(tiny_llama), load_profile(str(jetson_profile)), tmp_path / "ref").onnx_path, IDS
    )
    assert np.abs(got - ref).max() < 2e-2 * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    model = runtime.load(tmp_path / "b", threads=1)
    assert model.session.kv_dtype == np.float16
    cached = model.generate("The capital", max_new_tokens=8)
    want = greedy_without_cache(
        tmp_path / "b" / "model.onnx", model.encode("The capital"), 8, model.eos_ids, np.float16
    )
    assert (cached.token_ids, cached.stop_reason) == want
