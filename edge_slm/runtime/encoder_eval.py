"""Encoder accuracy on the device: a classifier's accuracy on labelled texts, an embedder's
retrieval check (does each query find its own passage). `edge-slm eval --data` prints these;
the build's gate uses the same retrieval ranking."""

from __future__ import annotations

import numpy as np

from edge_slm.core.errors import EdgeSlmError


def unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def best_passages(query_vectors: np.ndarray, passage_vectors: np.ndarray) -> np.ndarray:
    """Each query's passages, most similar first (cosine)."""
    return np.argsort(-(unit(query_vectors) @ unit(passage_vectors).T), axis=1, kind="stable")


def evaluate_classifier(model, examples) -> dict:
    unknown = sorted({e.label for e in examples} - set(model.labels))
    if unknown:
        raise EdgeSlmError(
            f"the data has labels this classifier does not know: {', '.join(unknown[:5])} "
            f"(it knows {', '.join(model.labels)})"
        )
    predicted = [r.label for r in model.classify([e.text for e in examples])]
    per_label = {}
    for label in model.labels:
        rows = [p == e.label for p, e in zip(predicted, examples) if e.label == label]
        if rows:
            per_label[label] = {"examples": len(rows), "accuracy": sum(rows) / len(rows)}
    correct = sum(p == e.label for p, e in zip(predicted, examples))
    return {
        "task": "classification",
        "examples": len(examples),
        "accuracy": correct / len(examples),
        "per_label": per_label,
    }


def evaluate_retrieval(model, check) -> dict:
    ranking = best_passages(model.embed(check.queries), model.embed(check.passages))
    truth = np.arange(len(check.queries))[:, None]
    rank = (ranking == truth).argmax(axis=1)  # 0 = the query's own passage came first
    return {
        "task": "embedding",
        "queries": len(check.queries),
        "recall_at_1": float((rank == 0).mean()),
        "recall_at_5": float((rank < 5).mean()),
        "mrr": float((1.0 / (rank + 1)).mean()),
    }
