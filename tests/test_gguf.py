"""GGUF in: `edge-slm build --model model.gguf` for the families transformers reads from GGUF.

Each tiny random model of tests/test_architectures.py is written to an F32 GGUF file here the way
llama.cpp's convert_hf_to_gguf.py writes it (gguf-py's tensor names; Llama's q/k rows permuted for
its rotary layout; Gemma's norms stored as 1 + weight; the family's hyperparameters as metadata;
the BPE vocabulary and merges as tokenizer metadata), then built into an fp32 bundle from the GGUF
and from the Hugging Face folder: both bundles' logits must agree."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_model, prompt_logits
from test_architectures import PROMPT, make_family_model

from edge_slm.builder.pipeline import build
from edge_slm.core.errors import ModelError
from edge_slm.core.targets import load_profile

# family -> (GGUF architecture, settings the GGUF can carry in place of the test family's own)
GGUF_FAMILIES = {
    "llama-head24": ("llama", {"head_dim": 16}),
    # llama.cpp writes Mistral as llama (no window), and transformers reads it back as Llama
    "mistral": ("llama", {"sliding_window": None}),
    "qwen2": ("qwen2", {}),  # q/k/v biases (conftest's make_model)
    "qwen3": ("qwen3", {}),
    "phi3": ("phi3", {"num_attention_heads": 4, "num_key_value_heads": 2, "sliding_window": None}),
    # query_pre_attn_scalar and the 5:1 layer pattern are not in the file: transformers' defaults
    "gemma2": ("gemma2", {"query_pre_attn_scalar": 256}),
    "gemma3_text": ("gemma3", {"query_pre_attn_scalar": 256, "layer_types": None, "rope_local_base_freq": 10000.0}),
}


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: rotary halves interleaved, as ggml's rope wants."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def write_gguf(model, tokenizer_dir, path, arch: str, name: str) -> None:
    import gguf

    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name.capitalize() + " tiny")  # as convert_hf_to_gguf.py names it
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(int(head_dim * getattr(config, "partial_rotary_factor", 1.0)))
    if arch.startswith("gemma"):
        writer.add_sliding_window(config.sliding_window)
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    _add_vocabulary(writer, tokenizer_dir)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        data = tensor.detach().float().numpy()
        if arch == "llama" and hf_name.endswith("q_proj.weight"):
            data = _permute(data, config.num_attention_heads)
        elif arch == "llama" and hf_name.endswith("k_proj.weight"):
            data = _permute(data, config.num_key_value_heads)
        elif arch.startswith("gemma") and hf_name.endswith("norm.weight"):
            data = data + 1
        writer.add_tensor(names.get_name(hf_name, try_suffixes=(".weight", ".bias")), np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_vocabulary(writer, tokenizer_dir) -> None:
    """The test tokenizer's byte-level BPE as llama.cpp's "gpt2" tokenizer metadata."""
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = dict(spec["model"]["vocab"])
    for added in spec["added_tokens"]:
        vocab[added["content"]] = added["id"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda item: item[1])]
    special = {a["content"] for a in spec["added_tokens"] if a["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])  # CONTROL / NORMAL
    writer.add_token_scores([-float(i) for i in range(len(tokens))])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab["<|im_start|>"])
    writer.add_eos_token_id(vocab["<|im_end|>"])
    writer.add_unk_token_id(vocab["<|endoftext|>"])
    writer.add_pad_token_id(vocab["<|im_end|>"])
    writer.add_add_bos_token(False)


@pytest.mark.parametrize("family", list(GGUF_FAMILIES))
def test_gguf_builds_as_the_hf_folder(family, tiny_profile, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_SLM_CACHE", str(tmp_path / "cache"))
    arch, settings = GGUF_FAMILIES[family]
    if family == "qwen2":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source = make_model(tmp_path / "model", "qwen2")
        model, tokenizer = AutoModelForCausalLM.from_pretrained(source).eval(), AutoTokenizer.from_pretrained(source)
    else:
        source, model, tokenizer = make_family_model(tmp_path / "model", family, **settings)
    gguf_path = tmp_path / "gguf" / f"{family}.gguf"
    gguf_path.parent.mkdir()
    write_gguf(model, source, gguf_path, arch, name=family)
    profile = load_profile(str(tiny_profile))
    from_hf = build(str(source), profile, tmp_path / "hf-bundle", echo=lambda m: None)
    lines = []
    from_gguf = build(str(gguf_path), profile, tmp_path / "gguf-bundle", echo=lines.append)
    assert any("dequantizing" in line for line in lines)
    read_as = {"llama-head24": "llama", "mistral": "llama"}.get(family, family)
    assert from_gguf["source"]["kind"] == "gguf" and from_gguf["source"]["architecture"] == read_as
    assert from_gguf["graph"]["kind"] == "fused" and from_gguf["validation"]["passed"]
    for manifest in (from_gguf, from_hf):
        manifest["model"].pop("architecture")
    eps = from_gguf["model"].pop("rms_norm_eps"), from_hf["model"].pop("rms_norm_eps")
    assert from_gguf["model"] == from_hf["model"] and eps[0] == pytest.approx(eps[1], rel=1e-6)  # GGUF: float32
    ids = tokenizer(PROMPT).input_ids
    ours = prompt_logits(tmp_path / "gguf-bundle" / "model.onnx", ids)
    theirs = prompt_logits(tmp_path / "hf-bundle" / "model.onnx", ids)
    assert ours.shape == (len(ids), len(tokenizer)) and float(np.abs(ours - theirs).max()) < 1e-4


@pytest.mark.parametrize("arch", ["gemma", "olmo2", "granite"])
def test_gguf_architecture_transformers_cannot_read_is_refused_in_one_line(arch, tmp_path):
    import gguf

    from edge_slm.builder.decoder.load import load

    path = tmp_path / f"{arch}.gguf"
    writer = gguf.GGUFWriter(str(path), arch)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with pytest.raises(ModelError) as refused:
        load(str(path))
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{path}: transformers cannot read '{arch}' from GGUF")
    assert "gemma3" in message and "qwen3" in message and "phi3" in message
