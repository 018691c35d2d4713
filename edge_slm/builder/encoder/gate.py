"""The encoder accuracy gate: the reduced-precision graph against the fp32 graph of the same build.

  classifier  labels agreeing with fp32 on the test texts (>= min_label_agreement) and test
              accuracy at most max_accuracy_drop below fp32's (when the texts carry labels the
              model knows)
  embedder    mean cosine similarity to fp32's embeddings (>= min_cosine) and the same top-1
              passage as fp32 for the shipped retrieval queries (>= min_retrieval_agreement)
  reader      (question-answering) the same best answer as fp32: exact match and F1 (`qa.py`)

Outside budget fails the build with the numbers, unless --allow-accuracy-loss.
"""

from __future__ import annotations

import numpy as np

from edge_slm.core.errors import AccuracyBudgetError
from edge_slm.core.labelled import Example, RetrievalCheck
from edge_slm.core.targets import Encoder as EncoderSpec
from edge_slm.runtime.encoder_eval import best_passages, unit


def measure_classifier(candidate, reference, examples: list[Example], labels: list[str]) -> dict:
    texts = [e.text for e in examples]
    got = candidate.run(texts).argmax(axis=1)
    want = reference.run(texts).argmax(axis=1)
    measured = {"texts": len(texts), "label_agreement": float((got == want).mean())}
    index = {label: i for i, label in enumerate(labels)}
    if all(e.label in index for e in examples):
        truth = np.array([index[e.label] for e in examples])
        measured["accuracy"] = float((got == truth).mean())
        measured["reference_accuracy"] = float((want == truth).mean())
    return measured


def retrieval_top1(graph, check: RetrievalCheck) -> np.ndarray:
    """Each query's best passage by cosine similarity."""
    return best_passages(graph.run(check.queries), graph.run(check.passages))[:, 0]


def measure_embedder(candidate, reference, check: RetrievalCheck, extra_texts: list[str]) -> dict:
    texts = check.queries + check.passages + extra_texts
    cosine = (unit(candidate.run(texts)) * unit(reference.run(texts))).sum(axis=1)
    got, want = retrieval_top1(candidate, check), retrieval_top1(reference, check)
    truth = np.arange(len(check.queries))
    return {
        "texts": len(texts),
        "mean_cosine": float(cosine.mean()),
        "min_cosine": float(cosine.min()),
        "retrieval_agreement": float((got == want).mean()),
        "recall_at_1": float((got == truth).mean()),
        "reference_recall_at_1": float((want == truth).mean()),
    }


def check(measured: dict, task: str, spec: EncoderSpec, precision: str, allow: bool) -> dict:
    """The manifest's accuracy section; AccuracyBudgetError outside budget unless `allow`."""
    problems = []
    if task == "question-answering":
        from edge_slm.builder.encoder.qa import reader_problems

        problems = reader_problems(measured)
    elif task == "classification":
        if measured["label_agreement"] < spec.min_label_agreement:
            problems.append(
                f"labels agree with fp32 on {100 * measured['label_agreement']:.1f}% of {measured['texts']} test "
                f"texts (budget >= {100 * spec.min_label_agreement:.1f}%)"
            )
        if "accuracy" in measured and measured["reference_accuracy"] - measured["accuracy"] > spec.max_accuracy_drop:
            problems.append(
                f"test accuracy {100 * measured['accuracy']:.1f}% vs fp32 {100 * measured['reference_accuracy']:.1f}% "
                f"(budget: at most {100 * spec.max_accuracy_drop:.1f} points lower)"
            )
    else:
        if measured["mean_cosine"] < spec.min_cosine:
            problems.append(f"mean cosine to fp32 {measured['mean_cosine']:.4f} (budget >= {spec.min_cosine})")
        if measured["retrieval_agreement"] < spec.min_retrieval_agreement:
            problems.append(
                f"the same top-1 passage as fp32 for {100 * measured['retrieval_agreement']:.1f}% of queries "
                f"(budget >= {100 * spec.min_retrieval_agreement:.0f}%)"
            )
    if problems and not allow:
        raise AccuracyBudgetError(
            f"{precision} encoder outside its accuracy budget: {'; '.join(problems)}. Try another precision "
            "(--precision fp32) or recipe in the profile's [encoder] table, or pass --allow-accuracy-loss"
        )
    return {**measured, "passed": not problems, "problems": problems}
