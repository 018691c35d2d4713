"""Encoder pruning on the tiny BERT fixtures: a pruned folder transformers loads, whose built graph
gives the pruned torch model's outputs; distillation that lowers the loss against the teacher;
the build's gate against the unpruned model; one-line refusals of bad input."""

from __future__ import annotations

import json
import pickle
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_encoder, write_profile

from edge_slm.builder.encoder.export import load_torch_encoder
from edge_slm.builder.encoder.source import load_encoder
from edge_slm.builder.prune.encoder import (
    EncoderPruneSettings,
    encode,
    prune_encoder_directory,
    prune_model,
    refit_projection,
    smallest_share,
)
from edge_slm.builder.prune.encoder_data import read_task_data
from edge_slm.builder.prune.encoder_recover import (
    EncoderRecoverySettings,
    _varied_batches,
    distill,
    distillation_loss,
    hidden_state_loss,
    teacher_layers,
)
from edge_slm.core.errors import AccuracyBudgetError
from edge_slm.core.labelled import INTENTS_TRAIN, read_examples

TEXTS = ["turn off the kitchen lights", "play some jazz", "what's the weather tomorrow", "set a timer for ten minutes"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Torch on one thread for every test here and the module's fixtures: the tiny models gain
    nothing from two, and on a busy 2-core machine the second thread's waits made this file take
    10 minutes instead of under 2 (a run of `prune_encoder_directory` 3 s instead of 0.3 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def two_label_data(tmp_path_factory):
    """The shipped intents of the tiny classifier's two labels."""
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [e for e in read_examples(INTENTS_TRAIN) if e.label in ("lights", "music")]
    path.write_text("".join(json.dumps({"text": e.text, "label": e.label}) + "\n" for e in rows))
    return path


@pytest.fixture(scope="module")
def pruned_classifier(tiny_classifier, two_label_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("pruned") / "classifier"
    settings = EncoderPruneSettings(layers=1, heads=0.5, ffn=0.5)
    record = prune_encoder_directory(str(tiny_classifier), settings, out, two_label_data, two_label_data)
    return out, record


def _cpu_graph(model, tokenizer, manifest):
    """A tiny bundle's graph on one CPU thread (inputs from its manifest, 32 tokens at most)."""
    from edge_slm.runtime.encoder import EncoderGraph

    inputs = list(manifest["graph"]["inputs"])
    return EncoderGraph(model, tokenizer.backend_tokenizer, inputs, 32, 0, 1, ["CPUExecutionProvider"])


def test_pruned_config_loads_and_the_built_graph_gives_its_logits(pruned_classifier, encoder_profile, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from edge_slm.builder.pipeline import build
    from edge_slm.core.targets import load_profile

    out, record = pruned_classifier
    model = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    config = model.config
    assert config.num_hidden_layers == 1 and config.intermediate_size == 32
    assert {k: len(v) for k, v in config.pruned_heads.items()} == {0: 2}
    assert model.bert.encoder.layer[0].attention.self.query.out_features == 16  # 2 heads of 8 left
    assert record["parameters_after"] < record["parameters_before"] and len(record["removed_layers"]) == 1
    bundle = tmp_path / "bundle"
    manifest = build(str(out), load_profile(str(encoder_profile)), bundle, echo=lambda m: None, precision="fp32")
    assert manifest["model"]["num_layers"] == 1 and manifest["model"]["num_heads"] == 2
    assert manifest["graph"]["fused"]["Attention"] == 1
    assert manifest["pruning"]["removed_layers"] == record["removed_layers"]
    assert manifest["pruning"]["measured"]["pruned"]["accuracy"] == record["measured"]["pruned"]["accuracy"]
    head = load_torch_encoder(load_encoder(str(out)))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(out))
    graph = _cpu_graph(bundle / "model.onnx", tokenizer, manifest)
    got = graph.run(TEXTS)
    want = encode(head, tokenizer, TEXTS).numpy()
    assert got.shape == (4, 2) and np.abs(got - want).max() < 1e-4


def test_refit_projection_is_the_least_squares_fit_on_the_kept_inputs():
    """With every input kept the refit is the projection itself; with some dropped (and inputs
    whose mean is not zero, so the bias has work to do) it is, at a negligible ridge, the least
    squares fit of the full output from [kept inputs, 1], column for column."""
    torch.manual_seed(0)
    full = torch.nn.Linear(16, 8)
    a = (torch.randn(400, 16) + torch.linspace(-2, 2, 16)).double()
    inputs = torch.cat([a, torch.ones(400, 1, dtype=torch.float64)], 1)
    gram = inputs.T @ inputs
    shrunk = torch.nn.Linear(16, 8)
    refit_projection(shrunk, full, gram, torch.arange(16))
    assert torch.allclose(shrunk.weight, full.weight, atol=1e-5) and torch.allclose(shrunk.bias, full.bias, atol=1e-5)
    kept = torch.tensor([0, 3, 4, 9, 15])
    shrunk = torch.nn.Linear(5, 8)
    refit_projection(shrunk, full, gram, kept, damping=1e-9)
    target = (a @ full.weight.double().T + full.bias.double()).detach().numpy()
    design = torch.cat([a[:, kept], torch.ones(400, 1, dtype=torch.float64)], 1).numpy()
    solved = np.linalg.lstsq(design, target, rcond=None)[0]  # [kept + 1, out]
    assert np.abs(shrunk.weight.detach().numpy() - solved[:-1].T).max() < 1e-4
    assert np.abs(shrunk.bias.detach().numpy() - solved[-1]).max() < 1e-4


def test_refit_brings_the_pruned_model_nearer_its_teacher(tiny_classifier):
    """The refitted output projections give sentence vectors nearer the unpruned model's than the
    same heads and channels cut without it."""
    import copy
    import dataclasses

    from transformers import AutoTokenizer

    source = dataclasses.replace(
        load_encoder(str(tiny_classifier)), task="embedding", pooling="mean", normalize=True, labels=()
    )
    teacher = load_torch_encoder(source)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_classifier))
    data = read_task_data(None, "embedding", ())
    want = encode(teacher, tokenizer, TEXTS)
    cosine = {}
    for refit in (False, True):
        student = copy.deepcopy(teacher)
        prune_model(student.model, tokenizer, EncoderPruneSettings(heads=0.5, ffn=0.5, refit=refit), data)
        got = encode(student, tokenizer, TEXTS)
        cosine[refit] = float(torch.nn.functional.cosine_similarity(got, want).mean())
    assert cosine[True] > cosine[False] + 0.02, cosine


def _loss(student, teacher, tokenizer, data, task, settings) -> float:
    student.eval()
    with torch.no_grad():
        out = encode(student, tokenizer, data.texts)
        target = encode(teacher, tokenizer, data.texts)
        labels = torch.tensor(data.labels) if data.labels is not None else None
        return float(distillation_loss(out, target, labels, task, settings))


@pytest.mark.parametrize(
    "task,bf16", [("embedding", False), ("embedding", True), ("classification", False), ("classification", True)]
)
def test_distillation_lowers_the_loss_against_the_teacher(
    task, bf16, tiny_embedder, tiny_classifier, two_label_data, tmp_path
):
    """In float32 and under bfloat16 autocast (which `native_bf16` turns on where the CPU has it;
    elsewhere it is emulated: slower, the same arithmetic)."""
    import copy
    import dataclasses

    from transformers import AutoTokenizer

    path = tiny_classifier  # its wide random weights make every layer matter: pruning shows in the outputs
    source = load_encoder(str(path))
    if task == "embedding":  # the same BERT read as a sentence embedder (mean pooling, normalized)
        source = dataclasses.replace(source, task="embedding", pooling="mean", normalize=True, labels=())
    teacher = load_torch_encoder(source)
    student = copy.deepcopy(teacher)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    data = read_task_data(None if task == "embedding" else two_label_data, task, source.labels)
    # Without the refit: the student starts far enough from its teacher for the loss to have room to fall.
    prune_model(student.model, tokenizer, EncoderPruneSettings(layers=1, ffn=0.5, refit=False), data)
    steps = 60 if task == "embedding" else 30  # an embedder's token embeddings stay frozen: it learns slower
    settings = EncoderRecoverySettings(steps=steps, learning_rate=1e-3, checkpoint_every=10, bf16=bf16)
    before = _loss(student, teacher, tokenizer, data, task, settings)
    record = distill(student, teacher, tokenizer, data, task, settings, tmp_path / "checkpoints")
    after = _loss(student, teacher, tokenizer, data, task, settings)
    assert record["steps_done"] == steps and record["stopped_by"] == "steps" and record["bf16"] is bf16
    assert after < 0.8 * before, (before, after)


def _hidden_loss(student, teacher, tokenizer, texts, layer_map) -> float:
    inputs = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        mine = student.model(**inputs, output_hidden_states=True).hidden_states
        theirs = teacher.model(**inputs, output_hidden_states=True).hidden_states
    return float(hidden_state_loss(mine, theirs, inputs["attention_mask"], layer_map))


def test_an_embedder_learns_the_teachers_hidden_states_layer_by_layer(tiny_classifier, tmp_path):
    """Hidden-state matching: each student layer ends nearer the teacher layer it was cut from than
    the pooled vectors alone bring it, and the models' configs are left as they were (the
    student's is saved with the pruned folder)."""
    import copy
    import dataclasses

    from transformers import AutoTokenizer

    source = dataclasses.replace(
        load_encoder(str(tiny_classifier)), task="embedding", pooling="mean", normalize=True, labels=()
    )
    teacher = load_torch_encoder(source)
    pruned = copy.deepcopy(teacher)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_classifier))
    data = read_task_data(None, "embedding", ())
    # Without the refit, which already brings the states near: the distillation is what is tested.
    record = prune_model(pruned.model, tokenizer, EncoderPruneSettings(layers=1, ffn=0.5, refit=False), data)
    layer_map = teacher_layers(1, 2, record["removed_layers"])
    assert layer_map == [1 - record["removed_layers"][0]]
    assert teacher_layers(3, 6) == [1, 3, 5] and teacher_layers(2, 2) == [0, 1]
    after = {}
    for weight in (0.0, 10.0):  # the tiny random model's pooled vectors are far apart: its term dominates at 1
        student = copy.deepcopy(pruned)
        settings = EncoderRecoverySettings(
            steps=60, learning_rate=1e-3, checkpoint_every=100, hidden_weight=weight, bf16=False
        )
        distill(student, teacher, tokenizer, data, "embedding", settings, tmp_path / str(weight), layer_map=layer_map)
        after[weight] = _hidden_loss(student, teacher, tokenizer, TEXTS, layer_map)
        assert not student.model.config.output_hidden_states and not teacher.model.config.output_hidden_states
    before = _hidden_loss(pruned, teacher, tokenizer, TEXTS, layer_map)
    assert after[10.0] < 0.6 * after[0.0] and after[10.0] < before, (before, after)


