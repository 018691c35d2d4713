"""core/manifest.py: the on-disk manifest parsed once into one typed manifest per family, and the
runtime, the server and the commands choosing their implementation by that type."""

import copy
import hashlib
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_slm.core.errors import BundleError
from edge_slm.core.manifest import (
    MANIFEST_TYPES,
    AccuracyLimits,
    DecoderManifest,
    EncoderManifest,
    TensorRTSettings,
)
from edge_slm.core.manifest_schema import RULES_OF, parse_manifest

SHA = hashlib.sha256(b"x").hexdigest()
PROFILE = {
    "name": "rpi5",
    "description": "Raspberry Pi 5",
    "device": {"arch": "aarch64", "cpu": "cortex-a76", "cores": 4, "ram_mb": 8192, "features": ["neon", "asimddp"]},
    "runtime": {
        "execution_providers": ["CPUExecutionProvider"],
        "threads": 4,
        "onnxruntime_versions": ["1.27.0", "1.32"],
        "tensorrt": None,
    },
    "export": {"graph": "fused", "opset": 17, "ir_version": 9, "context_length": 2048},
    "budget": {"max_peak_rss_mb": 900, "int8": {"max_ppl_increase": 0.015, "min_top1": 0.9}},
    "encoder": {"min_cosine": 0.995},
}

# A decoder manifest as the builder writes it today (builder/decoder/stages.py): no "family" key.
DECODER = {
    "schema_version": 1,
    "created": "2026-12-01T08:00:00+00:00",
    "target": "rpi5",
    "precision": "int8",
    "source": {"ref": "HuggingFaceTB/SmolLM2-135M-Instruct", "kind": "gguf", "sha256": SHA, "architecture": "llama"},
    "model": {
        "architecture": "LlamaForCausalLM",
        "model_type": "llama",
        "parameters": 134515008,
        "num_layers": 30,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_heads": 9,
        "num_kv_heads": 3,
        "head_dim": 64,
        "vocab_size": 49152,
        "context_length": 2048,
    },
    "graph": {
        "kind": "fused",
        "file": "model.onnx",
        "opset": {"ai.onnx": 17, "com.microsoft": 1},
        "ir_version": 9,
        "nodes": 345,
        "op_counts": {"GroupQueryAttention": 30, "MatMulNBits": 211},
        "kv_cache": {"layout": "batch,kv_heads,sequence,head_dim", "shared_buffer": True},
        "inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", "sequence", 49152]}],
        "prefill_file": "prefill.onnx",
    },
    "min_onnxruntime": "1.20.0",
    "generation": {"bos_token_id": 1, "eos_token_ids": [2], "add_bos": False},
    "profile": PROFILE,
    "stages": ["load", "export", "validate", "precision", "gate", "tokenizer", "manifest"],
    "validation": {"passed": True, "max_abs_diff": {"logits": 2e-5}},
    "pruning": None,
    "quantization": {"method": "weight-only-blockwise", "recipe": {}, "counts": {}},
    "accuracy": {"passed": True, "perplexity": 10.1},
    "versions": {"edge_slm": "0.1.0"},
    "files": {
        "model.onnx": {"sha256": SHA, "bytes": 1000},
        "prefill.onnx": {"sha256": SHA, "bytes": 900},
        "tokenizer.json": {"sha256": SHA, "bytes": 100},
    },
}

# An encoder manifest as builder/encoder/pipeline.py writes it.
ENCODER = {
    "schema_version": 1,
    "family": "encoder",
    "created": "2026-12-01T08:00:00+00:00",
    "target": "x86-laptop",
    "precision": "int8",
    "source": {"ref": "tiny-classifier", "kind": "hf-dir", "sha256": SHA},
    "model": {
        "architecture": "BertForSequenceClassification",
        "model_type": "bert",
        "parameters": 22713216,
        "task": "classification",
        "labels": ["lights", "music", "weather"],
        "normalize": False,
        "pooling": "cls",
        "num_layers": 6,
        "hidden_size": 384,
        "num_heads": 12,
        "vocab_size": 30522,
        "max_sequence_length": 256,
        "output_dim": 3,
    },
    "graph": {
        "kind": "encoder",
        "file": "model.onnx",
        "inputs": ["input_ids", "attention_mask", "token_type_ids"],
        "output": "logits",
        "opset": {"ai.onnx": 17},
        "ir_version": 9,
        "nodes": 120,
        "op_counts": {"MatMulInteger": 36},
        "fused": {"Attention": 6},
    },
    "min_onnxruntime": "1.17.0",
    "tokenizer": {"pad_token_id": 0, "lowercase": True},
    "profile": PROFILE,
    "stages": ["load", "export", "validate", "precision", "gate", "tokenizer", "manifest"],
    "validation": {"max_abs_diff": 3e-6, "tolerance": 1e-4},
    "quantization": {"method": "dynamic-int8"},
    "accuracy": None,
    "versions": {"edge_slm": "0.1.0"},
    "files": {"model.onnx": {"sha256": SHA, "bytes": 1000}, "tokenizer.json": {"sha256": SHA, "bytes": 100}},
}


