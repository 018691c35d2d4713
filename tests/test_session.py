"""runtime/session.py: the TensorRT provider options the runtime derives from the profile and the bundle."""

import dataclasses
import json

from edge_slm.core.bundle import MANIFEST
from edge_slm.core.manifest_schema import parse_manifest
from edge_slm.core.targets import load_profile
from edge_slm.runtime.session import provider_options


def test_tensorrt_options_come_from_the_profile_and_the_bundle(jetson_profile, tiny_bundle):
    raw = json.loads((tiny_bundle / MANIFEST).read_text())
    raw["precision"], raw["profile"] = "int8", json.loads(json.dumps(load_profile(str(jetson_profile)).to_dict()))
    raw["model"].update(num_layers=2, num_heads=3, num_kv_heads=3, head_dim=64, context_length=128)
    raw["files"]["model.onnx"]["sha256"] = "ab" * 32
    manifest = parse_manifest(raw, "manifest.json")
    trt, cpu = provider_options(["TensorrtExecutionProvider", "CPUExecutionProvider"], manifest)
    assert cpu == {}
    assert trt["trt_fp16_enable"] == "True" and trt["trt_int8_enable"] == "True"
    assert trt["trt_engine_cache_enable"] == "True" and trt["trt_engine_cache_path"].endswith("/tensorrt/" + "ab" * 8)
    assert trt["trt_profile_min_shapes"].startswith("input_ids:1x1,position_ids:1x1,attention_mask:1x1,")
    assert trt["trt_profile_max_shapes"].startswith("input_ids:1x512,position_ids:1x512,attention_mask:1x128,")
    assert trt["trt_profile_max_shapes"].endswith("past_key_values.1.value:1x3x128x64")
    assert trt["trt_profile_max_shapes"].count("past_key_values") == 4
    fp16 = provider_options(["TensorrtExecutionProvider"], dataclasses.replace(manifest, precision="fp16"))[0]
    assert fp16["trt_int8_enable"] == "False"  # an fp16 bundle must not ask TensorRT for int8


def test_a_prompt_skips_the_lm_head_for_all_but_its_last_position(tiny_bundle):
    """The first prompt runs with logits_to_keep = 1 (its cache copied into the shared buffers):
    the same last logits and the same greedy continuation as computing every position's logits."""
    import numpy as np

    from edge_slm import runtime

    fast, full = runtime.load(tiny_bundle, threads=1), runtime.load(tiny_bundle, threads=1)
    assert fast.session.keeps_logits
    full.session.keeps_logits = False  # the path every bundle took before: all positions
    prompt = fast.encode("The capital of France is Paris. The capital of Italy is")
    a, b = fast.session.forward(prompt), full.session.forward(prompt)
    assert a.shape == b.shape == (300,) and np.abs(a - b).max() < 1e-4
    assert fast.session.length == full.session.length == len(prompt)
    for _ in range(6):
        token = int(a.argmax())
        assert token == int(b.argmax())
        a, b = fast.session.forward([token]), full.session.forward([token])
        assert np.abs(a - b).max() < 1e-4
    greedy = fast.generate(prompt, max_new_tokens=10, temperature=0.0).token_ids
    assert greedy == full.generate(prompt, max_new_tokens=10, temperature=0.0).token_ids