def test_simulated_int8_gives_the_int8_bundles_outputs(tiny_classifier, encoder_profile, tmp_path):
    """The rounding distillation learns is the bundle's: the tiny classifier under `simulated_int8`
    gives onnxruntime's dynamic int8 graph's logits several times more closely than the float model
    does, with 7-bit weights (the CPU profiles' reduce_range) on any CPU, and leaving the context
    restores the float forward."""
    from transformers import AutoTokenizer

    from edge_slm.builder.encoder.precision import reduce_precision
    from edge_slm.builder.pipeline import build
    from edge_slm.builder.prune.int8_simulation import simulated_int8
    from edge_slm.core.targets import Encoder, load_profile

    fp32 = tmp_path / "fp32"
    manifest = build(
        str(tiny_classifier), load_profile(str(encoder_profile)), fp32, echo=lambda m: None, precision="fp32"
    )
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_classifier))
    texts = [e.text for e in read_examples(INTENTS_TRAIN)[:64]]
    head = load_torch_encoder(load_encoder(str(tiny_classifier)))
    float_logits = encode(head, tokenizer, texts, batch_size=64).numpy()

    def int8_logits(reduce_range):
        out = tmp_path / f"int8-{reduce_range}"
        out.mkdir()
        # Every MatMul int8 and the embeddings float: what the simulation rounds, nothing else.
        spec = Encoder(precision="int8", quantize_embeddings=False, reduce_range=reduce_range)
        reduce_precision(fp32 / "model.onnx", spec, out)
        # One batch: the activations' ranges are the batch's, as in torch.
        return _cpu_graph(out / "model.onnx", tokenizer, manifest).run(texts, batch_size=64)

    got = int8_logits(reduce_range=True)
    with simulated_int8(head, reduce_range=True) as count:
        simulated = encode(head, tokenizer, texts, batch_size=64).numpy()
    assert count == 2 * 6 + 2  # two layers' Q, K, V, attention output, FFN in and out; pooler and classifier
    assert "forward" not in vars(head.model.bert.encoder.layer[0].output.dense)
    assert np.abs(encode(head, tokenizer, texts, batch_size=64).numpy() - float_logits).max() == 0
    float_error, simulated_error = np.abs(float_logits - got).mean(), np.abs(simulated - got).mean()
    # 7-bit weights: every kernel adds the products exactly, and the simulation is the bundle's
    # arithmetic up to float sums on any CPU (AVX2 host: 0.0010 against the float model's 0.204).
    assert float_error > 1e-3 and simulated_error < 0.05 * float_error, (float_error, simulated_error)
    # 8-bit weights: plain rounding only where the u8s8 kernel adds exactly (VNNI, ARM). Without
    # VNNI it adds uint8 x int8 products in pairs into 16 bits, which saturate: the int8 graph then
    # strays further from the float model than the 7-bit one does (AVX2 host: 0.656 against 0.204).
    from edge_slm.core.system import cpu_flags

    got_8bit = int8_logits(reduce_range=False)
    error_8bit = np.abs(float_logits - got_8bit).mean()
    if cpu_flags() & {"avx512_vnni", "avx_vnni"} or platform.machine() not in ("x86_64", "AMD64"):
        with simulated_int8(head, reduce_range=False):
            simulated_8bit = encode(head, tokenizer, texts, batch_size=64).numpy()
        assert np.abs(simulated_8bit - got_8bit).mean() < 0.3 * error_8bit, error_8bit
    else:
        assert error_8bit > 2 * float_error, (error_8bit, float_error)
    # Under bfloat16 autocast (distillation's, where the CPU has it) the whole model computes in
    # bf16 and the product is rounded again: the simulation still brings it nearer the int8 graph
    # than the same autocast without it, less near than in float32.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_float_error = np.abs(encode(head, tokenizer, texts, batch_size=64).float().numpy() - got).mean()
        with simulated_int8(head, reduce_range=True):
            bf16_error = np.abs(encode(head, tokenizer, texts, batch_size=64).float().numpy() - got).mean()
    assert simulated_error < bf16_error < bf16_float_error, (simulated_error, bf16_error, bf16_float_error)
    # A forward something else put on a layer is not silently skipped.
    head.model.bert.encoder.layer[0].output.dense.forward = lambda x: x
    with pytest.raises(RuntimeError, match="1 linear layer"), simulated_int8(head, reduce_range=True):
        pass


