"""Interoperability: a decoder bundle carries genai_config.json, and onnxruntime-genai's own loop
runs it to the same greedy tokens as edge-slm's runtime."""

import json

import numpy as np
import onnxruntime_genai as og

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
