"""Fine-tune an encoder into an extractive reader (`edge-slm finetune --task qa`): a
`*ForQuestionAnswering` head (one linear layer giving each token a start and an end logit) on
SQuAD-format data, cross-entropy on the answer's first and last token, Adam, on the CPU.

Each question and its context are cut into windows as the reader cuts them on the device
(`runtime/reader.py`: the context truncated into `max_length`-token windows overlapping by half,
at most 128 tokens); a window that does not hold the whole answer is trained to point at [CLS], as
transformers' SQuAD example does. Each epoch prints the training loss and the validation loss (and
the share of validation windows whose start and end tokens are both right); the epoch with the
lowest validation loss ships: a Hugging Face `*ForQuestionAnswering` directory that `edge-slm
build --model` takes, with the validation questions beside it (`eval-squad.json`, which the
build's accuracy gate reads). Unlike the classifier's, an interrupted run starts again.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict
from pathlib import Path

from edge_slm.builder.encoder.finetune import FINETUNE_RECORD, FinetuneSettings, check_finetune_output
from edge_slm.builder.encoder.source import load_encoder
from edge_slm.core.errors import ModelError
from edge_slm.core.outputs import output_folder
from edge_slm.core.squad import SquadQuestion

EVAL_SQUAD_FILE = "eval-squad.json"


def finetune_qa(
    model_ref: str,
    train: list[SquadQuestion],
    evaluation: list[SquadQuestion],
    settings: FinetuneSettings,
    out: Path,
    progress=print,
) -> dict:
    """Train, keep the best epoch, publish `out`; return the record written beside the weights."""
    import torch
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    out = Path(out)
    check_finetune_output(out)
    source = load_encoder(model_ref)
    tokenizer = AutoTokenizer.from_pretrained(str(source.path))
    if not tokenizer.is_fast:
        raise ModelError(f"{source.path}: a fast tokenizer (tokenizer.json) is needed for answer offsets")
    torch.manual_seed(settings.seed)
    model = AutoModelForQuestionAnswering.from_pretrained(str(source.path), hidden_dropout_prob=settings.dropout)
    train_windows = windows(tokenizer, train, settings.max_length)
    eval_windows = windows(tokenizer, evaluation, settings.max_length)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    history, best, best_state = [], None, None
    begin, budget, stopped_early = time.monotonic(), (settings.max_minutes or 0) * 60, False
    for epoch in range(settings.epochs):
        model.train()
        order = list(range(len(train_windows)))
        random.Random(settings.seed * 1000 + epoch).shuffle(order)
        losses = []
        for first in range(0, len(order), settings.batch_size):
            inputs = _batch(tokenizer, [train_windows[i] for i in order[first : first + settings.batch_size]])
            loss = model(**inputs).loss  # the mean of the start and end cross-entropies
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if budget and time.monotonic() - begin > budget:
                stopped_early = True
                progress(f"  the time budget of {settings.max_minutes:g} min ran out in epoch {epoch + 1}")
                break
        val_loss, exact = _evaluate(model, tokenizer, eval_windows)
        record = {
            "epoch": epoch + 1,
            "train_loss": sum(losses) / len(losses),
            "validation_loss": val_loss,
            "span_accuracy": exact,
            "seconds": round(time.monotonic() - begin, 1),
        }
        history.append(record)
        if best is None or val_loss < best["validation_loss"]:
            best, best_state = record, {k: v.detach().clone() for k, v in model.state_dict().items()}
        progress(
            f"Epoch {epoch + 1}, Train Loss: {record['train_loss']:.4f}, Validation Loss: {val_loss:.4f}, "
            f"Span accuracy: {100 * exact:.1f}%"
        )
        if stopped_early:
            break
    model.load_state_dict(best_state)
    record = {
        "task": "qa",
        "base_model": source.source,
        "settings": asdict(settings),
        "train_questions": len(train),
        "train_windows": len(train_windows),
        "eval_questions": len(evaluation),
        "history": history,
        "best_epoch": best["epoch"],
        "best": best,
        "stopped_at_time_budget": stopped_early,
    }
    with output_folder(out, "edge-slm finetune") as staging:
        model.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        (staging / EVAL_SQUAD_FILE).write_text(json.dumps(to_squad(evaluation), ensure_ascii=False) + "\n")
        (staging / FINETUNE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return record


def windows(tokenizer, questions: list[SquadQuestion], max_length: int) -> list[dict]:
    """Each question's windows with the answer's start and end token (0, [CLS], when a window
    does not hold all of the first answer)."""
    stride = min(max_length // 2, 128)
    out = []
    for q in questions:
        try:
            encoded = tokenizer(
                q.question,
                q.context,
                truncation="only_second",
                max_length=max_length,
                stride=stride,
                return_overflowing_tokens=True,
                return_offsets_mapping=True,
            )
        except Exception as exc:  # tokenizers: the question alone is longer than a window
            raise ModelError(
                f"question {q.id!r} does not fit a {max_length}-token window with its context ({exc}): "
                "shorten it or raise --max-length"
            ) from None
        text, first_char = q.answers[0]
        last_char = first_char + len(text)
        for i, offsets in enumerate(encoded["offset_mapping"]):
            sequence = encoded.sequence_ids(i)
            context = [t for t, s in enumerate(sequence) if s == 1]
            start = end = 0
            if context and offsets[context[0]][0] <= first_char and offsets[context[-1]][1] >= last_char:
                start = next(t for t in context if offsets[t][1] > first_char)
                end = next(t for t in reversed(context) if offsets[t][0] < last_char)
            window = {
                key: encoded[key][i] for key in ("input_ids", "attention_mask", "token_type_ids") if key in encoded
            }
            out.append({**window, "start_positions": start, "end_positions": end})
    return out


def _batch(tokenizer, rows: list[dict]):
    import torch

    features = [{k: v for k, v in row.items() if not k.endswith("_positions")} for row in rows]
    inputs = tokenizer.pad(features, return_tensors="pt")
    inputs["start_positions"] = torch.tensor([row["start_positions"] for row in rows])
    inputs["end_positions"] = torch.tensor([row["end_positions"] for row in rows])
    return inputs


def _evaluate(model, tokenizer, rows: list[dict]) -> tuple[float, float]:
    """Mean validation loss per window and the share of windows whose start and end are both right."""
    import torch

    model.eval()
    total, right = 0.0, 0
    with torch.no_grad():
        for first in range(0, len(rows), 64):
            inputs = _batch(tokenizer, rows[first : first + 64])
            out = model(**inputs)
            total += float(out.loss) * len(rows[first : first + 64])
            hits = (out.start_logits.argmax(1) == inputs["start_positions"]) & (
                out.end_logits.argmax(1) == inputs["end_positions"]
            )
            right += int(hits.sum())
    return total / len(rows), right / len(rows)


def to_squad(questions: list[SquadQuestion]) -> dict:
    return {
        "version": "edge-slm-finetune",
        "data": [
            {
                "title": "validation",
                "paragraphs": [
                    {
                        "context": q.context,
                        "qas": [
                            {
                                "id": q.id,
                                "question": q.question,
                                "answers": [{"text": t, "answer_start": s} for t, s in q.answers],
                            }
                        ],
                    }
                    for q in questions
                ],
            }
        ],
    }