def test_a_profile_whose_int8_weights_differ_from_the_simulation_is_told_so(tmp_path):
    from edge_slm.builder.encoder.pipeline import _say_if_simulated_int8_differs
    from edge_slm.core.targets import load_profile

    def notes(**encoder):
        profile = load_profile(str(write_profile(tmp_path / "mine.toml", "x86-laptop", "mine", encoder=encoder)))
        said = []
        _say_if_simulated_int8_differs(profile, profile.embedder_prune, said.append)
        return said

    assert notes() == [] and notes(precision="fp32", reduce_range=False) == []
    (line,) = notes(reduce_range=False)
    assert "[encoder] reduce_range = false, but distillation simulates int8 with reduce_range = true" in line
    assert str(tmp_path / "mine.toml") in line


def test_simulated_weights_are_onnxruntimes_quantized_weights():
    """The weight grid distillation learns is exactly the one onnxruntime's quantizer writes into
    the bundle: symmetric int8 per output channel, -127..127 or, with reduce_range, -64..64."""
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import quantize_data

    from edge_slm.builder.prune.int8_simulation import fake_quantize_weight

    weight = torch.randn(24, 40, generator=torch.Generator().manual_seed(0)) * 0.05
    for reduce_range, levels in ((True, 64), (False, 127)):
        simulated = fake_quantize_weight(weight, reduce_range=reduce_range).numpy()
        for row, got in zip(weight.numpy(), simulated):
            zero_point, scale, quantized = quantize_data(row, TensorProto.INT8, True, reduce_range=reduce_range)
            assert zero_point == 0 and np.abs(quantized).max() == levels
            np.testing.assert_array_equal(got, quantized.astype(np.float32) * np.float32(scale))


