"""The data an encoder is pruned and measured on, read from the user's files with each problem named
by file and line: a classifier's labelled training split, an embedder's texts (one a line, every
line checked), and the held-out data of the record. Used by `prune.encoder`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edge_slm.core.labelled import INTENTS_TEST, MAX_TEXT_CHARS, DataError, Example, read_examples
from edge_slm.core.text import check_text, decode_lines


@dataclass(frozen=True)
class TaskData:
    """The texts pruning scores and distillation use; a classifier's carry class ids too."""

    texts: list[str]
    labels: list[int] | None
    where: str


def read_task_data(path: Path | None, task: str, labels: tuple[str, ...]) -> TaskData:
    """A classifier's labelled training data (required: distillation's cross-entropy needs the
    labels), or an embedder's texts, one per line (without one, the shipped texts of
    `encoder_texts`, which leave out what the gate measures on)."""
    if task == "classification":
        if path is None:
            raise DataError("a classifier is pruned on its labelled training data: pass --data TRAIN.jsonl")
        examples = read_examples(Path(path))
        unknown = sorted({e.label for e in examples} - set(labels))
        if unknown:
            raise DataError(
                f"{path}: labels the classifier does not know ({', '.join(unknown[:5])}); it knows {', '.join(labels)}"
            )
        index = {label: i for i, label in enumerate(labels)}
        return TaskData([e.text for e in examples], [index[e.label] for e in examples], str(path))
    if path is None:
        from edge_slm.builder.prune.encoder_texts import shipped_embedder_texts

        return TaskData(shipped_embedder_texts(), None, "shipped texts (edge_slm/data, held-out checks left out)")
    texts = read_embedder_texts(Path(path))
    if len(texts) < 8:
        raise DataError(f"{path}: {len(texts)} texts; pruning an embedder needs a few hundred, one per line")
    return TaskData(texts, None, str(path))


def read_embedder_texts(path: Path) -> list[str]:
    """An embedder's texts, one per UTF-8 line, each checked with its line number. Every line, not
    only the first: a line that is a JSON object is refused (with a 'label' it is a classifier's
    data; without one its braces and keys would be distilled as if they were text), as is a CSV
    whose header has a label column."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror}); pass a UTF-8 file, one text per line") from None
    labelled = (
        "labelled data is a classifier's task; an embedder is pruned against plain texts, one per line "
        "(or no --data: the shipped texts)"
    )
    texts = []
    for number, line in decode_lines(data):
        text = line.strip()
        if not text:
            continue
        where = f"{path}:{number}"
        check_text(text, where, DataError)
        if not texts and path.suffix.lower() == ".csv" and "label" in [c.strip() for c in text.split(",")]:
            raise DataError(f"{where}: {labelled}")
        if len(text) > MAX_TEXT_CHARS:
            raise DataError(f"{where}: the text has {len(text)} characters; the limit is {MAX_TEXT_CHARS}")
        if text.startswith("{"):
            try:
                row = json.loads(text)
            except (ValueError, RecursionError):  # not JSON, a 5,000-digit number, nesting past the stack
                row = None
            if isinstance(row, dict):
                raise DataError(
                    f"{where}: {labelled}"
                    if "label" in row
                    else f"{where}: a JSON object; an embedder's --data is plain texts, one per line (the texts "
                    "themselves, not JSON)"
                )
        texts.append(text)
    return texts


def read_held_out(path: Path | None, source) -> tuple[list, str]:
    """Held-out data for the record: --eval-data, else the classifier's eval.jsonl, else the shipped
    intents test split. An embedder is measured on texts only (and the retrieval check): its file
    may be texts one a line, like its --data, or JSONL / CSV whose labels, if any, go unused."""
    candidates = [path] if path else []
    if source.task == "classification":
        candidates.append(source.path / "eval.jsonl")
    for candidate in (Path(c) for c in candidates + [INTENTS_TEST] if c is not None):
        if not candidate.is_file():
            continue
        if source.task != "classification":
            texts = _structured_texts(candidate) if _is_structured(candidate) else read_embedder_texts(candidate)
            return [Example(t, "") for t in texts], str(candidate)
        examples = read_examples(candidate, min_classes=1)
        unknown = sorted({e.label for e in examples} - set(source.labels))
        if unknown:
            raise DataError(
                f"{candidate}: labels the classifier does not know ({', '.join(unknown[:5])}); "
                "pass --eval-data with the model's labels"
            )
        return examples, str(candidate)
    raise DataError("no held-out data: pass --eval-data TEST.jsonl")


def _is_structured(path: Path) -> bool:
    """A CSV, or a file whose first character is a JSON object's brace (JSONL)."""
    with path.open("rb") as file:
        head = file.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"{") or path.suffix.lower() == ".csv"


def _structured_texts(path: Path) -> list[str]:
    """The 'text' of each row: labelled rows through the labelled reader, JSONL rows without a label here."""
    if path.suffix.lower() == ".csv":
        return [e.text for e in read_examples(path, min_classes=1)]
    texts = []
    for number, line in decode_lines(path.read_bytes()):
        if not line.strip():
            continue
        check_text(line, f"{path}:{number}", DataError)
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as exc:  # a 5,000-digit number or deep nesting raise these too
            reason = getattr(exc, "msg", None) or str(exc).split(";")[0][:120] or type(exc).__name__
            raise DataError(
                f"{path}:{number}: not a JSON object ({reason}); write one {{'text': ...}} per line"
            ) from None
        text = row.get("text") if isinstance(row, dict) else None
        if not isinstance(text, str) or not text.strip() or len(text) > MAX_TEXT_CHARS:
            raise DataError(
                f"{path}:{number}: each line needs a 'text': a string of 1 to {MAX_TEXT_CHARS:,} characters"
            )
        texts.append(text.strip())
    if not texts:
        raise DataError(f"{path}: no texts in the file")
    return texts
