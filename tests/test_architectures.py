"""Decoder families beyond Llama: each tiny random model (2 layers, hidden 64, the test tokenizer,
a sliding window of 16 where the family has one) is built into an fp32 bundle by `edge-slm build`
(whose validate stage checks logits and present key/values against torch), and the bundle's greedy
tokens for a prompt longer than the window must equal transformers' `generate`. Families with a
fused layout must get the fused graph; others the generic one, said in one line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import make_tokenizer

from edge_slm import runtime
from edge_slm.builder.pipeline import build
from edge_slm.core.errors import EdgeSlmError, ModelError
from edge_slm.core.targets import load_profile

NEW_TOKENS = 16
WINDOW = 16
PROMPT = "What is the capital of France? Paris is the answer, and Lyon is not. Small language models run"

# family -> (config class, its settings beyond the common ones, the graph the build must choose)
FAMILIES = {
    "llama-head24": ("LlamaConfig", {"head_dim": 24}, "fused"),
    "qwen3": ("Qwen3Config", {"head_dim": 16}, "fused"),
    "mistral": ("MistralConfig", {"sliding_window": WINDOW}, "fused"),
    "granite": (
        "GraniteConfig",
        {"embedding_multiplier": 6.0, "attention_multiplier": 0.2, "residual_multiplier": 0.5, "logits_scaling": 2.0},
        "fused",
    ),
    "gemma2": (
        "Gemma2Config",
        {
            "head_dim": 16,
            "query_pre_attn_scalar": 24,
            "sliding_window": WINDOW,
            "attn_logit_softcapping": 20.0,
            "final_logit_softcapping": 15.0,
        },
        "fused",
    ),
    "gemma3_text": (
        "Gemma3TextConfig",
        {
            "head_dim": 16,
            "query_pre_attn_scalar": 24,
            "sliding_window": WINDOW,
            "layer_types": ["sliding_attention", "full_attention"],
            "rope_local_base_freq": 10000.0,
            "rope_theta": 1000000.0,
        },
        "fused",
    ),
    # Heads of 32 (2 of them, 1 KV head) so that half of each is rotated: a width of 16.
    "gemma": ("GemmaConfig", {"head_dim": 16, "hidden_act": "gelu"}, "fused"),  # an early checkpoint's exact GELU
    "phi3": (
        "Phi3Config",
        {"num_attention_heads": 2, "num_key_value_heads": 1, "partial_rotary_factor": 0.5, "sliding_window": WINDOW},
        "fused",
    ),
    "olmo2": ("Olmo2Config", {}, "fused"),
    "smollm3": ("SmolLM3Config", {"no_rope_layers": [1, 0], "use_sliding_window": False}, "fused"),
    "gpt_neox": ("GPTNeoXConfig", {}, "generic"),
    "bloom": ("BloomConfig", {}, "generic"),  # ALiBi: optimum's graph takes no position_ids
}


def documented_nodes() -> dict[str, tuple[int, int]]:
    """docs/export.md's family table: model_type -> (nodes per layer, fixed nodes) of "A L + B"."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "export.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \|.*\| (\d+) L \+ (\d+) \|", text, flags=re.M)
    return {family: (int(per_layer), int(fixed)) for family, per_layer, fixed in rows}


DOCUMENTED_NODES = documented_nodes()


def test_docs_table_states_nodes_for_every_fused_family():
    fused = {family for family, (_, _, graph) in FAMILIES.items() if graph == "fused"} - {"llama-head24"}
    assert fused <= set(DOCUMENTED_NODES), fused - set(DOCUMENTED_NODES)