def test_distillation_rounds_weights_as_every_shipped_int8_encoder_profile():
    """One cached distillation serves every target, so its simulated int8 rounds weights the one
    way all the shipped dynamic-int8 [encoder] tables build them (7-bit: reduce_range)."""
    from edge_slm.builder.prune.encoder_recover import SIMULATED_REDUCE_RANGE
    from edge_slm.core.targets import known_targets, load_profile

    dynamic = [load_profile(t).encoder for t in known_targets()]
    dynamic = [e for e in dynamic if e.precision == "int8" and e.int8_format == "dynamic"]
    assert len(dynamic) == 3  # rpi4, rpi5, x86-laptop
    assert {e.reduce_range for e in dynamic} == {SIMULATED_REDUCE_RANGE}


def _tiny_teacher_and_pruned(tiny_classifier, two_label_data):
    """The tiny classifier as teacher, and a copy with a layer and half of every FFN removed (no
    refit): the student of the simulated-int8 tests."""
    import copy

    from transformers import AutoTokenizer

    source = load_encoder(str(tiny_classifier))
    teacher = load_torch_encoder(source)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_classifier))
    data = read_task_data(two_label_data, "classification", source.labels)
    pruned = copy.deepcopy(teacher)
    prune_model(pruned.model, tokenizer, EncoderPruneSettings(layers=1, ffn=0.5, refit=False), data)
    return teacher, pruned, tokenizer, data


def test_the_last_share_of_distillation_runs_through_simulated_int8(tiny_classifier, two_label_data, tmp_path):
    """`int8_share` switches the rounding on for the end of the run (step 7 of 10 for 0.3) and
    off after it; a run that distils through it all lowers the student's loss measured as int8."""
    import copy

    from edge_slm.builder.prune.int8_simulation import simulated_int8

    teacher, pruned, tokenizer, data = _tiny_teacher_and_pruned(tiny_classifier, two_label_data)
    lines = []
    student = copy.deepcopy(pruned)
    settings = EncoderRecoverySettings(steps=10, checkpoint_every=100, bf16=False, int8_share=0.3)
    record = distill(student, teacher, tokenizer, data, "classification", settings, tmp_path / "a", lines.append)
    assert record["int8_from_step"] == 7 and record["steps_done"] == 10
    assert any(line.startswith("from step 7: distilling through simulated int8 (8 linear layers") for line in lines)
    assert not any("forward" in vars(m) for m in student.modules())
    student = copy.deepcopy(pruned)
    settings = EncoderRecoverySettings(steps=30, learning_rate=1e-3, checkpoint_every=100, bf16=False, int8_share=1.0)
    with simulated_int8(student, reduce_range=True):
        before = _loss(student, teacher, tokenizer, data, "classification", settings)
    record = distill(student, teacher, tokenizer, data, "classification", settings, tmp_path / "b")
    with simulated_int8(student, reduce_range=True):
        after = _loss(student, teacher, tokenizer, data, "classification", settings)
    assert record["int8_from_step"] == 0 and after < 0.8 * before, (before, after)


