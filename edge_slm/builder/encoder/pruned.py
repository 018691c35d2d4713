"""`edge-slm build --prune` for encoders: the profile's [classifier_prune] or [embedder_prune]
section pruned and distilled into edge-slm's cache (keyed by the model, the data and the
settings, so every target with the same settings reuses one run), then, after the precision gate,
a second gate against the unpruned fp32 model on the same held-out data:

  classifier  test accuracy at most max_accuracy_drop below the unpruned model's
  embedder    mean cosine to the unpruned model's embeddings >= min_cosine, retrieval top-1 at most
              max_recall_drop below the unpruned model's (the shipped retrieval check)

The pruning record (what was removed, accuracy before and after recovery) and this gate go into
the manifest's "pruning" section.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np

from edge_slm import __version__
from edge_slm.core.errors import AccuracyBudgetError, ProfileError
from edge_slm.core.hashing import sha256_file
from edge_slm.core.labelled import INTENTS_TEST, DataError, read_examples, read_retrieval
from edge_slm.core.targets import EncoderPrune, Profile

RECORD_KEYS = (
    "settings",
    "removed_layers",
    "removed_heads",
    "ffn_channels",
    "parameters_before",
    "parameters_after",
    "data",
    "eval_data",
    "measured",
)


def prune_section(profile: Profile, task: str) -> EncoderPrune:
    spec = profile.classifier_prune if task == "classification" else profile.embedder_prune
    if spec is None:
        raise ProfileError(
            f"{profile.name}: --prune needs a [{table_of(task)}] table in the profile (layers, heads, ffn, ...)"
        )
    return spec


def table_of(task: str) -> str:
    return "classifier_prune" if task == "classification" else "embedder_prune"


def profile_labels(profile: Profile, task: str, fields=("layers", "heads", "ffn")) -> tuple[dict[str, str], str]:
    """How a refusal names the pruning settings that came from the profile's table (`check_settings`)."""
    where = f"{profile.source or profile.name}: [{table_of(task)}]"
    return {name: f"{where} {name} =" for name in fields}, f"{where} removes nothing: set layers, heads and/or ffn"


def pruned_model(
    source, spec: EncoderPrune, data: Path | None, eval_data: Path | None, cache: Path, note, labels=None, nothing=None
) -> Path:
    """The pruned (and recovered) model directory in the cache, made now if it is not there.
    `labels` and `nothing`: how a refusal names the profile's settings (`profile_labels`)."""
    from edge_slm.builder.prune.encoder import PRUNE_RECORD, EncoderPruneSettings, prune_encoder_directory
    from edge_slm.builder.prune.encoder_recover import RECOVERY_RECIPE

    if source.task == "classification" and data is None:  # said here: the build's option is --prune-data
        raise DataError("a classifier is pruned on its labelled training data: pass --prune-data TRAIN.jsonl")
    settings = EncoderPruneSettings(layers=spec.layers, heads=spec.heads, ffn=spec.ffn)
    recovery = recovery_settings(spec)
    key = json.dumps(
        {
            "source": source.source.get("sha256"),
            "settings": dataclasses.asdict(settings),
            "recovery": dataclasses.asdict(recovery) if recovery else None,
            "data": sha256_file(data) if data else _shipped_texts_hash(source.task),
            "eval": sha256_file(eval_data) if eval_data else None,
            "edge_slm": __version__,
            "recipe": RECOVERY_RECIPE,
        },
        sort_keys=True,
    )
    target = cache / "pruned-encoders" / hashlib.sha256(key.encode()).hexdigest()[:16]
    if (target / PRUNE_RECORD).is_file():
        note(f"using the cached pruned model {target}")
    else:
        note(settings.describe() + (f", then up to {recovery.steps} distillation steps" if recovery else ""))
        prune_encoder_directory(
            str(source.path), settings, target, data, eval_data, recovery, note, labels=labels, nothing=nothing
        )
    return target


