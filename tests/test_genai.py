"""Interoperability: a decoder bundle carries genai_config.json naming onnxruntime-genai's model
type for its family, and onnxruntime-genai's own loop runs it to the same greedy tokens as
edge-slm's runtime (Llama and every other fused family, and a generic-graph bundle)."""

import json

import numpy as np
import onnxruntime_genai as og
import pytest

from edge_slm import runtime


def test_onnxruntime_genai_runs_the_bundle_to_the_same_greedy_tokens(tiny_bundle):
    config = json.loads((tiny_bundle / "genai_config.json").read_text())
    assert config["model"]["decoder"]["num_hidden_layers"] == 2 and config["search"]["past_present_share_buffer"]
    model = runtime.load(tiny_bundle, threads=1)
    for prompt in ("The capital of France is", "Small language models run on"):
        ids = model.encode(prompt)
        ours = model.generate(ids, max_new_tokens=12, temperature=0.0)
        genai = og.Model(str(tiny_bundle))
        params = og.GeneratorParams(genai)
        params.set_search_options(max_length=len(ids) + 12, do_sample=False)
        generator = og.Generator(genai, params)
        generator.append_tokens(np.array(ids, dtype=np.int32))
        while not generator.is_done():
            generator.generate_next_token()
        theirs = [int(t) for t in generator.get_sequence(0)[len(ids) :]]
        theirs = [t for t in theirs if t not in model.eos_ids][: len(ours.token_ids)]
        assert theirs == ours.token_ids and len(ours.token_ids) >= 1


def _genai_tokens(bundle, ids: list[int], new: int) -> list[int]:
    genai = og.Model(str(bundle))
    params = og.GeneratorParams(genai)
    params.set_search_options(max_length=len(ids) + new, do_sample=False)
    generator = og.Generator(genai, params)
    generator.append_tokens(np.array(ids, dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)[len(ids) :]]


# family -> onnxruntime-genai's model type in genai_config.json
GENAI_TYPES = {
    "qwen3": "qwen3",
    "gemma3_text": "gemma3_text",
    "gemma2": "gemma2",
    "gemma": "gemma",
    "phi3": "phi3",
    "mistral": "mistral",
    "granite": "granite",
    "smollm3": "smollm3",
    "olmo2": "olmo",
    "gpt_neox": "llama",  # the generic graph: genai's plain decoder with separate key/value buffers
}


@pytest.mark.parametrize("family", list(GENAI_TYPES))
def test_onnxruntime_genai_runs_other_families_to_the_same_greedy_tokens(family, tiny_profile, tmp_path):
    from test_architectures import make_family_model

    from edge_slm.builder.pipeline import build
    from edge_slm.core.targets import load_profile

    source, _, tokenizer = make_family_model(tmp_path / "model", family)
    build(str(source), load_profile(str(tiny_profile)), tmp_path / "bundle", echo=lambda m: None)
    config = json.loads((tmp_path / "bundle" / "genai_config.json").read_text())
    assert config["model"]["type"] == GENAI_TYPES[family]
    model = runtime.load(tmp_path / "bundle", threads=1)
    ids = model.encode("The capital of France is Paris. Small language models run")
    ours = model.generate(ids, max_new_tokens=12, temperature=0.0)
    theirs = [t for t in _genai_tokens(tmp_path / "bundle", ids, 12) if t not in model.eos_ids][: len(ours.token_ids)]
    assert theirs == ours.token_ids and len(ours.token_ids) >= 1


def test_onnxruntime_genai_refuses_the_olmo2_type(tiny_bundle, tmp_path):
    """Why an OLMo 2 bundle says "olmo": this onnxruntime-genai has no "olmo2" type."""
    import shutil

    bundle = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    config = json.loads((bundle / "genai_config.json").read_text())
    config["model"]["type"] = "olmo2"
    (bundle / "genai_config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="Unsupported model_type in config.json: olmo2"):
        og.Model(str(bundle))