def test_a_resumed_run_keeps_its_switch_to_simulated_int8(tiny_classifier, two_label_data, tmp_path):
    """Interrupted after the switch (step 15 of 30), the run resumes from its step-18 checkpoint
    already rounding, and says the switch came at step 15: not again at the step it resumed on."""
    import copy

    teacher, student, tokenizer, data = _tiny_teacher_and_pruned(tiny_classifier, two_label_data)
    settings = EncoderRecoverySettings(steps=30, checkpoint_every=2, bf16=False, int8_share=0.5)

    def interrupt(line):
        if line.startswith("recovery step 20/30"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(copy.deepcopy(student), teacher, tokenizer, data, "classification", settings, tmp_path, interrupt)
    lines = []
    record = distill(student, teacher, tokenizer, data, "classification", settings, tmp_path, lines.append)
    assert lines[1:3] == ["resuming recovery at step 18/30", "distilling through simulated int8 since step 15"]
    assert record["int8_from_step"] == 15 and record["steps_done"] == 30
    assert not any("forward" in vars(m) for m in student.modules())


@pytest.fixture(scope="module")
def trained_classifier(tmp_path_factory):
    """A tiny BERT fine-tuned on the shipped intents: accuracy well above chance, so that pruning
    it too far shows in its test accuracy."""
    from edge_slm.builder.encoder.finetune import FinetuneSettings, finetune

    root = tmp_path_factory.mktemp("trained")
    base = make_encoder(root / "base", seed=3)
    train = read_examples(INTENTS_TRAIN)
    out = root / "classifier"
    finetune(str(base), train[:1000], train[1000:], FinetuneSettings(epochs=4, lr=3e-3), out, progress=lambda m: None)
    return out


def test_the_gate_refuses_a_student_pruned_too_far(trained_classifier, tmp_path):
    from edge_slm.builder.pipeline import build
    from edge_slm.core.targets import load_profile

    too_far = {"layers": 1, "heads": 0.75, "ffn": 0.9, "recover_steps": 0, "max_accuracy_drop": 0.01}
    profile_path = write_profile(
        tmp_path / "p.toml", "x86-laptop", "tiny-pruned", encoder={"max_sequence_length": 32}, classifier_prune=too_far
    )
    profile = load_profile(str(profile_path))
    args = dict(echo=lambda m: None, precision="fp32", eval_data=INTENTS_TRAIN.parent / "test.jsonl")
    with pytest.raises(
        AccuracyBudgetError,
        match=r"the pruned encoder misses its budget against the unpruned model: "
        r"test accuracy \d+\.\d% vs the unpruned fp32 model's \d+\.\d% \(budget: at most 1\.0 points",
    ):
        build(str(trained_classifier), profile, tmp_path / "refused", prune=True, prune_data=INTENTS_TRAIN, **args)
    assert not (tmp_path / "refused").exists()
    manifest = build(
        str(trained_classifier),
        profile,
        tmp_path / "allowed",
        prune=True,
        prune_data=INTENTS_TRAIN,
        allow_accuracy_loss=True,
        **args,
    )
    gate = manifest["pruning"]["gate"]
    assert not gate["passed"] and gate["unpruned_accuracy"] - gate["accuracy"] > 0.01
    assert manifest["pruning"]["pruned_from"]["path"] == str(trained_classifier)
    assert manifest["pruning"]["settings"] == {
        "layers": 1,
        "heads": 0.75,
        "ffn": 0.9,
        "score_texts": 512,
        "refit": True,
    }


def _cli(*args, cwd=None):
    result = subprocess.run(
        [sys.executable, "-m", "edge_slm.cli", "prune", *map(str, args)], capture_output=True, text=True, cwd=cwd
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    return result.stderr.strip().splitlines()[-1]


def test_bad_input_is_one_line_and_exit_2(tiny_classifier, tiny_embedder, two_label_data, tmp_path):
    out = tmp_path / "out"
    line = _cli("--model", tiny_classifier, "--out", out, "--heads", "1.5", "--data", two_label_data)
    assert line.startswith("error: --heads 1.5: give the share to remove in every layer, above 0 and below 1")
    line = _cli("--model", tiny_classifier, "--out", out, "--ffn", "-0.2", "--data", two_label_data)
    assert line.startswith("error: --ffn -0.2: give the share")
    line = _cli("--model", tiny_classifier, "--out", out, "--layers", "2", "--data", two_label_data)
    assert line == "error: --layers 2: this model has 2 layers; remove 0 to 1"
    unlabelled = tmp_path / "texts.jsonl"
    unlabelled.write_text('{"text": "turn on the lights"}\n')
    line = _cli("--model", tiny_classifier, "--out", out, "--layers", "1", "--data", unlabelled)
    assert line == f"error: {unlabelled}:1: each line needs the keys 'text' and 'label'"
    line = _cli("--model", tiny_embedder, "--out", out, "--layers", "1", "--data", two_label_data)
    assert line.startswith(f"error: {two_label_data}:1: labelled data is a classifier's task; an embedder is pruned")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    line = _cli("--model", tiny_embedder, "--out", mine, "--layers", "1")
    assert "edge-slm replaces only folders it wrote itself" in line
    assert (mine / "notes.txt").read_text() == "my notes" and not out.exists()


def test_a_profile_refuses_distillation_inputs_cut_too_short(tmp_path):
    from edge_slm.core.errors import ProfileError
    from edge_slm.core.targets import load_profile

    path = write_profile(tmp_path / "p.toml", "x86-laptop", "short", embedder_prune={"recover_max_tokens": 0})
    with pytest.raises(ProfileError, match=r"'embedder_prune.recover_max_tokens' is 0; use 8-8192"):
        load_profile(str(path))


class Interrupted(Exception):
    pass


def test_recovery_checkpoints_stay_in_the_cache_and_resume_only_the_same_run(tiny_classifier, two_label_data, tmp_path):
    """An interrupted recovery resumes when the same command runs again, never from another model's
    checkpoint of the same shape and settings; its checkpoints live in edge-slm's cache, so a folder
    of the user's beside --out (named as the checkpoints once were) is neither used nor removed."""
    other = make_encoder(tmp_path / "other", "classification", seed=7)  # same shape, other weights
    rows = two_label_data.read_text().splitlines()
    data = tmp_path / "small.jsonl"  # a few texts of each label keep the three runs quick
    data.write_text("\n".join(rows[:12] + rows[-12:]) + "\n")
    out = tmp_path / "pruned"
    theirs = tmp_path / ".pruned.recovery"
    theirs.mkdir()
    (theirs / "thesis.txt").write_text("mine")
    settings = EncoderPruneSettings(layers=1, score_texts=8)
    recovery = EncoderRecoverySettings(steps=12, batch_size=4, checkpoint_every=5, bf16=False)

    def interrupt_at_step_10(message):  # as Ctrl-C would, after the checkpoint of step 5
        if message.startswith("recovery step 10/"):
            raise Interrupted(message)

    def run(model, progress):
        return prune_encoder_directory(str(model), settings, out, data, data, recovery, progress=progress)

    with pytest.raises(Interrupted):
        run(tiny_classifier, interrupt_at_step_10)
    with pytest.raises(Interrupted):  # the other model starts at step 0 and is stopped before step 10's checkpoint
        messages = []
        run(other, lambda m: (messages.append(m), interrupt_at_step_10(m)))
    assert not any(m.startswith(("resuming", "the teacher's outputs from the checkpoint")) for m in messages)
    messages = []
    record = run(tiny_classifier, messages.append)
    assert "resuming recovery at step 5/12" in messages and record["recovery"]["steps_done"] == 12
    assert (theirs / "thesis.txt").read_text() == "mine" and sorted(p.name for p in theirs.iterdir()) == ["thesis.txt"]
    from edge_slm.builder.prune.checkpoints import checkpoint_dir

    assert not checkpoint_dir(out).exists() and (out / "edge_slm_prune.json").is_file()

    # A checkpoint planted in the cache is data, never code: passed over, and the run starts over.
    with pytest.raises(Interrupted):
        run(tiny_classifier, interrupt_at_step_10)
    marker = tmp_path / "pickled code ran"
    planted = sorted(checkpoint_dir(out).glob("*.pt"))
    assert [p.name.split("-")[0] for p in planted] == ["state", "teacher"]
    for path in planted:
        path.write_bytes(pickle.dumps(_Planted(marker), protocol=2))
    messages = []
    record = run(tiny_classifier, messages.append)
    assert not marker.exists() and record["recovery"]["steps_done"] == 12
    assert sum("not a checkpoint this run can read (UnpicklingError); starting over" in m for m in messages) == 2
    assert not any(m.startswith("resuming") for m in messages)


class _Planted:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("heads", 1.0, "'embedder_prune.heads' is 1.0; give the share to remove in every layer, from 0 up to but not"),
        ("ffn", float("nan"), "'embedder_prune.ffn' is nan; give the share"),
        ("layers", -1, "'embedder_prune.layers' is -1; use 0 or more"),
        ("recover_steps", -5, "'embedder_prune.recover_steps' is -5; use 0 or more"),
        ("recover_minutes", float("nan"), "'embedder_prune.recover_minutes' is nan; use 0 (no limit) or more"),
        ("recover_lr", 0.0, "'embedder_prune.recover_lr' is 0.0; use a learning rate above 0, up to 1"),
        ("min_cosine", float("nan"), "'embedder_prune.min_cosine' is nan; use a share from 0 to 1"),
        ("recover_int8_share", 1.5, "'embedder_prune.recover_int8_share' is 1.5; use a share from 0 to 1"),
        ("max_recall_drop", -0.1, "'embedder_prune.max_recall_drop' is -0.1; use a share from 0 to 1"),
        ("recover_hidden_weight", float("nan"), "'embedder_prune.recover_hidden_weight' is nan; use 0 (pooled"),
        ("recover_hidden_weight", -1.0, "'embedder_prune.recover_hidden_weight' is -1.0; use 0 (pooled vectors"),
        ("recover_hidden_weight", float("inf"), "'embedder_prune.recover_hidden_weight' is inf; use 0 (pooled"),
        ("recover_hidden_weight", 101.0, "'embedder_prune.recover_hidden_weight' is 101.0; use 0 (pooled"),
    ],
)
def test_a_profile_refuses_prune_values_no_model_can_take(key, value, message, tmp_path):
    """Refused when the profile loads, in one line naming the key: a nan budget would pass any
    model (every comparison with nan is false), a nan share would reach torch."""
    from edge_slm.core.errors import ProfileError
    from edge_slm.core.targets import load_profile

    path = write_profile(tmp_path / "p.toml", "x86-laptop", "bad", embedder_prune={key: value})
    with pytest.raises(ProfileError) as refused:
        load_profile(str(path))
    assert str(refused.value).startswith(f"{path}: {message}") and "\n" not in str(refused.value)