def recovery_settings(spec: EncoderPrune, steps: int = 0, minutes: float = 0.0):
    """The [*_prune] table's distillation (`steps` / `minutes` override it when given); None without steps."""
    from edge_slm.builder.prune.encoder_recover import EncoderRecoverySettings

    steps, minutes = steps or spec.recover_steps, minutes or spec.recover_minutes
    if not steps:
        return None
    return EncoderRecoverySettings(
        steps=steps,
        learning_rate=spec.recover_lr,
        time_budget_s=60 * minutes,
        max_length=spec.recover_max_tokens,
        int8_share=spec.recover_int8_share,
        hidden_weight=spec.recover_hidden_weight,
    )


def _shipped_texts_hash(task: str) -> str | None:
    """An embedder without --data distils on the shipped texts: a change to them is a new run."""
    if task == "classification":
        return None
    from edge_slm.builder.prune.encoder_texts import shipped_embedder_texts

    return hashlib.sha256(json.dumps(shipped_embedder_texts()).encode()).hexdigest()


def record_of(path: Path) -> dict | None:
    """The summary of `edge_slm_prune.json` in a model directory, for the manifest."""
    from edge_slm.builder.prune.encoder import PRUNE_RECORD

    file = Path(path) / PRUNE_RECORD
    if not file.is_file():
        return None
    record = json.loads(file.read_text())
    summary = {k: record[k] for k in RECORD_KEYS if k in record}
    summary["pruned_from"] = record.get("source")
    summary["recovery"] = {k: v for k, v in (record.get("recovery") or {}).items() if k != "settings"} or None
    return summary


def measure_against_teacher(candidate, teacher_head, tokenizer, task: str, examples, labels) -> dict:
    """The built graph (`candidate`) against the unpruned torch model on held-out data."""
    from edge_slm.builder.prune.encoder import encode
    from edge_slm.runtime.encoder_eval import best_passages, unit

    if task == "classification":
        texts = [e.text for e in examples]
        truth = np.array([labels.index(e.label) for e in examples])
        got = candidate.run(texts).argmax(1)
        want = encode(teacher_head, tokenizer, texts).numpy().argmax(1)
        return {
            "texts": len(texts),
            "accuracy": float((got == truth).mean()),
            "unpruned_accuracy": float((want == truth).mean()),
            "label_agreement": float((got == want).mean()),
        }
    check = read_retrieval()
    texts = check.queries + check.passages + [e.text for e in read_examples(INTENTS_TEST)]
    mine, theirs = candidate.run(texts), encode(teacher_head, tokenizer, texts).numpy()
    n, passages = len(check.queries), len(check.passages)
    truth = np.arange(n)

    def recall(vectors):
        return float((best_passages(vectors[:n], vectors[n : n + passages])[:, 0] == truth).mean())

    return {
        "texts": len(texts),
        "mean_cosine": float((unit(mine) * unit(theirs)).sum(1).mean()),
        "recall_at_1": recall(mine),
        "unpruned_recall_at_1": recall(theirs),
    }


def check_against_teacher(measured: dict, task: str, spec: EncoderPrune, allow: bool) -> dict:
    problems = []
    if task == "classification":
        drop = measured["unpruned_accuracy"] - measured["accuracy"]
        if drop > spec.max_accuracy_drop:
            problems.append(
                f"test accuracy {100 * measured['accuracy']:.1f}% vs the unpruned fp32 model's "
                f"{100 * measured['unpruned_accuracy']:.1f}% (budget: at most {100 * spec.max_accuracy_drop:.1f} "
                "points lower)"
            )
    else:
        if measured["mean_cosine"] < spec.min_cosine:
            problems.append(
                f"mean cosine to the unpruned model {measured['mean_cosine']:.4f} (budget >= {spec.min_cosine})"
            )
        drop = measured["unpruned_recall_at_1"] - measured["recall_at_1"]
        if drop > spec.max_recall_drop:
            problems.append(
                f"retrieval top-1 {100 * measured['recall_at_1']:.1f}% vs the unpruned model's "
                f"{100 * measured['unpruned_recall_at_1']:.1f}% (budget: at most {100 * spec.max_recall_drop:.1f} "
                "points lower)"
            )
    if problems and not allow:
        raise AccuracyBudgetError(
            f"the pruned encoder misses its budget against the unpruned model: {'; '.join(problems)}. Prune less "
            "or distil longer (the profile's [classifier_prune] / [embedder_prune]), or pass --allow-accuracy-loss"
        )
    return {**measured, "passed": not problems, "problems": problems}
