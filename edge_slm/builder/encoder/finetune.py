"""Fine-tune an encoder into a classifier, the way the project's founding example does: the
first token's hidden state, dropout 0.1, one linear layer, cross-entropy, Adam, on the CPU.

Each epoch prints the training loss, the validation loss and accuracy. The checkpoint with the
lowest validation loss is what ships: a standard Hugging Face `*ForSequenceClassification`
directory (`id2label` / `label2id` filled) that transformers loads and `edge-slm build --model`
takes, with the held-out split beside it (`eval.jsonl`, the build's accuracy gate reads it). After
every epoch the training state is saved beside the output, so an interrupted run resumes where it
stopped; the state is removed when the run completes.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from edge_slm.builder.encoder.source import load_encoder
from edge_slm.core.atomic import atomic_directory
from edge_slm.core.errors import ModelError
from edge_slm.core.labelled import Example
from edge_slm.core.outputs import check_output_folder, output_folder

FINETUNE_RECORD = "edge_slm_finetune.json"
EVAL_FILE = "eval.jsonl"


@dataclass(frozen=True)
class FinetuneSettings:
    epochs: int = 3
    lr: float = 1e-5
    batch_size: int = 32
    max_minutes: float | None = None  # stop (and keep the best checkpoint so far) after this long
    dropout: float = 0.1
    max_length: int = 128  # training inputs are truncated to this many tokens
    seed: int = 0


def check_finetune_output(out: Path) -> None:
    """Refuse an output that is a file, a link, or a directory that is neither empty nor a model
    `edge-slm finetune` wrote and nobody added to or changed (`core.outputs`): edge-slm replaces
    only its own."""
    check_output_folder(out)


def state_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.finetune-state"


def finetune(
    model_ref: str,
    train: list[Example],
    evaluation: list[Example],
    settings: FinetuneSettings,
    out: Path,
    progress=print,
) -> dict:
    """Train, keep the best epoch, publish `out`; return the record written beside the weights."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = Path(out)
    check_finetune_output(out)
    source = load_encoder(model_ref)
    labels = sorted({e.label for e in train})
    unknown = sorted({e.label for e in evaluation} - set(labels))
    if unknown:
        raise ModelError(f"the evaluation data has labels the training data lacks: {', '.join(unknown)}")
    label2id = {label: i for i, label in enumerate(labels)}
    tokenizer = AutoTokenizer.from_pretrained(str(source.path))
    torch.manual_seed(settings.seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(source.path),
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id=label2id,
        classifier_dropout=settings.dropout,
        hidden_dropout_prob=settings.dropout,
        ignore_mismatched_sizes=True,  # a classifier of other labels gets a new head
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    key = _run_key(source.source, train, evaluation, settings)
    history, best, start_epoch = [], None, 0
    saved = _resume(state_dir(out), key, model, optimizer)
    if saved:
        history, best, start_epoch = saved["history"], saved["best"], saved["epoch"]
        progress(f"resuming after epoch {start_epoch} (saved state in {state_dir(out)})")
    begin = time.monotonic()
    budget = settings.max_minutes * 60 if settings.max_minutes else None
    stopped_early = False
    for epoch in range(start_epoch, settings.epochs):
        model.train()
        order = list(range(len(train)))
        random.Random(settings.seed * 1000 + epoch).shuffle(order)
        losses = []
        for step, first in enumerate(range(0, len(order), settings.batch_size)):
            batch = [train[i] for i in order[first : first + settings.batch_size]]
            inputs, target = _batch(tokenizer, batch, label2id, settings)
            loss = torch.nn.functional.cross_entropy(model(**inputs).logits, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if budget and time.monotonic() - begin > budget:
                stopped_early = True
                progress(
                    f"  the time budget of {settings.max_minutes:g} min ran out at step {step + 1} of epoch {epoch + 1}"
                )
                break
        val_loss, accuracy = _evaluate(model, tokenizer, evaluation, label2id, settings)
        record = {
            "epoch": epoch + 1,
            "train_loss": sum(losses) / len(losses),
            "validation_loss": val_loss,
            "accuracy": accuracy,
            "seconds": round(time.monotonic() - begin, 1),
        }
        history.append(record)
        if best is None or val_loss < best["validation_loss"]:
            best = record
            _save_best(model, state_dir(out))
        _save_state(state_dir(out), key, model, optimizer, history, best, epoch + 1)
        progress(
            f"Epoch {epoch + 1}, Train Loss: {record['train_loss']:.4f}, Validation Loss: {val_loss:.4f}, "
            f"Accuracy: {100 * accuracy:.1f}%"
        )
        if stopped_early:
            break
    record = {
        "base_model": source.source,
        "settings": asdict(settings),
        "labels": labels,
        "train_examples": len(train),
        "eval_examples": len(evaluation),
        "history": history,
        "best_epoch": best["epoch"],
        "best": best,
        "stopped_at_time_budget": stopped_early,
    }
    with output_folder(out, "edge-slm finetune") as staging:  # checks `out` again: it may have changed meanwhile
        best_model = AutoModelForSequenceClassification.from_pretrained(str(state_dir(out) / "best"))
        best_model.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        (staging / EVAL_FILE).write_text(
            "".join(json.dumps({"text": e.text, "label": e.label}) + "\n" for e in evaluation)
        )
        (staging / FINETUNE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(state_dir(out), ignore_errors=True)
    return record


def _evaluate(model, tokenizer, examples, label2id, settings) -> tuple[float, float]:
    import torch

    model.eval()
    total_loss, correct = 0.0, 0
    with torch.no_grad():
        for first in range(0, len(examples), 64):
            inputs, target = _batch(tokenizer, examples[first : first + 64], label2id, settings)
            logits = model(**inputs).logits
            total_loss += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
            correct += int((logits.argmax(dim=1) == target).sum())
    return total_loss / len(examples), correct / len(examples)


def _batch(tokenizer, examples, label2id, settings):
    """A padded, truncated batch of texts and their class ids."""
    import torch

    inputs = tokenizer(
        [e.text for e in examples], padding=True, truncation=True, max_length=settings.max_length, return_tensors="pt"
    )
    return inputs, torch.tensor([label2id[e.label] for e in examples])


def _run_key(source: dict, train, evaluation, settings: FinetuneSettings) -> str:
    """What a saved state must match to be resumed: the same base model, data and settings
    (the number of epochs and the time budget aside, so that a run can also be extended)."""
    digest = hashlib.sha256()
    digest.update(
        json.dumps([source.get("sha256"), {**asdict(settings), "epochs": None, "max_minutes": None}]).encode()
    )
    for e in [*train, None, *evaluation]:
        digest.update(b"\0" if e is None else json.dumps([e.text, e.label]).encode())
    return digest.hexdigest()


def _save_best(model, directory: Path) -> None:
    with atomic_directory(directory / "best") as tmp:
        model.save_pretrained(str(tmp))


def _save_state(directory: Path, key: str, model, optimizer, history, best, epoch: int) -> None:
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f"state.pt.tmp-{os.getpid()}"
    state = {"key": key, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}
    torch.save(state, tmp)
    os.replace(tmp, directory / "state.pt")
    meta = {"key": key, "history": history, "best": best, "epoch": epoch}
    (directory / "progress.json.tmp").write_text(json.dumps(meta))
    os.replace(directory / "progress.json.tmp", directory / "progress.json")


def _resume(directory: Path, key: str, model, optimizer) -> dict | None:
    import torch

    try:
        meta = json.loads((directory / "progress.json").read_text())
        if meta.get("key") != key or not (directory / "best").is_dir():
            return None
        state = torch.load(directory / "state.pt", weights_only=True)
        if state.get("key") != key:
            return None
    except (OSError, ValueError, RuntimeError, KeyError):
        return None
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])  # the same dropout masks as a run that was never interrupted
    return meta