def test_a_decoder_manifest_without_family_parses_to_a_decoder_manifest():
    manifest = parse_manifest(copy.deepcopy(DECODER), "manifest.json")
    assert type(manifest) is DecoderManifest and manifest.family == "decoder" and manifest.task == "generation"
    assert manifest.model.context_length == 2048 and manifest.model.num_kv_heads == 3 and manifest.model.head_dim == 64
    assert manifest.model.recorded["intermediate_size"] == 1536  # what the type does not name is kept
    assert manifest.graph.kind == "fused" and manifest.graph.file == "model.onnx"
    assert manifest.graph.prefill_file == "prefill.onnx" and manifest.graph.shared_kv_buffer is True
    assert manifest.source.kind == "gguf" and manifest.source.sha256 == SHA
    assert manifest.profile.name == "rpi5" and manifest.profile.runtime.threads == 4
    assert manifest.profile.runtime.execution_providers == ("CPUExecutionProvider",)
    assert manifest.profile.runtime.onnxruntime_versions == ("1.27.0", "1.32")
    assert manifest.profile.runtime.tensorrt is None
    assert manifest.profile.device.arch == "aarch64" and manifest.profile.device.features == ("neon", "asimddp")
    assert manifest.profile.budget("int8") == AccuracyLimits(max_ppl_increase=0.015, min_top1=0.9)
    assert manifest.profile.budget("int4") == AccuracyLimits()  # none recorded: no limit
    assert (
        manifest.profile.encoder_gate.min_cosine == 0.995 and manifest.profile.encoder_gate.min_label_agreement == 0.99
    )
    assert manifest.size_bytes == 2000 and manifest.files["prefill.onnx"].bytes == 900
    assert manifest.accuracy_passed and manifest.pruning == {} and manifest.validation["passed"] is True
    assert manifest.stages[-1] == "manifest" and manifest.min_onnxruntime == "1.20.0"
    assert manifest.raw == DECODER  # `inspect --json` prints what is on disk


def test_an_encoder_manifest_parses_to_an_encoder_manifest():
    manifest = parse_manifest(copy.deepcopy(ENCODER), "manifest.json")
    assert type(manifest) is EncoderManifest and manifest.family == "encoder"
    assert manifest.task == "classification" and manifest.model.labels == ("lights", "music", "weather")
    assert (
        manifest.graph.inputs == ("input_ids", "attention_mask", "token_type_ids") and manifest.graph.output == "logits"
    )
    assert manifest.tokenizer.pad_token_id == 0 and manifest.tokenizer.lowercase is True
    assert manifest.accuracy == {} and not manifest.accuracy_passed
    lines = manifest.summary_lines("b")
    assert lines[4].startswith("model        BertForSequenceClassification encoder, classification: 6 layers")
    assert "labels lights, music, weather" in lines[5]
    bad = copy.deepcopy(ENCODER)
    bad["graph"]["layer_norms"] = "separate"
    with pytest.raises(BundleError, match=r"graph.layer_norms.*fused or unfused"):
        parse_manifest(bad, "manifest.json")


def test_tensorrt_settings_take_the_recorded_table_with_defaults():
    raw = copy.deepcopy(DECODER)
    raw["profile"]["runtime"]["tensorrt"] = {"int8_enable": True, "max_prompt_tokens": 256}
    trt = parse_manifest(raw, "m").profile.runtime.tensorrt
    assert trt == TensorRTSettings(fp16_enable=True, int8_enable=True, max_prompt_tokens=256)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda m: m.__setitem__("family", "speech"),
            "manifest key 'family' must be decoder or encoder or seq2seq, got 'speech'",
        ),
        (lambda m: m["model"].pop("context_length"), "the manifest has no 'model.context_length' (a positive integer)"),
        (lambda m: m["graph"].pop("kv_cache"), "the manifest has no 'graph.kv_cache' (an object)"),
        (lambda m: m["profile"]["runtime"].__setitem__("threads", 0), "'profile.runtime.threads' must be a positive"),
    ],
)
def test_a_bad_manifest_is_one_bundle_error_naming_the_key(change, message):
    raw = copy.deepcopy(DECODER)
    change(raw)
    with pytest.raises(BundleError, match=re.escape(message)):
        parse_manifest(raw, "manifest.json")


