"""Extractive question-answering bundles: a tiny random BertForQuestionAnswering made here, built
into an encoder bundle (task question-answering), read by the device's `SpanReader` and compared
with torch and with transformers' `pipeline("question-answering")`; `finetune --task qa`;
`ask --reader`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_encoder

from edge_slm.cli import main
from edge_slm.core.squad import read_squad

# Sentences in the tiny tokenizer's vocabulary (learned from the shipped intents), so that a
# context is words, not letters; long enough to take several 32-token windows.
CONTEXT = (
    "turn on the lights in the kitchen please and play some music in the living room then set an alarm for "
    "seven in the morning and tell me the weather for tomorrow and turn off the lights in the bedroom at ten "
    "then play the news and set a timer for twenty minutes"
)
QUESTIONS = ("what music", "when is the alarm", "which lights", "weather tomorrow", "timer")


def run_cli(capsys, *args) -> tuple[int, str, str]:
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def squad_file(path, rows) -> str:
    """A SQuAD-format file of (question, context, answer) rows, the answer's offset found in its context."""
    paragraphs = [
        {
            "context": context,
            "qas": [{"id": str(i), "question": q, "answers": [{"text": a, "answer_start": context.find(a)}]}],
        }
        for i, (q, context, a) in enumerate(rows)
    ]
    path.write_text(json.dumps({"data": [{"title": "t", "paragraphs": paragraphs}]}))
    return str(path)


@pytest.fixture(scope="module")
def tiny_reader(tmp_path_factory):
    return make_encoder(tmp_path_factory.mktemp("tiny-reader"), "question-answering", seed=0)


@pytest.fixture(scope="module")
def reader_bundle(tmp_path_factory, tiny_reader, encoder_profile):
    from edge_slm.builder.pipeline import build
    from edge_slm.core.targets import load_profile

    out = tmp_path_factory.mktemp("reader-bundle") / "fp32"
    build(str(tiny_reader), load_profile(str(encoder_profile)), out, echo=lambda m: None, precision="fp32")
    return out


@pytest.fixture(scope="module")
def pipe(tiny_reader):
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer, pipeline

    model = AutoModelForQuestionAnswering.from_pretrained(str(tiny_reader))
    return pipeline("question-answering", model=model, tokenizer=AutoTokenizer.from_pretrained(str(tiny_reader)))


def test_a_question_answering_model_builds_to_a_reader_whose_logits_are_torchs(tiny_reader, reader_bundle):
    import torch
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    from edge_slm import runtime

    manifest = json.loads((reader_bundle / "manifest.json").read_text())
    assert manifest["model"]["task"] == "question-answering" and manifest["graph"]["output"] == "span_logits"
    assert manifest["model"]["output_dim"] == 2 and manifest["validation"]["max_abs_diff"] <= 1e-3
    reader = runtime.load(reader_bundle)
    assert reader.answer(QUESTIONS[0], CONTEXT)  # loads the span reader
    windows = reader._reader.windows(QUESTIONS[0], CONTEXT, 32, 8)
    assert len(windows) == 3  # the context takes several windows
    got = reader._reader.logits(windows)  # one padded batch of them
    model = AutoModelForQuestionAnswering.from_pretrained(str(tiny_reader)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_reader))
    batch = tokenizer(
        QUESTIONS[0], CONTEXT, truncation="only_second", max_length=32, stride=8, return_overflowing_tokens=True
    )
    assert [list(e.ids) for e in windows] == batch["input_ids"]  # the same windows as transformers' tokenizer
    with torch.no_grad():
        for row, ids in enumerate(batch["input_ids"]):
            out = model(input_ids=torch.tensor([ids]), token_type_ids=torch.tensor([batch["token_type_ids"][row]]))
            want = torch.stack([out.start_logits[0], out.end_logits[0]], -1).numpy()
            # fp32 onnxruntime against torch on logits of magnitude ~10: 1e-4 is float32 rounding.
            np.testing.assert_allclose(got[row], want, atol=1e-4)


@pytest.mark.parametrize("options", [{}, {"top_k": 3}, {"doc_stride": 4, "max_answer_len": 4, "top_k": 2}])
def test_the_best_spans_are_the_question_answering_pipelines(reader_bundle, pipe, options):
    from edge_slm import runtime

    reader = runtime.load(reader_bundle)
    for question in QUESTIONS:
        want = pipe(question=question, context=CONTEXT, max_seq_len=32, **options)
        want = want if isinstance(want, list) else [want]
        got = reader.answer(question, CONTEXT, max_seq_len=32, **options)
        assert [(s.answer, s.start, s.end) for s in got] == [(w["answer"], w["start"], w["end"]) for w in want]
        # A score is P(start) * P(end): onnxruntime's logits differ from torch's by ~1e-5 (float32
        # summation order), which moves a probability by about that much relative; 1e-4 leaves room.
        np.testing.assert_allclose([s.score for s in got], [w["score"] for w in want], rtol=1e-4)


def test_the_reader_refuses_what_it_cannot_read(reader_bundle):
    from edge_slm import runtime
    from edge_slm.core.errors import EdgeSlmError

    reader = runtime.load(reader_bundle)
    with pytest.raises(EdgeSlmError, match=r"the question takes \d+ of the 32 tokens of a window, leaving no room"):
        reader.answer(CONTEXT, CONTEXT)
    with pytest.raises(EdgeSlmError, match="the context is empty"):
        reader.answer("what music", "  ")
    with pytest.raises(EdgeSlmError, match="doc_stride is 40; with this question a window holds"):
        reader.answer("what music", CONTEXT, doc_stride=40)
    with pytest.raises(EdgeSlmError, match="question-answering bundle: it cannot embed; use answer with it"):
        reader.embed(["what music"])


