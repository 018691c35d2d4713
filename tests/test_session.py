"""runtime/session.py: the TensorRT provider options the runtime derives from the profile and the bundle."""

from edge_slm.core.targets import load_profile
from edge_slm.runtime.session import provider_options


def test_tensorrt_options_come_from_the_profile_and_the_bundle(jetson_profile):
    profile = load_profile(str(jetson_profile))
    manifest = {
        "precision": "int8",
        "profile": profile.to_dict(),
        "model": {"num_layers": 2, "num_kv_heads": 3, "head_dim": 64, "context_length": 128},
        "files": {"model.onnx": {"sha256": "ab" * 32}},
    }
    trt, cpu = provider_options(["TensorrtExecutionProvider", "CPUExecutionProvider"], manifest)
    assert cpu == {}
    assert trt["trt_fp16_enable"] == "True" and trt["trt_int8_enable"] == "True"
    assert trt["trt_engine_cache_enable"] == "True" and trt["trt_engine_cache_path"].endswith("/tensorrt/" + "ab" * 8)
    assert trt["trt_profile_min_shapes"].startswith("input_ids:1x1,position_ids:1x1,attention_mask:1x1,")
    assert trt["trt_profile_max_shapes"].startswith("input_ids:1x512,position_ids:1x512,attention_mask:1x128,")
    assert trt["trt_profile_max_shapes"].endswith("past_key_values.1.value:1x3x128x64")
    assert trt["trt_profile_max_shapes"].count("past_key_values") == 4
    fp16 = provider_options(["TensorrtExecutionProvider"], {**manifest, "precision": "fp16"})[0]
    assert fp16["trt_int8_enable"] == "False"  # an fp16 bundle must not ask TensorRT for int8