def test_every_family_has_its_rules_runtime_engine_and_smoke_test():
    """A family added to MANIFEST_TYPES without its entry in each dispatch table fails here."""
    from edge_slm.commands.build import RUN_IT
    from edge_slm.harness.deploy import SMOKE_TESTS
    from edge_slm.runtime.model import RUNTIMES
    from edge_slm.serve.app import ENGINES

    types = set(MANIFEST_TYPES.values())
    assert set(RULES_OF) == set(MANIFEST_TYPES)
    for table in (RUNTIMES, ENGINES, SMOKE_TESTS, RUN_IT):
        assert set(table) == types
    assert {cls.family for cls in types} == set(MANIFEST_TYPES)


def test_the_build_summary_names_the_command_of_the_family():
    from edge_slm.commands.build import RUN_IT

    classifier = parse_manifest(copy.deepcopy(ENCODER), "m")
    embedder = copy.deepcopy(ENCODER)
    embedder["model"].update(task="embedding", output_dim=384, normalize=True, pooling="mean")
    embedder = parse_manifest(embedder, "m")
    decoder = parse_manifest(copy.deepcopy(DECODER), "m")
    assert RUN_IT[type(classifier)](classifier, "b") == 'edge-slm classify b "turn off the kitchen lights"'
    assert RUN_IT[type(embedder)](embedder, "b") == 'edge-slm embed b "turn off the kitchen lights"'
    assert RUN_IT[type(decoder)](decoder, "b") == 'edge-slm generate b "What is the capital of France?" --chat'


def test_bundles_built_by_the_fixtures_load_as_their_family(tiny_bundle, classifier_bundle):
    from edge_slm import runtime
    from edge_slm.core.bundle import read_manifest

    decoder, classifier = runtime.load(tiny_bundle, threads=1), runtime.load(classifier_bundle, threads=1)
    assert isinstance(read_manifest(tiny_bundle), DecoderManifest) and isinstance(decoder, runtime.Model)
    assert isinstance(decoder.manifest, DecoderManifest) and decoder.manifest.model.context_length == 128
    assert isinstance(read_manifest(classifier_bundle), EncoderManifest) and isinstance(classifier, runtime.Encoder)
    assert classifier.manifest.task == "classification" and classifier.labels == ["lights", "music"]
    assert len(decoder.generate("The capital of France is", max_new_tokens=3, temperature=0.0).token_ids) == 3
    assert classifier.classify(["turn off the lights"])[0].label in ("lights", "music")


_PATHS = [
    (),
    ("model",),
    ("graph",),
    ("graph", "kv_cache"),
    ("profile",),
    ("profile", "runtime"),
    ("profile", "device"),
    ("profile", "budget"),
    ("profile", "budget", "int8"),
    ("profile", "encoder"),
    ("source",),
    ("tokenizer",),
    ("files", "model.onnx"),
]
_KEYS = ["family", "name", "tensorrt", "threads", "onnxruntime_versions", "features", "arch", "labels", "stages"]
_KEYS += ["prefill_file", "min_top1", "min_cosine", "lowercase", "created", "ref", "sha256", "bytes", "accuracy"]


@settings(max_examples=150, deadline=None)
@given(
    base=st.sampled_from([DECODER, ENCODER]),
    path=st.sampled_from(_PATHS),
    key=st.sampled_from(_KEYS),
    value=st.one_of(
        st.none(), st.booleans(), st.integers(-2, 2**40), st.text(max_size=8), st.lists(st.integers(0, 3), max_size=3)
    ),
)
def test_a_mutated_manifest_is_typed_or_one_bundle_error(base, path, key, value):
    """Whatever a manifest from elsewhere holds, parsing it gives a typed manifest whose
    properties answer, or one BundleError line: never another exception."""
    raw = copy.deepcopy(base)
    section = raw
    for part in path:
        section = section.get(part) if isinstance(section, dict) else None
    if isinstance(section, dict):
        section[key] = value
    try:
        manifest = parse_manifest(raw, "manifest.json")
    except BundleError as exc:
        assert "\n" not in str(exc)
        return
    assert manifest.task in ("generation", "classification", "embedding") and manifest.size_bytes > 0
    assert isinstance(manifest.profile.budget("int8").min_top1, float)
    assert isinstance(manifest.profile.encoder_gate.min_cosine, float) and isinstance(manifest.profile.name, str)
    assert all(isinstance(f, str) for f in manifest.profile.device.features)
    trt = manifest.profile.runtime.tensorrt
    assert trt is None or (isinstance(trt.max_prompt_tokens, int) and isinstance(trt.engine_cache_path, str))