def _main(capsys, *args) -> tuple[int, str]:
    from edge_slm.cli import main

    try:
        main([*map(str, args)])
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err.strip().splitlines()[-1]


def test_settings_from_a_profile_are_named_there_and_options_override_them(
    tiny_embedder, two_label_data, tmp_path, capsys
):
    """A layer count the model cannot take, read from the profile's table, is refused naming the
    table (not an option the user never passed); an option given as 0 overrides the profile's value."""
    profile = write_profile(tmp_path / "p.toml", "x86-laptop", "deep", embedder_prune={"layers": 5, "ffn": 0.5})
    out = tmp_path / "out"
    code, line = _main(capsys, "prune", "--model", tiny_embedder, "--out", out, "--target", profile)
    assert (code, line) == (2, f"error: {profile}: [embedder_prune] layers = 5: this model has 2 layers; remove 0 to 1")
    code, line = _main(capsys, "prune", "--model", tiny_embedder, "--out", out, "--target", profile, "--layers", 3)
    assert (code, line) == (2, "error: --layers 3: this model has 2 layers; remove 0 to 1")
    args = ("prune", "--model", tiny_embedder, "--out", out, "--target", profile, "--layers", 0, "--ffn", 0)
    assert _main(capsys, *args) == (2, "error: nothing to prune: pass --layers, --heads and/or --ffn")
    code, line = _main(capsys, "prune", "-m", tiny_embedder, "-o", out, "--layers", 1, "--recover-minutes", "nan")
    assert (code, line) == (
        2,
        "error: --recover-steps and --recover-minutes must be 0 or more (minutes: 0 for no limit)",
    )
    assert not out.exists()


def test_an_out_below_a_file_is_refused_as_such(tiny_embedder, tmp_path, capsys):
    """Named as what it is (it was "not writable by this user", or an OSError from mkdir deep in a build)."""
    from edge_slm.core.bundle import BundleError, check_output_dir

    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    out = notes / "pruned"
    code, line = _main(capsys, "prune", "-m", tiny_embedder, "-o", out, "--layers", 1)
    assert (code, line) == (2, f"error: --out {out}: {notes} is a file, not a folder: choose another --out")
    with pytest.raises(BundleError, match=f"^--out {out}: {notes} is a file, not a folder: choose another --out$"):
        check_output_dir(out)
    assert notes.read_text() == "mine"


