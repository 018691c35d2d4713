"""What a question-answering (extractive reader) build checks, beside the classifier's and the
embedder's checks:

  validate  each (question, context) pair alone in torch (no padding) against the fp32 graph in a
            padded batch of mixed lengths: max |start/end logit difference| <= 1e-3
  gate      the reduced graph's best answers against the fp32 graph's on the shipped SQuAD-format
            set (`core/squad.py`, 155 questions over sections of the manuals), read with the
            device's reader (`runtime/reader.py`): exact match >= 0.9 and mean F1 >= 0.95 against
            fp32's answers; the answers' exact match and F1 against the expected ones are recorded
"""

from __future__ import annotations

import re
import string
from collections import Counter

import numpy as np

from edge_slm.core.errors import AccuracyBudgetError, ParityError
from edge_slm.core.squad import SquadQuestion

PARITY_TOLERANCE = 1e-3  # start/end logits are O(1-10), as a classifier's
MIN_EXACT_AGREEMENT = 0.9  # the reduced graph's best answer is fp32's, word for word, for 90% of questions
MIN_F1_AGREEMENT = 0.95  # and overlaps it by 0.95 F1 on average
VALIDATION_PAIRS = (
    ("How many user codes can the lock store?", "The lock stores up to 50 user codes. Each code is 4 to 8 digits."),
    ("What does E20 mean?", "E20: the machine cannot drain. Clean the drain pump filter and check the drain hose."),
    ("Who?", "Nobody."),
    (
        "When does the router look for new firmware, and can I stop it from installing updates by itself?",
        "The router checks for new firmware every night at 3 a.m. and installs it automatically. During an update "
        "the light pulses white; do not unplug the router. You can turn automatic updates off under System.",
    ),
)


def validate_reader(exported, head, tokenizer) -> dict:
    """Max |diff| of start and end logits between torch and the fp32 graph; ParityError beyond tolerance."""
    import torch

    from edge_slm.builder.encoder.validate import graph_of

    limit = exported.shape["max_sequence_length"]
    questions, contexts = zip(*VALIDATION_PAIRS)
    batch = tokenizer(list(questions), list(contexts), truncation=True, max_length=limit)
    graph = graph_of(exported, tokenizer)
    (got,) = graph.session.run(None, graph.feed(batch.encodings))
    diff = 0.0
    with torch.no_grad():
        for row, (question, context) in enumerate(VALIDATION_PAIRS):
            alone = tokenizer([question], [context], truncation=True, max_length=limit, return_tensors="pt")
            want = head(*(alone[name] for name in exported.inputs))[0].numpy()
            diff = max(diff, float(np.abs(got[row, : len(want)] - want).max()))
    if not diff <= PARITY_TOLERANCE:
        raise ParityError(
            f"the exported reader's start/end logits differ from torch by {diff:.2e} "
            f"(tolerance {PARITY_TOLERANCE:.0e}) on padded batches"
        )
    return {"max_abs_diff": diff, "tolerance": PARITY_TOLERANCE, "pairs": len(VALIDATION_PAIRS), "batch_size": 4}


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalization: lower case, no punctuation, no articles, single spaces."""
    text = "".join(c for c in text.lower() if c not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def f1_score(prediction: str, truth: str) -> float:
    """SQuAD's token F1 of two answers after `normalize_answer`."""
    got, want = normalize_answer(prediction).split(), normalize_answer(truth).split()
    same = sum((Counter(got) & Counter(want)).values())
    if not got or not want:
        return float(got == want)
    if same == 0:
        return 0.0
    precision, recall = same / len(got), same / len(want)
    return 2 * precision * recall / (precision + recall)


def score_answers(predictions: list[str], truths: list[list[str]]) -> dict:
    """Exact match and F1 (the best over each question's accepted answers), as SQuAD's script."""
    exact = [max(normalize_answer(p) == normalize_answer(t) for t in ts) for p, ts in zip(predictions, truths)]
    f1 = [max(f1_score(p, t) for t in ts) for p, ts in zip(predictions, truths)]
    return {"exact_match": float(np.mean(exact)), "f1": float(np.mean(f1))}


def best_answers(graph, questions: list[SquadQuestion]) -> list[str]:
    from edge_slm.runtime.reader import SpanReader

    reader = SpanReader(graph)
    return [reader.answer(q.question, q.context)[0].answer for q in questions]


def measure_reader(candidate, reference, questions: list[SquadQuestion]) -> dict:
    """The reduced graph's answers against fp32's and the expected ones; questions too long for a
    window of this bundle beside some context are left out (counted)."""
    from edge_slm.runtime.reader import SpanReader

    reader, total = SpanReader(reference), len(questions)
    questions = [q for q in questions if reader.context_room(q.question, reader.max_seq_len) >= 2]
    if not questions:
        raise AccuracyBudgetError(
            f"none of the {total} gate questions fits a {reader.max_seq_len}-token window beside its context: "
            "give shorter ones with --eval-data (SQuAD-format JSON)"
        )
    got, want = best_answers(candidate, questions), best_answers(reference, questions)
    agreement = score_answers(got, [[w] for w in want])
    gold = [[text for text, _ in q.answers] for q in questions]
    truth, reference_truth = score_answers(got, gold), score_answers(want, gold)
    return {
        "questions": len(questions),
        "too_long_left_out": total - len(questions),
        "exact_match_to_fp32": agreement["exact_match"],
        "f1_to_fp32": agreement["f1"],
        "exact_match": truth["exact_match"],
        "f1": truth["f1"],
        "reference_exact_match": reference_truth["exact_match"],
        "reference_f1": reference_truth["f1"],
    }


def reader_problems(measured: dict) -> list[str]:
    problems = []
    if measured["exact_match_to_fp32"] < MIN_EXACT_AGREEMENT:
        problems.append(
            f"the best answer is fp32's for {100 * measured['exact_match_to_fp32']:.1f}% of {measured['questions']} "
            f"questions (budget >= {100 * MIN_EXACT_AGREEMENT:.0f}%)"
        )
    if measured["f1_to_fp32"] < MIN_F1_AGREEMENT:
        problems.append(f"F1 to fp32's answers {measured['f1_to_fp32']:.3f} (budget >= {MIN_F1_AGREEMENT})")
    return problems
