"""Encoders end to end on tiny random BERTs: export parity on padded batches, the fused graph,
the accuracy gate, fine-tuning (loss goes down, resume), the runtime and the CLI's refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge_slm.cli import main

TEXTS = [
    "turn off the kitchen lights",
    "play",
    "what will the weather be like in Lisbon on Saturday afternoon and should I bring a jacket",
    "add milk and eggs to the shopping list please",
    "set a timer",
]


def run_cli(capsys, *args) -> tuple[int, str, str]:
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def torch_reference(model_dir, texts, task):
    """Each text alone in transformers (no padding): mean pooling + L2 norm, or the logits."""
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    cls = AutoModelForSequenceClassification if task == "classification" else AutoModel
    model = cls.from_pretrained(model_dir).eval()
    rows = []
    with torch.no_grad():
        for text in texts:
            batch = tokenizer([text], return_tensors="pt", truncation=True, max_length=32)  # the profile's limit
            if model.config.model_type != "bert":
                batch.pop("token_type_ids", None)
            out = model(**batch)
            if task == "classification":
                rows.append(out.logits[0].numpy())
            else:
                pooled = out.last_hidden_state[0].mean(0)
                rows.append(torch.nn.functional.normalize(pooled, dim=0).numpy())
    return np.stack(rows)


def test_embedder_bundle_matches_torch_on_padded_batches(embedder_bundles, tiny_embedder):
    from edge_slm import runtime

    model = runtime.load(embedder_bundles[0])
    assert isinstance(model, runtime.Encoder) and model.task == "embedding"
    want = torch_reference(tiny_embedder, TEXTS, "embedding")
    for batch_size in (1, 2, 5):  # padding differs per batch size; the vectors must not
        got = model.embed(TEXTS, batch_size=batch_size)
        assert got.shape == (5, 32) and got.dtype == np.float32
        assert np.abs(got - want).max() < 1e-5, batch_size
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_encoder_graph_uses_fused_operators(embedder_bundles):
    manifest = json.loads((embedder_bundles[0] / "manifest.json").read_text())
    assert manifest["family"] == "encoder" and manifest["graph"]["kind"] == "encoder"
    assert manifest["graph"]["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    # The CPU profiles leave each residual Add + LayerNormalization unfused ([encoder] fuse_skip_layer_norm).
    assert manifest["graph"]["fused"] == {"EmbedLayerNormalization": 1, "Attention": 2, "BiasGelu": 2}
    ops = manifest["graph"]["op_counts"]
    assert ops["MatMul"] == 6 and "Softmax" not in ops and "SkipLayerNormalization" not in ops
    assert ops["LayerNormalization"] == 4 and ops["Add"] == 8  # a bias and a residual add before each
    assert manifest["validation"]["max_abs_diff"] < 1e-4
    assert manifest["model"]["max_sequence_length"] == 32 and manifest["model"]["normalize"] is True


def test_the_device_runs_the_layer_norms_the_build_chose(embedder_bundles, tiny_embedder, tmp_path):
    """onnxruntime fuses unfused residual adds back into SkipLayerNormalization at load (its CPU
    kernel measured slower); a bundle whose build left them apart says so in its manifest, and the
    runtime opens it without that fusion. A profile that fuses them (Jetson's) still gets them,
    and its bundles open as onnxruntime would."""
    import dataclasses

    import onnx

    from edge_slm import runtime
    from edge_slm.builder.pipeline import build
    from edge_slm.core.targets import load_profile
    from edge_slm.runtime.encoder import open_session

    def ops_at_load(bundle: Path) -> dict:
        seen = tmp_path / f"{bundle.name}-optimized.onnx"
        unfused = runtime.load(bundle).graph.unfused_layer_norms  # what the runtime decided from the manifest
        open_session(bundle / "model.onnx", 1, ["CPUExecutionProvider"], None, unfused, optimized_path=seen)
        counts: dict[str, int] = {}
        for node in onnx.load(str(seen)).graph.node:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
        return counts

    manifest = json.loads((embedder_bundles[1] / "manifest.json").read_text())
    assert manifest["graph"]["layer_norms"] == "unfused"
    int8 = ops_at_load(embedder_bundles[1])
    assert int8["LayerNormalization"] == 4 and "SkipLayerNormalization" not in int8
    assert int8.get("DynamicQuantizeMatMul", 0) + int8.get("MatMulInteger", 0) >= 6  # int8 still
    refused = tmp_path / "default-optimized.onnx"  # without the runtime's choice onnxruntime undoes the build's
    open_session(embedder_bundles[1] / "model.onnx", 1, ["CPUExecutionProvider"], optimized_path=refused)
    assert sum(n.op_type == "SkipLayerNormalization" for n in onnx.load(str(refused)).graph.node) == 4
    profile = load_profile("jetson-orin")
    fused = dataclasses.replace(profile, encoder=dataclasses.replace(profile.encoder, max_sequence_length=32))
    manifest = build(str(tiny_embedder), fused, tmp_path / "fused", echo=lambda m: None, precision="fp32")
    assert manifest["graph"]["fused"]["SkipLayerNormalization"] == 4 and manifest["graph"]["layer_norms"] == "fused"
    assert ops_at_load(tmp_path / "fused")["SkipLayerNormalization"] == 4


def test_int8_embedder_is_dynamic_int8_and_measured(embedder_bundles):
    manifest = json.loads((embedder_bundles[1] / "manifest.json").read_text())
    ops = manifest["graph"]["op_counts"]
    # Every MatMul int8 met the budget, so the FFN outputs were not kept float ("if-needed").
    assert ops.get("MatMulInteger") == 6 and "MatMul" not in ops and manifest["quantization"]["float_matmuls"] == 0
    assert manifest["quantization"]["recipe"]["float_after_gelu"] == "if-needed"
    assert ops.get("QAttention") == 2 and ops.get("QEmbedLayerNormalization") == 1
    acc = manifest["accuracy"]
    assert acc["texts"] == 60 + 60 + 309 and 0.5 < acc["mean_cosine"] <= 1.0001
    assert set(acc) >= {"retrieval_agreement", "recall_at_1", "passed", "problems"}


def test_classifier_bundle_matches_torch(classifier_bundle, tiny_classifier):
    from edge_slm import runtime
    from edge_slm.runtime.encoder import softmax

    model = runtime.load(classifier_bundle)
    want = softmax(torch_reference(tiny_classifier, TEXTS, "classification"))
    results = model.classify(TEXTS, batch_size=2)
    got = np.array([[r.probabilities[label] for label in ("lights", "music")] for r in results])
    assert np.abs(got - want).max() < 1e-4
    assert [r.label for r in results] == [("lights", "music")[i] for i in want.argmax(1)]
    assert all(abs(sum(r.probabilities.values()) - 1) < 1e-5 for r in results)


def test_gate_fails_a_broken_quantization_with_the_numbers(embedder_bundles, tiny_classifier, tmp_path):
    """Negating the int8 graph's quantized weights breaks it: the gate says so and how much."""
    import onnx
    from onnx import numpy_helper
    from transformers import AutoTokenizer

    from edge_slm.builder.encoder import gate
    from edge_slm.builder.encoder.export import export_encoder, load_torch_encoder
    from edge_slm.builder.encoder.precision import reduce_precision
    from edge_slm.builder.encoder.source import load_encoder
    from edge_slm.core.errors import AccuracyBudgetError
    from edge_slm.core.labelled import INTENTS_TEST, read_examples
    from edge_slm.core.targets import Encoder, load_profile
    from edge_slm.runtime.encoder import EncoderGraph

    source = load_encoder(str(tiny_classifier))
    tokenizer = AutoTokenizer.from_pretrained(tiny_classifier)
    exported = export_encoder(load_torch_encoder(source), source, tokenizer, load_profile("x86-laptop"), tmp_path)
    out = tmp_path / "int8"
    out.mkdir()
    reduce_precision(exported.onnx_path, Encoder(), out)
    proto = onnx.load(str(out / "model.onnx"))
    weights = [i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    for weight in weights:
        flipped = -numpy_helper.to_array(weight).astype(np.int16)
        weight.CopyFrom(numpy_helper.from_array(flipped.clip(-127, 127).astype(np.int8), weight.name))
    onnx.save(proto, str(out / "broken.onnx"))

    def graph(path):
        return EncoderGraph(
            path, tokenizer.backend_tokenizer, list(exported.inputs), 32, 0, 1, ["CPUExecutionProvider"]
        )

    examples = [e for e in read_examples(INTENTS_TEST) if e.label in ("lights", "music")]
    measured = gate.measure_classifier(
        graph(out / "broken.onnx"), graph(exported.onnx_path), examples, ["lights", "music"]
    )
    assert measured["texts"] == len(examples) == 88 and measured["label_agreement"] < 0.99
    with pytest.raises(AccuracyBudgetError) as error:
        gate.check(measured, "classification", Encoder(), "int8", allow=False)
    agreement = f"{100 * measured['label_agreement']:.1f}%"
    assert f"labels agree with fp32 on {agreement} of 88 test texts (budget >= 99.0%)" in str(error.value)
    kept = gate.check(measured, "classification", Encoder(), "int8", allow=True)
    assert kept["passed"] is False and kept["problems"]


def _separable(tmp_path, n_train=120, n_eval=40):
    """lights vs music from the shipped intents: separable by their words."""
    from edge_slm.core.labelled import INTENTS_TEST, INTENTS_TRAIN, read_examples

    def pick(path, n):
        rows = [e for e in read_examples(path) if e.label in ("lights", "music")][:n]
        return "".join(json.dumps({"text": e.text, "label": e.label}) + "\n" for e in rows)

    (tmp_path / "train.jsonl").write_text(pick(INTENTS_TRAIN, n_train))
    (tmp_path / "eval.jsonl").write_text(pick(INTENTS_TEST, n_eval))
    return tmp_path / "train.jsonl", tmp_path / "eval.jsonl"


def test_finetune_lowers_validation_loss_and_writes_a_hf_classifier(tmp_path, tiny_embedder, capsys):
    from transformers import AutoModelForSequenceClassification

    train, evaluation = _separable(tmp_path)
    out = tmp_path / "clf"
    args = ["finetune", "--model", str(tiny_embedder), "--data", str(train), "--eval", str(evaluation)]
    code, stdout, stderr = run_cli(
        capsys, *args, "--out", str(out), "--epochs", "2", "--lr", "2e-3", "--batch-size", "4"
    )
    assert code == 0, stderr
    epochs = [line for line in stderr.splitlines() if line.startswith("Epoch ")]
    assert len(epochs) == 2 and all("Validation Loss:" in line and "Accuracy:" in line for line in epochs)
    record = json.loads((out / "edge_slm_finetune.json").read_text())
    first, second = record["history"]
    assert second["validation_loss"] < first["validation_loss"]
    assert record["best_epoch"] == 2 and record["labels"] == ["lights", "music"]
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.id2label == {0: "lights", 1: "music"} and model.config.label2id == {"lights": 0, "music": 1}
    assert len((out / "eval.jsonl").read_text().splitlines()) == 40
    assert not (tmp_path / ".clf.finetune-state").exists()  # removed once the run completed
    assert f"classifier ready: {out}" in stdout


def test_finetune_resumes_after_an_interruption(tmp_path, tiny_embedder):
    from edge_slm.builder.encoder.finetune import FinetuneSettings, finetune, state_dir
    from edge_slm.core.labelled import read_examples

    train, evaluation = (read_examples(p) for p in _separable(tmp_path, 48, 16))
    settings = FinetuneSettings(epochs=2, lr=2e-3, batch_size=4)
    out = tmp_path / "clf"

    def stop_after_first_epoch(line):
        if line.startswith("Epoch 1,"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(str(tiny_embedder), train, evaluation, settings, out, progress=stop_after_first_epoch)
    assert not out.exists() and (state_dir(out) / "state.pt").is_file()
    lines = []
    record = finetune(str(tiny_embedder), train, evaluation, settings, out, progress=lines.append)
    assert lines[0] == f"resuming after epoch 1 (saved state in {state_dir(out)})"
    assert [h["epoch"] for h in record["history"]] == [1, 2] and sum(line.startswith("Epoch") for line in lines) == 1
    uninterrupted = finetune(
        str(tiny_embedder), train, evaluation, settings, tmp_path / "again", progress=lambda m: None
    )
    assert record["history"][1]["validation_loss"] == pytest.approx(
        uninterrupted["history"][1]["validation_loss"], rel=1e-4
    )


def test_bad_encoder_input_is_one_line_and_exit_2(tmp_path, capsys, classifier_bundle, embedder_bundles, tiny_bundle):
    one_class = tmp_path / "one.jsonl"
    one_class.write_text(
        '{"text": "turn on the lights", "label": "lights"}\n{"text": "lights off", "label": "lights"}\n'
    )
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "turn on the lights", "label": "lights"}\n{"text": "oops"\n')
    out = str(tmp_path / "never")
    cases = [
        (["classify", str(classifier_bundle), "   "], "error: text 1 is empty; give each text some words"),
        (
            ["classify", str(tiny_bundle), "hello"],
            f"error: {tiny_bundle} is a decoder bundle: generate, chat or serve it",
        ),
        (
            ["generate", str(classifier_bundle), "hello"],
            f"error: {classifier_bundle} is an encoder bundle: classify or embed with it",
        ),
        (
            ["embed", str(classifier_bundle), "hi"],
            f"error: {classifier_bundle} is a classification bundle, not a embedding one: use `edge-slm classify` with it",
        ),
        (
            ["finetune", "--data", str(one_class), "--out", out],
            f"error: {one_class}: 1 class (lights); a classifier needs at least 2",
        ),
        (
            ["finetune", "--data", str(broken), "--out", out],
            f"error: {broken}:2: not a JSON object (Expecting ',' delimiter); write one {{'text', 'label'}} per line",
        ),
        (["embed", str(embedder_bundles[0]), "hi", "--out", str(one_class.with_suffix(".npy"))], None),
    ]
    for args, message in cases[:-1]:
        code, stdout, stderr = run_cli(capsys, *args)
        assert code == 2 and stderr.strip() == message, (args, stderr)
    one_class.with_suffix(".npy").write_text("my notes")
    code, _, stderr = run_cli(capsys, *cases[-1][0])
    assert code == 2 and "exists and is not a NumPy file; edge-slm will not replace it" in stderr
    assert one_class.with_suffix(".npy").read_text() == "my notes"


def test_long_texts_are_truncated_with_a_warning_or_refused(classifier_bundle, caplog):
    from edge_slm import runtime
    from edge_slm.runtime.encoder import InputError

    model = runtime.load(classifier_bundle)
    long_text = "please turn the lights in the kitchen off " * 20
    with caplog.at_level("WARNING"):
        (result,) = model.classify([long_text])
    assert "1 text(s) longer than 32 tokens were truncated" in caplog.text
    assert result.probability == pytest.approx(model.classify([long_text])[0].probability)
    with pytest.raises(InputError, match=r"text 2 has \d+ tokens; this bundle takes at most 32"):
        model.classify(["lights on", long_text], truncate=False)


def test_classify_and_embed_commands(capsys, classifier_bundle, embedder_bundles, tmp_path):
    code, stdout, _ = run_cli(capsys, "classify", str(classifier_bundle), "turn off the lights", "play jazz", "--json")
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert code == 0 and [r["text"] for r in rows] == ["turn off the lights", "play jazz"]
    assert all(set(r["probabilities"]) == {"lights", "music"} and r["label"] in ("lights", "music") for r in rows)
    vectors = tmp_path / "v.npy"
    code, _, stderr = run_cli(capsys, "embed", str(embedder_bundles[0]), "a", "b c", "--out", str(vectors))
    assert code == 0 and np.load(vectors).shape == (2, 32) and "2 vectors of 32 dimensions" in stderr
    code, stdout, _ = run_cli(capsys, "eval", str(embedder_bundles[0]), "--json")
    result = json.loads(stdout)
    assert code == 0 and result["queries"] == 60 and 0 <= result["recall_at_1"] <= result["recall_at_5"] <= 1


@pytest.mark.parametrize("layout", ["distilbert", "roberta"])
def test_other_encoder_layouts_build_and_match_torch(layout, tiny_embedder, encoder_profile, tmp_path):
    """DistilBERT and RoBERTa classifiers take the same path; the optimizer fuses what it
    recognises (RoBERTa's attention; DistilBERT's stays plain MatMul/Softmax) and parity holds."""
    import torch
    from transformers import (
        BertTokenizerFast,
        DistilBertConfig,
        DistilBertForSequenceClassification,
        RobertaConfig,
        RobertaForSequenceClassification,
    )

    from edge_slm import runtime
    from edge_slm.builder.pipeline import build
    from edge_slm.core.targets import load_profile
    from edge_slm.runtime.encoder import softmax

    tokenizer = BertTokenizerFast.from_pretrained(tiny_embedder)
    labels = {"id2label": {0: "lights", 1: "music"}, "label2id": {"lights": 0, "music": 1}}
    if layout == "distilbert":
        config = DistilBertConfig(
            vocab_size=tokenizer.vocab_size, dim=32, n_layers=2, n_heads=4, hidden_dim=64, **labels
        )
        cls = DistilBertForSequenceClassification
    else:
        config = RobertaConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=66,
            pad_token_id=0,
            type_vocab_size=1,
            **labels,
        )
        cls = RobertaForSequenceClassification
    torch.manual_seed(0)
    cls(config).save_pretrained(tmp_path / layout)
    tokenizer.save_pretrained(tmp_path / layout)
    manifest = build(
        str(tmp_path / layout),
        load_profile(str(encoder_profile)),
        tmp_path / "out",
        echo=lambda m: None,
        precision="fp32",
    )
    assert manifest["model"]["model_type"] == layout and manifest["graph"]["inputs"] == ["input_ids", "attention_mask"]
    assert manifest["graph"]["fused"].get("Attention", 0) == (2 if layout == "roberta" else 0)
    want = softmax(torch_reference(tmp_path / layout, TEXTS, "classification"))
    got = [r.probabilities for r in runtime.load(tmp_path / "out").classify(TEXTS, batch_size=2)]
    assert np.abs(np.array([[p["lights"], p["music"]] for p in got]) - want).max() < 1e-5


def test_labelled_data_from_csv_and_its_errors(tmp_path):
    from edge_slm.core.labelled import DataError, read_examples

    good = tmp_path / "data.csv"
    good.write_text('text,label\n"turn on the lights, please",lights\nplay jazz,music\n', encoding="utf-8")
    assert [(e.text, e.label) for e in read_examples(good)] == [
        ("turn on the lights, please", "lights"),
        ("play jazz", "music"),
    ]
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nplay jazz,music\nlights on,\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.csv:3: 'label' must be a non-empty string"):
        read_examples(bad)
    headless = tmp_path / "headless.csv"
    headless.write_text("play jazz,music\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"headless.csv:1: the CSV header must name the columns 'text' and 'label'"):
        read_examples(headless)


def test_inspect_describes_an_encoder_bundle(capsys, embedder_bundles):
    code, stdout, _ = run_cli(capsys, "inspect", str(embedder_bundles[1]))
    lines = dict(line.split(None, 1) for line in stdout.splitlines() if " " in line and not line.startswith(" "))
    assert code == 0 and lines["target"].startswith("tiny-encoder-laptop   precision int8")
    assert lines["model"].startswith("BertModel encoder, embedding: 2 layers, hidden 32, heads 4")
    assert lines["output"] == "sentence_embedding [batch, 32] (mean pooling, L2-normalized)"
    assert lines["quantize"] == "int8-dynamic" and lines["accuracy"].startswith("mean cosine to fp32 ")
    assert stdout.rstrip().endswith("all checksums verified")


def test_a_manifest_that_disagrees_with_its_encoder_graph_is_refused(classifier_bundle, tmp_path):
    """A bundle from elsewhere whose manifest claims a third label (files intact, schema valid)."""
    import shutil

    from edge_slm import runtime
    from edge_slm.core.errors import BundleError

    bundle = tmp_path / "bundle"
    shutil.copytree(classifier_bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["model"]["labels"] = ["lights", "music", "weather"]
    manifest["model"]["output_dim"] = 3
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"the graph's output has 2 columns, the manifest says 3 \(labels\)"):
        runtime.load(bundle)
    manifest["model"]["output_dim"] = 2  # labels and output_dim disagree: the schema check says so
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"a classifier's model.labels must name its 2 outputs"):
        runtime.load(bundle)


def test_the_ffn_outputs_stay_float_when_all_int8_misses_the_budget(tiny_embedder, tmp_path):
    """With a budget no int8 graph meets, the build measures all-int8, keeps the MatMuls after
    GELU float, measures again, and (allowed to) ships that graph with the numbers."""
    from conftest import write_profile

    from edge_slm.builder.pipeline import build
    from edge_slm.core.targets import load_profile

    profile = write_profile(
        tmp_path / "strict.toml", "x86-laptop", "strict", encoder={"max_sequence_length": 32, "min_cosine": 0.9999999}
    )
    notes = []
    manifest = build(
        str(tiny_embedder), load_profile(str(profile)), tmp_path / "out", echo=notes.append, allow_accuracy_loss=True
    )
    assert any("outside budget with every MatMul int8; keeping the MatMuls after GELU float" in n for n in notes)
    assert manifest["quantization"]["recipe"]["float_after_gelu"] == "always"
    assert manifest["graph"]["op_counts"]["MatMul"] == 2 and manifest["graph"]["op_counts"]["MatMulInteger"] == 4
    assert manifest["accuracy"]["passed"] is False and "mean cosine to fp32" in manifest["accuracy"]["problems"][0]


def test_tensorrt_shape_profiles_span_one_token_to_a_batch_of_the_longest_input(classifier_bundle):
    from edge_slm.core.bundle import read_manifest
    from edge_slm.runtime.encoder import encoder_provider_options

    manifest = read_manifest(classifier_bundle)
    trt, cpu = encoder_provider_options(["TensorrtExecutionProvider", "CPUExecutionProvider"], manifest)
    assert cpu == {} and trt["trt_int8_enable"] == "False"  # an fp32 bundle
    assert trt["trt_profile_min_shapes"] == "input_ids:1x1,attention_mask:1x1,token_type_ids:1x1"
    assert trt["trt_profile_opt_shapes"] == "input_ids:8x32,attention_mask:8x32,token_type_ids:8x32"
    assert trt["trt_profile_max_shapes"] == "input_ids:32x32,attention_mask:32x32,token_type_ids:32x32"
    assert trt["trt_engine_cache_path"].endswith(manifest.files["model.onnx"].sha256[:16])