def test_an_embedders_texts_are_checked_line_by_line(tmp_path):
    """Not only the first line: labelled rows further down, JSON objects whose braces would be
    distilled as text, undecodable bytes and a text past the length limit each name their line."""
    from edge_slm.core.labelled import DataError

    texts = [f"plain text number {i}" for i in range(10)]
    cases = {
        "labelled later": (texts + ['{"text": "play jazz", "label": "music"}'], ":11: labelled data is a classifier's"),
        "json texts": (['{"text": "play jazz"}'] + texts, ":1: a JSON object; an embedder's --data is plain texts"),
        "not utf-8": (texts[:3] + ["caf\udcff"], ":4: byte 0xff at character 4 is not valid UTF-8"),
        "too long": (texts + ["word " * 30_000], ":11: the text has 149999 characters; the limit is 100000"),
    }
    for name, (lines, message) in cases.items():
        path = tmp_path / f"{name}.txt"
        path.write_bytes("\n".join(lines).encode("utf-8", "surrogateescape"))
        with pytest.raises(DataError) as refused:
            read_task_data(path, "embedding", ())
        assert str(refused.value).startswith(f"{path}{message}"), (name, str(refused.value))
    path = tmp_path / "fine.txt"
    path.write_text("\n".join(texts + ["{not json, a text with braces}", ""]))
    assert read_task_data(path, "embedding", ()).texts == texts + ["{not json, a text with braces}"]


def test_a_pruned_model_pruned_again_loads_and_gives_what_was_measured(tiny_classifier, two_label_data, tmp_path):
    """Heads are scored by position but transformers prunes by original id, and keys the heads
    pruned before by layer: a second run removing heads and a layer of a head-pruned model wrote
    an IndexError (heads) or a folder that did not load (layer). A share that removes no head or
    channel is refused rather than published as a pruned model."""
    from edge_slm.core.errors import ModelError

    rows = two_label_data.read_text().splitlines()
    data = tmp_path / "small.jsonl"
    data.write_text("\n".join(rows[:16] + rows[-16:]) + "\n")
    once, twice = tmp_path / "once", tmp_path / "twice"
    prune_encoder_directory(str(tiny_classifier), EncoderPruneSettings(heads=0.5, score_texts=8), once, data, data)
    record = prune_encoder_directory(
        str(once), EncoderPruneSettings(layers=1, heads=0.5, score_texts=8), twice, data, data
    )
    head = load_torch_encoder(load_encoder(str(twice)))
    assert [layer.attention.self.num_attention_heads for layer in head.model.bert.encoder.layer] == [1]
    assert list(head.model.config.pruned_heads) == [0] and len(head.model.config.pruned_heads[0]) == 3
    from transformers import AutoTokenizer

    examples = read_examples(data)
    logits = encode(head, AutoTokenizer.from_pretrained(str(twice)), [e.text for e in examples]).numpy()
    accuracy = float(np.mean([["lights", "music"][i] == e.label for i, e in zip(logits.argmax(1), examples)]))
    assert accuracy == record["measured"]["pruned"]["accuracy"]
    for settings, message in (
        (
            EncoderPruneSettings(heads=0.1),
            r"^--heads 0.1: removes nothing \(a layer has 4 attention heads\); give at least 0.25$",
        ),
        (
            EncoderPruneSettings(heads=0.4),
            r"^--heads 0.4: removes nothing \(a layer has 2 attention heads\); give at least 0.5$",
        ),
        (
            EncoderPruneSettings(ffn=0.01),
            r"^--ffn 0.01: removes nothing \(a layer has 64 FFN channels\); give at least 0.0157$",
        ),
    ):
        model = tiny_classifier if settings.heads != 0.4 else once
        with pytest.raises(ModelError, match=message):
            prune_encoder_directory(str(model), settings, tmp_path / "refused", data, data)
    assert not (tmp_path / "refused").exists()