def test_an_int8_reader_is_gated_on_exact_match_and_f1_against_fp32(tiny_reader, encoder_profile, tmp_path):
    from edge_slm.builder.pipeline import build
    from edge_slm.core.errors import AccuracyBudgetError
    from edge_slm.core.targets import load_profile

    rows = [(q, CONTEXT, "music") for q in QUESTIONS] + [("which room", "play music in the kitchen", "kitchen")]
    gate = squad_file(tmp_path / "gate.json", rows)
    profile = load_profile(str(encoder_profile))
    manifest = build(
        str(tiny_reader), profile, tmp_path / "int8", echo=lambda m: None, eval_data=gate, allow_accuracy_loss=True
    )
    accuracy = manifest["accuracy"]
    assert manifest["precision"] == "int8" and accuracy["questions"] == 6 and accuracy["data"] == gate
    assert 0 <= accuracy["exact_match_to_fp32"] <= 1 and 0 <= accuracy["f1_to_fp32"] <= 1
    assert accuracy["passed"] == (accuracy["exact_match_to_fp32"] >= 0.9 and accuracy["f1_to_fp32"] >= 0.95)
    long_only = squad_file(tmp_path / "long.json", [(CONTEXT, CONTEXT, "music")])
    with pytest.raises(AccuracyBudgetError, match="none of the 1 gate questions fits a 32-token window"):
        build(str(tiny_reader), profile, tmp_path / "refused", echo=lambda m: None, eval_data=long_only)


def test_finetune_task_qa_lowers_the_loss_and_builds(tiny_embedder, encoder_profile, tmp_path, capsys):
    """An embedder (BERT's usual small random weights) given a reader's head and trained on it."""
    rows = [
        ("what music", "play some jazz music in the kitchen", "jazz"),
        ("which room", "turn on the lights in the kitchen", "kitchen"),
        ("what time", "set an alarm for seven in the morning", "seven"),
        ("which room", "play the news in the bedroom", "bedroom"),
        ("what music", "play some rock music please", "rock"),
        ("what time", "wake me up at ten", "ten"),
    ] * 4
    data = squad_file(tmp_path / "train.json", rows)
    out = tmp_path / "reader"
    args = ("finetune", "--task", "qa", "--model", tiny_embedder, "--data", data, "--out", out, "--max-length", 32)
    code, stdout, err = run_cli(capsys, *args, "--epochs", 4, "--lr", 3e-3, "--batch-size", 8)
    assert code == 0, err
    record = json.loads((out / "edge_slm_finetune.json").read_text())
    losses = [epoch["train_loss"] for epoch in record["history"]]
    assert losses[-1] < 0.6 * losses[0], losses  # measured: 2.7, 2.2, 1.7, 1.2
    assert "reader ready" in stdout and len(read_squad(out / "eval-squad.json")) == 2
    code, stdout, err = run_cli(
        capsys, "build", "--model", out, "--target", encoder_profile, "--precision", "fp32", "--out", tmp_path / "b"
    )
    assert code == 0, err
    assert (
        f'run it:       edge-slm ask INDEX "How many user codes can the lock store?" --reader {tmp_path / "b"}'
        in stdout
    )
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["model"]["task"] == "question-answering"


@pytest.mark.parametrize(
    ("paragraph", "message"),
    [
        ({"context": "play jazz", "qas": [{"id": "a", "question": "what", "answers": []}]}, "question 'a': no answers"),
        (
            {
                "context": "play jazz",
                "qas": [{"id": "b", "question": "what", "answers": [{"text": "rock", "answer_start": 5}]}],
            },
            "question 'b': the answer 'rock' is not in the context at character 5",
        ),
    ],
)
def test_finetune_task_qa_refuses_questions_without_a_usable_answer(tiny_reader, tmp_path, capsys, paragraph, message):
    data = tmp_path / "bad.json"
    data.write_text(json.dumps({"data": [{"paragraphs": [paragraph]}]}))
    code, _, err = run_cli(
        capsys, "finetune", "--task", "qa", "--model", tiny_reader, "--data", data, "--out", tmp_path / "o"
    )
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_ask_with_a_reader_answers_with_a_span_of_the_sources(reader_bundle, embedder_bundles, tmp_path, capsys):
    from edge_slm.runtime.index import build_index

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "home.md").write_text("# Home\n\n## Evening\n\n" + CONTEXT.replace(" then ", ". Then ") + ".\n")
    build_index(docs, embedder_bundles[0], tmp_path / "home.index")
    args = ("ask", tmp_path / "home.index", "what music", "--reader", reader_bundle, "--min-score", -1, "--json")
    code, stdout, err = run_cli(capsys, *args)
    assert code == 0, err
    answer = json.loads(stdout)
    assert answer["answer"] and any(answer["answer"] in source["text"] for source in answer["sources"])
    code, _, err = run_cli(capsys, "ask", tmp_path / "home.index", "what music", "--reader", embedder_bundles[0])
    assert code == 2 and "is an encoder bundle for embedding, not question-answering: give one built" in err
