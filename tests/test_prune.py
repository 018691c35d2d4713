"""Structured pruning and recovery on tiny models: the config stays loadable and exportable, the
scores follow activations (not weight size), compensation lowers the reconstruction error,
recovery lowers the KL and resumes from its checkpoint, and a profile's [prune] section reaches
the bundle's manifest, gated against the unpruned model."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import make_model

from edge_slm.builder.decoder.export import load_torch_model
from edge_slm.builder.prune.recover import RecoverySettings, recover
from edge_slm.builder.prune.structured import (
    PruneSettings,
    calibration_batches,
    channel_scores,
    layer_influence,
    prune_model,
    save_pruned,
)
from edge_slm.core.data import CALIBRATION_TEXT
from edge_slm.core.errors import ModelError, ProfileError

CALIBRATION = CALIBRATION_TEXT.read_text()


@pytest.fixture(scope="module")
def three_layers(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("three"), "llama", num_hidden_layers=3)


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def test_pruned_model_is_a_valid_smaller_model_that_builds(three_layers, tiny_profile, tmp_path):
    from transformers import AutoModelForCausalLM

    from edge_slm.builder.pipeline import build
    from edge_slm.core.targets import load_profile

    model, tokenizer = load_torch_model(three_layers), _tokenizer(three_layers)
    before = sum(p.numel() for p in model.parameters())
    record = prune_model(model, tokenizer, PruneSettings(ffn=0.25, head_groups=1, layers=1), CALIBRATION)
    config = model.config
    assert (
        config.num_hidden_layers,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.intermediate_size,
        config.head_dim,
    ) == (2, 2, 1, 96, 16)
    # per layer: q 64x32, k and v 64x16, o 32x64, three MLP matrices 64x96, two norms of 64
    per_layer = 64 * 32 + 2 * 64 * 16 + 32 * 64 + 3 * 64 * 96 + 2 * 64
    assert record["parameters_after"] == 300 * 64 + 64 + 2 * per_layer == sum(p.numel() for p in model.parameters())
    assert record["parameters_before"] == before
    save_pruned(model, tokenizer, tmp_path / "pruned", record)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, model.eval()(ids).logits, atol=1e-5)
    manifest = build(
        str(tmp_path / "pruned"), load_profile(str(tiny_profile)), tmp_path / "bundle", echo=lambda m: None
    )
    assert manifest["model"]["num_layers"] == 2 and manifest["model"]["num_heads"] == 2
    assert manifest["validation"]["passed"] and manifest["validation"]["max_abs_diff"]["logits"] < 1e-3


def test_qwen2_biases_follow_the_removed_group(tiny_qwen2, tiny_profile, tmp_path):
    from edge_slm.builder.pipeline import build
    from edge_slm.core.targets import load_profile

    model, tokenizer = load_torch_model(tiny_qwen2), _tokenizer(tiny_qwen2)
    prune_model(model, tokenizer, PruneSettings(head_groups=1), CALIBRATION)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.bias.shape == (32,) and attn.k_proj.bias.shape == (16,) and attn.v_proj.bias.shape == (16,)
    save_pruned(model, tokenizer, tmp_path / "pruned", {})
    manifest = build(str(tmp_path / "pruned"), load_profile(str(tiny_profile)), tmp_path / "b", echo=lambda m: None)
    assert manifest["validation"]["max_abs_diff"]["logits"] < 1e-3  # ONNX of the pruned Qwen2 = torch


def test_scores_follow_activations_not_weight_size(three_layers):
    model, tokenizer = load_torch_model(three_layers), _tokenizer(three_layers)
    with torch.no_grad():
        layer = model.model.layers[0]
        layer.mlp.gate_proj.weight[:32] = 0  # silu(0) * up = 0: channels 0-31 never fire ...
        layer.mlp.down_proj.weight[:, :32] *= 100  # ... however large their output weights
        middle = model.model.layers[1]
        middle.self_attn.o_proj.weight.zero_()  # layer 1 now adds nothing to its input
        middle.mlp.down_proj.weight.zero_()
    batches = calibration_batches(tokenizer, CALIBRATION)
    influence = layer_influence(model, batches)
    assert int(np.argmin(influence)) == 1 and influence[1] < 1e-6 < min(influence[0], influence[2])
    ffn_scores, _, _, _ = channel_scores(model, batches)
    assert set(np.argsort(ffn_scores[0])[:32]) == set(range(32))
    record = prune_model(model, tokenizer, PruneSettings(layers=1), CALIBRATION)
    assert record["removed_layers"] == [1]


def test_compensation_reconstructs_the_mlp_output_better(three_layers):
    tokenizer = _tokenizer(three_layers)
    batches = calibration_batches(tokenizer, CALIBRATION)
    outputs = {}
    for compensate in (False, True):
        model = load_torch_model(three_layers)
        captured = []
        hook = model.model.layers[0].mlp.register_forward_hook(lambda m, a, out: captured.append((a[0], out)))
        full = load_torch_model(three_layers)
        prune_model(model, tokenizer, PruneSettings(ffn=0.5, compensate=compensate), CALIBRATION)
        with torch.no_grad():
            model(batches[0])
            x, y = captured[-1]
            outputs[compensate] = float((y - full.model.layers[0].mlp(x)).norm() / full.model.layers[0].mlp(x).norm())
        hook.remove()
    print(f"MLP output error after removing half the channels: {outputs[False]:.3f} plain, {outputs[True]:.3f} refit")
    assert outputs[True] < 0.9 * outputs[False]


def test_impossible_settings_are_refused(three_layers):
    model, tokenizer = load_torch_model(three_layers), _tokenizer(three_layers)
    with pytest.raises(ModelError, match=r"--head-groups 2: this model has 2 key/value groups a layer; remove 0 to 1"):
        prune_model(model, tokenizer, PruneSettings(head_groups=2), CALIBRATION)
    with pytest.raises(ModelError, match=r"--layers 3: this model has 3 layers; remove 0 to 2"):
        prune_model(model, tokenizer, PruneSettings(layers=3), CALIBRATION)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_slm.cli",
            "prune",
            "--model",
            str(three_layers),
            "--out",
            "/tmp/never",
            "--ffn",
            "1.5",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: --ffn 1.5: give the share of FFN channels")


class Interrupted(Exception):
    pass


def _kl(student, teacher, batch) -> float:
    with torch.no_grad():
        t = torch.log_softmax(teacher(batch).logits, -1)
        s = torch.log_softmax(student(batch).logits, -1)
    return float((t.exp() * (t - s)).sum(-1).mean())


def test_recovery_lowers_kl_and_resumes_after_an_interruption(three_layers, tmp_path):
    tokenizer = _tokenizer(three_layers)
    teacher = load_torch_model(three_layers)
    student = load_torch_model(three_layers)
    prune_model(student, tokenizer, PruneSettings(ffn=0.5, compensate=False), CALIBRATION)
    held_out = torch.tensor([tokenizer("The harbour market opens at seven on Saturday mornings.").input_ids])
    kl_pruned = _kl(student, teacher, held_out)
    settings = RecoverySettings(
        steps=12, sequence_length=32, batch_size=4, learning_rate=1e-3, generated_sequences=8, checkpoint_every=5
    )

    messages = []

    def interrupt_at_step_10(message):  # as Ctrl-C would, between the checkpoints of steps 5 and 10
        messages.append(message)
        if message.startswith("recovery step 10/"):
            raise Interrupted(message)

    with pytest.raises(Interrupted):
        recover(student, teacher, tokenizer, CALIBRATION, settings, tmp_path, progress=interrupt_at_step_10)
    assert any(m.startswith("teacher wrote 8/8 samples") for m in messages)
    resumed = []
    student = load_torch_model(three_layers)
    prune_model(student, tokenizer, PruneSettings(ffn=0.5, compensate=False), CALIBRATION)
    result = recover(student, teacher, tokenizer, CALIBRATION, settings, tmp_path, progress=resumed.append)
    assert "resuming recovery at step 5/12" in resumed
    assert not any(m.startswith("teacher wrote") for m in resumed)  # the data came from the checkpoint
    assert result["steps_done"] == 12 and result["stopped_by"] == "steps"
    kl_recovered = _kl(student, teacher, held_out)
    print(f"KL to the teacher on a held-out sentence: {kl_pruned:.4f} pruned, {kl_recovered:.4f} recovered")
    assert kl_recovered < 0.9 * kl_pruned  # measured 0.0428 -> 0.0349


def test_recovery_resumes_only_the_same_run(three_layers, tmp_path):
    """A checkpoint left by an interrupted run is resumed by that run only: another pruning (of the
    same or another shape) or another teacher starts over, and a damaged checkpoint is passed over."""
    tokenizer = _tokenizer(three_layers)
    teacher = load_torch_model(three_layers)
    settings = RecoverySettings(
        steps=12, sequence_length=16, batch_size=2, learning_rate=1e-3, generated_sequences=4, checkpoint_every=5
    )

    def student(ffn):
        model = load_torch_model(three_layers)
        prune_model(model, tokenizer, PruneSettings(ffn=ffn, compensate=False), CALIBRATION)
        return model

    def interrupt_at_step_10(message):
        if message.startswith("recovery step 10/"):
            raise Interrupted(message)

    def run(model, **kwargs):
        messages = []
        result = recover(model, teacher, tokenizer, CALIBRATION, settings, tmp_path, messages.append, **kwargs)
        return result, messages

    run_a = {"pruning": {"ffn": 0.5}}
    with pytest.raises(Interrupted):
        recover(student(0.5), teacher, tokenizer, CALIBRATION, settings, tmp_path, interrupt_at_step_10, run=run_a)
    (state,) = tmp_path.glob("state-*.pt")  # run a's checkpoint of step 5
    for model, kwargs in (
        (student(0.25), {"run": {"pruning": {"ffn": 0.25}}}),  # another shape: loading it would fail
        (student(0.5), {"run": {"pruning": {"ffn": 0.5, "layers": [1]}}}),  # same shape, other pruning
        (student(0.5), {"run": run_a, "teacher_id": "another model"}),
    ):
        result, messages = run(model, **kwargs)
        assert not any(m.startswith("resuming") for m in messages), kwargs
        assert result["steps_done"] == 12
    state.write_bytes(b"not a checkpoint")
    result, messages = run(student(0.5), run=run_a)
    (refused,) = [m for m in messages if m.startswith(f"{state.name}: not a checkpoint this run can read (")]
    assert refused.endswith("); starting over") and not any(m.startswith("resuming") for m in messages)
    assert result["steps_done"] == 12


def test_profile_prune_section_reaches_the_manifest(three_layers, tiny_profile, tmp_path, monkeypatch):
    from edge_slm.builder.pipeline import build
    from edge_slm.core.targets import load_profile

    monkeypatch.setenv("EDGE_SLM_CACHE", str(tmp_path / "cache"))
    text = tiny_profile.read_text() + "\n[prune]\nlayers = 1\nffn = 0.25\n"
    profile_path = tmp_path / "pruned-laptop.toml"
    profile_path.write_text(text)
    lines = []
    manifest = build(str(three_layers), load_profile(str(profile_path)), tmp_path / "b", echo=lines.append)
    pruning = manifest["pruning"]
    assert pruning["settings"]["layers"] == 1 and len(pruning["removed_layers"]) == 1
    assert pruning["parameters_after"] < pruning["parameters_before"]
    assert manifest["model"]["num_layers"] == 2 and manifest["model"]["intermediate_size"] == 96
    assert manifest["source"]["pruned_from"]["ref"] == str(three_layers)
    assert any(line.startswith("[2/6] pruning for") for line in lines)
    # The default limit, +15% perplexity against the unpruned model: this light pruning is within it.
    assert pruning["gate"] == {
        "max_ppl_increase": 0.15,
        "ppl_increase": pruning["ppl_increase"],
        "passed": True,
        "loss_allowed_by_user": False,
    }
    assert pruning["ppl_increase"] < 0.15  # measured +3.9%
    again = []
    build(str(three_layers), load_profile(str(profile_path)), tmp_path / "b2", echo=again.append)
    assert any("using the cached pruned model" in line for line in again)
    with pytest.raises(ProfileError, match="unknown key 'prune.head_group'"):
        bad = tmp_path / "bad.toml"
        bad.write_text(tiny_profile.read_text() + "\n[prune]\nhead_group = 1\n")
        load_profile(str(bad))


def test_profile_prune_outside_its_limit_is_refused_unless_allowed(three_layers, tiny_profile, tmp_path, monkeypatch):
    """Two of three layers and half the FFN, no recovery: perplexity +16% against the unpruned
    model, refused at a +1% limit (nothing at --out), published with --allow-accuracy-loss and
    recorded as failed, and passed at a +1000% limit. The three builds share one cached pruning."""
    monkeypatch.setenv("EDGE_SLM_CACHE", str(tmp_path / "cache"))

    def profile(limit: float):
        path = tmp_path / f"pruned-{limit}.toml"
        reason = "# the test's limit, to check both sides of the gate"
        path.write_text(
            tiny_profile.read_text() + f"\n[prune]\nlayers = 2\nffn = 0.5\nmax_ppl_increase = {limit}  {reason}\n"
        )
        return path

    def cli(*args):
        command = [sys.executable, "-m", "edge_slm.cli", "build", "--model", str(three_layers), *map(str, args)]
        return subprocess.run(command, capture_output=True, text=True, timeout=300)

    refused = tmp_path / "refused"
    proc = cli("--target", profile(0.01), "--out", refused)
    assert proc.returncode == 2, proc.stderr
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("error:")]  # after the progress lines
    found = re.fullmatch(
        r"error: the pruned model's perplexity is ([\d.]+) without recovery against ([\d.]+) unpruned on eval.txt: "
        r"\+([\d.]+)%, over the \[prune\] limit max_ppl_increase = 0.01 \(\+1.0%\); remove fewer layers, heads or "
        r"channels, recover longer \(recover_steps, recover_minutes\), or pass --allow-accuracy-loss to build it anyway "
        r"\(the pruned model is cached\)",
        line,
    )
    assert found, line
    after, before, increase = map(float, found.groups())
    assert increase == pytest.approx(100 * (after / before - 1), abs=0.06) and increase > 10  # measured +16.1%
    assert not refused.exists()

    allowed = tmp_path / "allowed"
    proc = cli("--target", profile(0.01), "--out", allowed, "--allow-accuracy-loss")
    assert proc.returncode == 0, proc.stderr
    assert "using the cached pruned model" in proc.stderr
    assert "OUTSIDE (allowed by --allow-accuracy-loss) the limit of +1.0%" in proc.stderr
    assert "OUTSIDE the pruning budget against the unpruned model (published by --allow-accuracy-loss)" in proc.stdout
    pruning = json.loads((allowed / "manifest.json").read_text())["pruning"]
    assert pruning["gate"] == {
        "max_ppl_increase": 0.01,
        "ppl_increase": pytest.approx(increase / 100, abs=6e-4),
        "passed": False,
        "loss_allowed_by_user": True,
    }

    generous = tmp_path / "generous"
    proc = cli("--target", profile(10.0), "--out", generous)
    assert proc.returncode == 0, proc.stderr
    gate = json.loads((generous / "manifest.json").read_text())["pruning"]["gate"]
    assert gate["passed"] is True and gate["max_ppl_increase"] == 10.0 and not gate["loss_allowed_by_user"]
    assert gate["ppl_increase"] == pruning["ppl_increase"]


def test_a_model_pruned_beforehand_is_gated_at_the_default_limit(three_layers, tiny_profile, tmp_path):
    """`edge-slm prune` then `edge-slm build --model DIR` (a profile without [prune]): the same
    gate at the default +15%, and the bundle names the unpruned model it came from."""
    from edge_slm.builder.prune.structured import prune_directory

    record = prune_directory(str(three_layers), PruneSettings(layers=2, ffn=0.5), tmp_path / "pruned")
    assert record["ppl_increase"] > 0.15  # measured +16.1%
    build = [sys.executable, "-m", "edge_slm.cli", "build", "--model", str(tmp_path / "pruned")]
    build += ["--target", str(tiny_profile)]
    proc = subprocess.run([*build, "--out", str(tmp_path / "refused")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert (
        f"{100 * record['ppl_increase']:+.1f}%, over the [prune] limit max_ppl_increase = 0.15 (+15.0%)" in proc.stderr
    )
    assert not (tmp_path / "refused").exists()
    allowed = tmp_path / "allowed"
    proc = subprocess.run([*build, "--out", str(allowed), "--allow-accuracy-loss"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((allowed / "manifest.json").read_text())
    assert manifest["pruning"]["gate"] == {
        "max_ppl_increase": 0.15,
        "ppl_increase": pytest.approx(record["ppl_increase"]),
        "passed": False,
        "loss_allowed_by_user": True,
    }
    assert manifest["pruning"]["removed_layers"] == record["removed_layers"]
    assert manifest["source"]["pruned_from"]["ref"] == str(three_layers)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsity_is_compression_only(three_layers, pattern):
    from edge_slm.builder.prune.sparsify import zero_share

    model, tokenizer = load_torch_model(three_layers), _tokenizer(three_layers)
    before = sum(p.numel() for p in model.parameters())
    record = prune_model(model, tokenizer, PruneSettings(sparsity=0.5, sparsity_pattern=pattern), CALIBRATION)
    sp = record["sparsity"]
    assert sp["sparsity"] == pytest.approx(0.5) and zero_share(model) == pytest.approx(0.5, abs=1e-3)
    assert record["parameters_after"] == before  # same shapes: dense kernels run exactly as before
    assert sp["zlib_bytes_sparse"] < 0.75 * sp["zlib_bytes_dense"] and sp["speed"].startswith("none")
    if pattern == "2:4":
        weight = model.model.layers[0].mlp.up_proj.weight.detach().reshape(128, 16, 4)  # [ffn 128, hidden 64]
        assert ((weight == 0).sum(-1) == 2).all()  # exactly two zeros in every four inputs