def test_encoder_options_with_a_model_that_is_not_one_say_what_the_model_is(tmp_path, capsys):
    """A mistyped folder was answered with "--heads ... are for encoders" alone."""
    empty = tmp_path / "empty"
    empty.mkdir()
    tail = (
        "--heads, --data, --eval-data and --target are for encoders (a classifier or embedder folder), "
        "a decoder takes --head-groups and --calibration"
    )
    for model, what in ((tmp_path / "typo", "no such folder"), (empty, "a folder without a config.json")):
        code, line = _main(capsys, "prune", "--model", model, "--out", tmp_path / "out", "--heads", 0.5)
        assert (code, line) == (2, f"error: --model {model}: {what}; {tail}")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{bad")
    code, line = _main(capsys, "prune", "--model", broken, "--out", tmp_path / "out", "--heads", 0.5)
    assert code == 2 and line.startswith(f"error: {broken / 'config.json'}: not valid JSON")


def test_an_embedder_is_measured_on_plain_texts_given_as_eval_data(tiny_embedder, tmp_path):
    """An embedder's --data is texts, one a line; its --eval-data may be the same kind of file, or
    JSONL with or without labels (only a classifier's held-out data needs them)."""
    from edge_slm.core.labelled import DataError, read_retrieval

    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(e.text for e in read_examples(INTENTS_TRAIN)[:40]) + "\n")
    held_out = tmp_path / "held-out.txt"
    held_out.write_text("\n".join(TEXTS) + "\n")
    settings = EncoderPruneSettings(layers=1, score_texts=8)
    record = prune_encoder_directory(str(tiny_embedder), settings, tmp_path / "out", texts, held_out)
    check = read_retrieval()
    assert record["eval_data"] == str(held_out)
    assert record["measured"]["pruned"]["texts"] == len(check.queries) + len(check.passages) + len(TEXTS)
    unlabelled = tmp_path / "held-out.jsonl"  # JSONL needs no label either
    unlabelled.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:3]))
    record = prune_encoder_directory(str(tiny_embedder), settings, tmp_path / "out", texts, unlabelled)
    assert record["measured"]["pruned"]["texts"] == len(check.queries) + len(check.passages) + 3
    unlabelled.write_text('{"text": "play jazz"}\n{"txt": "typo"}\n')
    with pytest.raises(DataError, match=rf"^{unlabelled}:2: each line needs a 'text': a string of 1 to 100,000"):
        prune_encoder_directory(str(tiny_embedder), settings, tmp_path / "out", texts, unlabelled)
    for bad in ('{"text": "a", "n": ' + "9" * 5000 + "}", '{"text": ' + "[" * 10_000 + "]" * 10_000 + "}"):
        unlabelled.write_text('{"text": "play jazz"}\n' + bad + "\n")  # Python's own limits, not a traceback
        with pytest.raises(DataError, match=rf"^{unlabelled}:2: not a JSON object \(.+\); write one"):
            prune_encoder_directory(str(tiny_embedder), settings, tmp_path / "out", texts, unlabelled)


def test_build_prune_names_its_own_options(tiny_classifier, two_label_data, tmp_path, capsys):
    """`build --prune` takes the task's data as --prune-data, and a classifier cannot do without it."""
    profile = write_profile(
        tmp_path / "p.toml",
        "x86-laptop",
        "tiny",
        encoder={"max_sequence_length": 32},
        classifier_prune={"layers": 1, "recover_steps": 0},
    )
    args = ("build", "--target", profile, "--model", tiny_classifier, "--out", tmp_path / "out", "--prune")
    code, line = _main(capsys, *args, "--eval-data", two_label_data)
    assert (code, line) == (
        2,
        "error: a classifier is pruned on its labelled training data: pass --prune-data TRAIN.jsonl",
    )
    assert not (tmp_path / "out").exists()


def test_an_encoder_of_another_layout_is_refused_before_its_config_is_read(tiny_embedder, tmp_path):
    """DistilBERT's config has no intermediate_size: the layout is checked before any setting."""
    import shutil

    from transformers import DistilBertConfig, DistilBertModel

    from edge_slm.core.errors import ModelError

    folder = tmp_path / "distilbert"
    DistilBertModel(DistilBertConfig(vocab_size=400, dim=32, n_layers=2, n_heads=4, hidden_dim=64)).save_pretrained(
        folder
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(tiny_embedder / name, folder / name)
    with pytest.raises(
        ModelError, match=r"^encoder pruning handles the bert and roberta layouts; this model is distilbert$"
    ):
        prune_encoder_directory(str(folder), EncoderPruneSettings(ffn=0.5), tmp_path / "out")


def test_the_smallest_share_suggested_removes_one_and_not_two():
    """The refusal's "give at least" value, as printed (three digits), is accepted and removes one."""
    for count in range(1, 5000):
        printed = float(f"{smallest_share(count):.3g}")
        assert int(printed * count) == 1 and printed >= 1 / count, count


def test_varied_texts_are_batched_by_their_own_length():
    """Texts are varied (cut, joined) before they are cut into batches by length: the batches of a
    pool partition its varied texts in length order, so a joined text never widens a batch of
    short ones."""
    import random

    import torch

    commands = [f"turn off light {i}" for i in range(40)]
    paragraphs = [" ".join(["the garden needs water in the dry weeks of summer"] * 4) + f" {i}" for i in range(24)]
    pool = commands + paragraphs
    batches = _varied_batches(pool, 4, torch.Generator().manual_seed(0), random.Random(0), pool=8)
    drawn = [next(batches) for _ in range(8)]  # one pool's worth
    assert all(len(batch) == 4 for batch in drawn)
    spans = sorted((min(map(len, b)), max(map(len, b))) for b in drawn)
    assert all(previous[1] <= following[0] for previous, following in zip(spans, spans[1:]))
    texts = [t for batch in drawn for t in batch]
    assert any(t not in pool for t in texts)  # varied: some were cut or joined
    again = _varied_batches(pool, 4, torch.Generator().manual_seed(0), random.Random(0), pool=8)
    assert [next(again) for _ in range(8)] == drawn  # the same seeds, the same batches: a run is reproducible


def test_the_embedder_profiles_distillation_reaches_the_recovery():
    """Every [embedder_prune] key the distillation reads arrives in its settings, the shipped
    profiles' hidden-state weight among them: a key dropped on the way would distil with the
    default without a word."""
    from edge_slm.builder.encoder.pruned import recovery_settings
    from edge_slm.core.targets import load_profile

    spec = load_profile("x86-laptop").embedder_prune
    settings = recovery_settings(spec)
    assert (settings.hidden_weight, settings.learning_rate, settings.int8_share, settings.max_length) == (
        10.0,
        5e-4,
        0.2,
        64,
    )
    assert settings.steps == spec.recover_steps and settings.time_budget_s == 60 * spec.recover_minutes