def make_family_model(directory, family: str, seed: int = 0, **overrides):
    """A tiny random model of `family` saved with the test tokenizer; returns (directory, model)."""
    import transformers
    from transformers import AutoModelForCausalLM

    config_class, settings, _ = FAMILIES[family]
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(directory)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    config = getattr(transformers, config_class)(**{**common, **settings, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # larger-than-init weights so that logits are not all near zero
        for param in model.parameters():
            param.mul_(4.0) if param.dim() > 1 else None
    model.save_pretrained(directory, safe_serialization=True)
    return directory, model, tokenizer


def reference_tokens(model, prompt_ids: list[int]) -> list[int]:
    """transformers' greedy continuation, without the EOS it stops on (as the runtime reports)."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
        )
    new = out[0, len(prompt_ids) :].tolist()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    return next((new[:i] for i, t in enumerate(new) if t in eos), new)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_builds_and_generates_as_transformers(family, tiny_profile, tmp_path):
    source, model, tokenizer = make_family_model(tmp_path / "model", family)
    prompt_ids = tokenizer(PROMPT).input_ids
    assert len(prompt_ids) > WINDOW
    lines = []
    manifest = build(str(source), load_profile(str(tiny_profile)), tmp_path / "bundle", echo=lines.append)
    expected_graph = FAMILIES[family][2]
    assert manifest["graph"]["kind"] == expected_graph
    assert manifest["validation"]["passed"] and manifest["validation"]["max_abs_diff"]["logits"] < 1e-3
    said = [line.strip() for line in lines if "generic graph" in line or "multiple of 16" in line]
    if expected_graph == "generic":
        assert said == [f"'{family}' has no fused layout: tracing optimum's generic graph instead"]
    elif family == "llama-head24":
        assert said == [
            "head size 24 is not a multiple of 16, which GroupQueryAttention's own rotary embedding needs: "
            "RotaryEmbedding nodes instead"
        ]
        assert manifest["graph"]["op_counts"]["RotaryEmbedding"] == 4
    else:
        assert said == []
    if family in DOCUMENTED_NODES:
        per_layer, fixed = DOCUMENTED_NODES[family]
        names = [
            n.name for n in onnx.load(str(tmp_path / "bundle" / "model.onnx"), load_external_data=False).graph.node
        ]
        assert sum(name.startswith("l1.") for name in names) == per_layer, "docs/export.md's nodes per layer"
        assert len(names) == per_layer * 2 + fixed, "docs/export.md's nodes, per layer L + fixed"
    bundle = runtime.load(tmp_path / "bundle")
    got = bundle.generate(prompt_ids, max_new_tokens=NEW_TOKENS)
    want = reference_tokens(model, prompt_ids)
    assert len(want) >= 8  # a continuation long enough to mean something
    assert got.token_ids == want


def test_several_eos_ids_stop_generation(tiny_profile, tmp_path):
    """generation_config lists two EOS ids: the bundle records both and stops on the second."""
    source, model, tokenizer = make_family_model(tmp_path / "model", "qwen3")
    prompt_ids = tokenizer(PROMPT).input_ids
    free_run = reference_tokens(model, prompt_ids)
    stop = free_run[4]
    assert stop not in free_run[:4]
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, stop]
    model.generation_config.save_pretrained(source)
    build(str(source), load_profile(str(tiny_profile)), tmp_path / "bundle", echo=lambda m: None)
    generation = json.loads((tmp_path / "bundle" / "generation.json").read_text())
    assert generation["eos_token_ids"] == [tokenizer.eos_token_id, stop]
    got = runtime.load(tmp_path / "bundle").generate(prompt_ids, max_new_tokens=NEW_TOKENS)
    assert got.token_ids == free_run[:4] == reference_tokens(model, prompt_ids)
    assert got.stop_reason == "eos"


def test_generic_graph_quantized_passes_the_gate(tmp_path, tiny_profile):
    """int8 through the generic graph: quantized, gated against its fp32 graph, run by the runtime."""
    source, model, tokenizer = make_family_model(tmp_path / "model", "gpt_neox")
    manifest = build(
        str(source), load_profile(str(tiny_profile)), tmp_path / "bundle", echo=lambda m: None, precision="int8"
    )
    assert manifest["graph"]["kind"] == "generic" and manifest["graph"]["kv_cache"]["shared_buffer"] is False
    assert manifest["quantization"]["counts"]["MatMulNBits"] > 0
    assert manifest["accuracy"]["passed"] is True
    bundle = runtime.load(tmp_path / "bundle")
    prompt_ids = tokenizer(PROMPT).input_ids
    assert len(bundle.generate(prompt_ids, max_new_tokens=4).token_ids) == 4
    scores = bundle.logprobs(prompt_ids)
    assert scores.shape == (len(prompt_ids) - 1, len(tokenizer)) and np.isfinite(scores).all()


def test_architecture_neither_path_takes_is_refused_in_one_line(tmp_path):
    from edge_slm.builder.decoder.load import load

    mamba = tmp_path / "mamba"
    mamba.mkdir()
    (mamba / "config.json").write_text('{"model_type": "mamba"}')
    with pytest.raises(ModelError) as refused:
        load(str(mamba))
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"{mamba}: architecture 'mamba' is not supported; supported: llama (Llama, SmolLM2")
    for family in ("qwen3", "gemma3_text", "phi3", "olmo2", "smollm3", "granite", "optimum's generic graph"):
        assert family in message


FUSED = [family for family, (_, _, graph) in FAMILIES.items() if graph == "fused"]


@pytest.mark.parametrize("family", FUSED)
def test_fused_family_with_separate_rotary_nodes_matches_torch(family, tmp_path):
    """The profile that lists onnxruntime 1.20 (RotaryEmbedding nodes before GroupQueryAttention):
    logits and every present key/value within fp32's tolerance for a prompt longer than the
    window and three decode steps; the window is on exactly the layers transformers slides."""
    import onnx

    from edge_slm.builder.decoder.architectures.base import layer_windows
    from edge_slm.builder.decoder.export import export
    from edge_slm.builder.decoder.validate import validate

    _, model, tokenizer = make_family_model(tmp_path / "model", family)
    exported = export(model, load_profile("jetson-orin"), tmp_path / "graph")
    assert exported.graph == "fused"
    prompt_ids = tokenizer(PROMPT).input_ids
    report = validate(exported.onnx_path, model, prompt_ids, decode_steps=3)
    assert report["passed"] and report["prompt_tokens"] > WINDOW
    nodes = onnx.load(str(exported.onnx_path), load_external_data=False).graph.node
    attention = [n for n in nodes if n.op_type == "GroupQueryAttention"]
    windows = [next((a.i for a in n.attribute if a.name == "local_window_size"), None) for n in attention]
    assert windows == layer_windows(model.config)
    rotary = sum(n.op_type == "RotaryEmbedding" for n in nodes)
    assert rotary == (2 if family == "smollm3" else 4)  # SmolLM3's second layer has no rotary embedding


def test_weight_the_fused_graph_has_no_place_for_falls_back_to_generic(tmp_path):
    """A Llama with MLP biases: the fused graph would drop them, so the build takes the generic
    graph (one line saying why) and it matches torch."""
    from edge_slm.builder.decoder.export import export
    from edge_slm.builder.decoder.validate import validate

    _, model, tokenizer = make_family_model(tmp_path / "model", "llama-head24", head_dim=16, mlp_bias=True)
    lines = []
    exported = export(model, load_profile("x86-laptop"), tmp_path / "graph", progress=lines.append)
    assert exported.graph == "generic"
    assert lines == [
        "the fused graph has no place for the weight 'model.layers.0.mlp.down_proj.bias': "
        "tracing optimum's generic graph instead"
    ]
    assert validate(exported.onnx_path, model, tokenizer(PROMPT).input_ids)["passed"]


def test_rotary_width_gqa_cannot_rotate_gets_rotary_nodes(tmp_path):
    """Phi-3 with heads of 16 and half of each rotated: GroupQueryAttention cannot rotate a width
    of 8, so the x86 profile's graph gets RotaryEmbedding nodes (said in one line) and matches torch."""
    import onnx

    from edge_slm.builder.decoder.export import export
    from edge_slm.builder.decoder.validate import validate

    _, model, tokenizer = make_family_model(tmp_path / "model", "phi3", num_attention_heads=4, num_key_value_heads=2)
    lines = []
    exported = export(model, load_profile("x86-laptop"), tmp_path / "graph", progress=lines.append)
    assert exported.graph == "fused" and lines[0] == (
        "rotary width 8 is not a multiple of 16, which GroupQueryAttention's own rotary embedding needs: "
        "RotaryEmbedding nodes instead"
    )
    nodes = onnx.load(str(exported.onnx_path), load_external_data=False).graph.node
    assert sum(n.op_type == "RotaryEmbedding" for n in nodes) == 4
    assert validate(exported.onnx_path, model, tokenizer(PROMPT).input_ids)["passed"]


# precision -> (bits, least top-1 agreement with the fp32 graph, largest mean KL): what random
# weights of these tiny models give with margin (measured: int8 top-1 0.955-1.0, KL <= 2e-4;
# int4 top-1 0.64-1.0, KL <= 0.015). Their own budgets are for trained models, hence
# --allow-accuracy-loss.
QUANTIZED = {"int8": (8, 0.93, 1e-3), "int4": (4, 0.55, 0.03)}


@pytest.mark.parametrize("precision", list(QUANTIZED))
@pytest.mark.parametrize("family", FUSED)
def test_fused_family_quantized_builds_and_generates(family, precision, tiny_profile, tmp_path):
    """int8 and int4 of every fused family: every MatMul (5 a layer and the tied head) becomes
    MatMulNBits, the gate measures it against the fp32 graph, and the runtime generates with it
    (int8 starts as transformers does)."""
    source, model, tokenizer = make_family_model(tmp_path / "model", family)
    manifest = build(
        str(source),
        load_profile(str(tiny_profile)),
        tmp_path / "bundle",
        echo=lambda m: None,
        precision=precision,
        allow_accuracy_loss=True,
    )
    bits, least_top1, most_kl = QUANTIZED[precision]
    counts = manifest["quantization"]["counts"]
    assert manifest["graph"]["kind"] == "fused" and manifest["precision"] == precision
    assert (counts["bits"], counts["MatMulNBits"], counts["float_matmuls_left"]) == (bits, 11, 0)
    accuracy = manifest["accuracy"]
    assert accuracy["tokens"] > 4000 and accuracy["top1_agreement"] >= least_top1 and accuracy["mean_kl"] <= most_kl
    prompt_ids = tokenizer(PROMPT).input_ids
    got = runtime.load(tmp_path / "bundle").generate(prompt_ids, max_new_tokens=NEW_TOKENS)
    assert len(got.token_ids) == NEW_TOKENS and got.stop_reason == "max_new_tokens"
    if precision == "int8":
        assert got.token_ids[:2] == reference_tokens(model, prompt_ids)[:2]


def _longrope_phi3(directory, switch: int):
    """A Phi-3.5-style model: longrope with distinct short and long factors, switching at `switch`."""
    width = 16 // 2  # heads of 32, half rotated: 8 frequencies
    scaling = {
        "type": "longrope",
        "short_factor": [1.0 + 0.1 * i for i in range(width)],
        "long_factor": [2.0 + 0.5 * i for i in range(width)],
    }
    return make_family_model(directory, "phi3", rope_scaling=scaling, original_max_position_embeddings=switch)


@pytest.mark.parametrize("prompt_words", [6, 40], ids=["short-table", "long-table"])
def test_longrope_tables_match_torch(prompt_words, tiny_profile, tmp_path):
    """Phi-3.5's longrope in a bundle whose context (128) passes original_max_position_embeddings
    (24): a Where picks the short-factor or long-factor table by the sequence length, as torch does;
    parity with RotaryEmbedding nodes, and greedy tokens equal transformers' on either side of the
    switch."""
    import onnx

    from edge_slm.builder.decoder.export import export
    from edge_slm.builder.decoder.validate import validate

    source, model, tokenizer = _longrope_phi3(tmp_path / "model", switch=24)
    prompt_ids = tokenizer(" ".join(PROMPT.split()[:prompt_words])).input_ids
    new = 24 - len(prompt_ids) if len(prompt_ids) < 24 else NEW_TOKENS
    assert new >= 8
    exported = export(model, load_profile("jetson-orin"), tmp_path / "graph")
    nodes = onnx.load(str(exported.onnx_path), load_external_data=False).graph.node
    assert [n.op_type for n in nodes].count("Where") == 2 and exported.graph == "fused"
    assert validate(exported.onnx_path, model, prompt_ids, decode_steps=3)["passed"]
    manifest = build(str(source), load_profile(str(tiny_profile)), tmp_path / "bundle", echo=lambda m: None)
    assert manifest["validation"]["passed"]
    assert json.loads((tmp_path / "bundle" / "generation.json").read_text())["rope_switch"] == 24
    got = runtime.load(tmp_path / "bundle").generate(prompt_ids, max_new_tokens=new)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=new, do_sample=False)
    assert got.token_ids == out[0, len(prompt_ids) :].tolist()[: len(got.token_ids)] and len(got.token_ids) >= 8


def test_longrope_sequence_growing_past_the_switch_is_encoded_again(tiny_profile, tmp_path):
    """A cached sequence growing past the switch: the runtime encodes it again whole with the long
    table, as transformers' Phi-3 does, so every step's logits equal torch's over the whole
    sequence; keeping the short-table keys instead would not."""
    source, model, tokenizer = _longrope_phi3(tmp_path / "model", switch=24)
    build(str(source), load_profile(str(tiny_profile)), tmp_path / "bundle", echo=lambda m: None)
    ids = tokenizer(PROMPT).input_ids[:30]
    with torch.no_grad():
        want = [model(torch.tensor([ids[:n]])).logits[0, -1].numpy() for n in range(20, 31)]

    def steps(session) -> list[np.ndarray]:
        session.reset()
        return [session.forward(ids[:20])] + [session.forward([t]) for t in ids[20:30]]

    session = runtime.load(tmp_path / "bundle").session
    assert session.rope_switch == 24
    assert max(float(np.abs(g - w).max()) for g, w in zip(steps(session), want)) < 1e-3
    session.rope_switch = None
    kept = steps(session)
    assert float(np.abs(kept[5] - want[5]).max()) > 1e-2  # 25 tokens: the short-table keys differ

    from edge_slm.runtime.batch import BatchDecoder

    model_ = runtime.load(tmp_path / "bundle")
    with pytest.raises(EdgeSlmError, match="changes past 24 tokens, which sequences decoded together cannot follow"):
        BatchDecoder(model_, slots=2)
    assert BatchDecoder(model_, slots=2, context=24).context == 24  # short of the switch: batched


def test_longrope_tables_differ(tmp_path):
    """The two tables are not the same (else the test above proves nothing)."""
    from edge_slm.builder.decoder.fused_graph import rotary_tables

    _, model, _ = _longrope_phi3(tmp_path / "model", switch=24)
    short, long = rotary_tables(model.model.rotary_emb, 24), rotary_tables(model.model.rotary_emb, 128)
    assert float(np.abs(short[0][1:] - long[0][1:24]).max()) > 0.1


@pytest.mark.parametrize("graph", ["fused", "generic"])
def test_rope_scaling_past_its_switch_is_refused_in_one_line(graph, tmp_path):
    """Dynamic NTK changes its frequencies at every length past the switch, and optimum's trace
    holds one longrope table: a context past the switch is refused before export."""
    from edge_slm.builder.decoder.export import export
    from edge_slm.core.errors import ExportError

    _, model, _ = make_family_model(tmp_path / "llama", "llama-head24", head_dim=16, max_position_embeddings=64)
    model.config.rope_scaling = {"rope_type": "dynamic", "factor": 2.0}
    profile = load_profile("x86-laptop")
    with pytest.raises(
        ExportError, match="^rope_scaling 'dynamic' changes the rotary frequencies past 64 positions and"
    ):
        export(model, profile, tmp_path / "graph")
    if graph == "generic":
        import dataclasses

        _, phi, _ = _longrope_phi3(tmp_path / "phi", switch=24)
        generic = dataclasses.replace(profile, export=dataclasses.replace(profile.export, graph="generic"))
        with pytest.raises(ExportError, match="past 24 positions in the generic graph and \\[export\\] context_length"):
            export(phi, generic, tmp_path / "generic")


def test_dynamic_rope_within_its_switch_matches_torch(tiny_profile, tmp_path):
    """Dynamic NTK up to max_position_embeddings is the plain table: the bundle (context 128 <= 512)
    matches torch."""
    source, model, tokenizer = make_family_model(
        tmp_path / "model", "llama-head24", head_dim=16, rope_scaling={"rope_type": "dynamic", "factor": 2.0}
    )
    manifest = build(str(source), load_profile(str(tiny_profile)), tmp_path / "bundle", echo=lambda m: None)
    assert manifest["validation"]["passed"] and manifest["graph"]["kind"] == "fused"
    prompt_ids = tokenizer(PROMPT).input_ids
    got = runtime.load(tmp_path / "bundle").generate(prompt_ids, max_new_tokens=NEW_TOKENS)
    assert got.token_ids == reference_tokens(model, prompt_ids)


@pytest.mark.parametrize("family", ["qwen3", "gemma3_text"])
def test_per_head_qk_norm_takes_the_fewest_nodes_the_oldest_runtime_runs(family, tmp_path):
    """Per-head q/k norms: one BranchwiseRMSNorm per projection for a profile whose runtimes are all
    1.31+ (x86-laptop), q and k normalized together by one norm with a broadcast scale for 1.24+
    (rpi5), a Reshape / norm / Reshape per projection for 1.20 (jetson-orin, RotaryEmbedding nodes too);
    each matches torch, and the bundle's min_onnxruntime names the runtime its nodes need."""
    from edge_slm.builder.decoder.export import export
    from edge_slm.builder.decoder.validate import validate
    from edge_slm.builder.manifest import min_onnxruntime

    _, model, tokenizer = make_family_model(tmp_path / "model", family)
    prompt_ids = tokenizer(PROMPT).input_ids
    per_layer = {}
    for target, ops, oldest in (
        ("x86-laptop", {"BranchwiseRMSNorm": 2, "Split": 1, "Reshape": 0}, "1.31.0"),
        ("rpi5", {"BranchwiseRMSNorm": 0, "Split": 2, "Reshape": 2}, "1.24.0"),
        ("jetson-orin", {"BranchwiseRMSNorm": 0, "Split": 1, "Reshape": 4}, "1.20.0"),
    ):
        exported = export(model, load_profile(target), tmp_path / target)
        assert exported.graph == "fused"
        assert validate(exported.onnx_path, model, prompt_ids, decode_steps=3)["passed"]
        layer = [n for n in onnx.load(str(exported.onnx_path), load_external_data=False).graph.node]
        layer = [n.op_type for n in layer if n.name.startswith("l1.")]
        assert {op: layer.count(op) for op in ops} == ops, target
        assert min_onnxruntime(exported.onnx_path) == oldest
        per_layer[target] = len(layer)
    assert per_layer["rpi5"] - per_layer["x86-laptop"] == 2
