"""Labelled texts from the user's files (JSONL `{"text": ..., "label": ...}` or CSV with `text` and
`label` columns) and the shipped encoder data: the intents split and the retrieval check.
Device-side too: `edge-slm eval --data` reads the same files on the device. A malformed line is
one error naming the file and the line."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from edge_slm.core.data import DATA_DIR
from edge_slm.core.errors import EdgeSlmError

INTENTS_TRAIN = DATA_DIR / "intents" / "train.jsonl"
INTENTS_TEST = DATA_DIR / "intents" / "test.jsonl"
RETRIEVAL_CHECK = DATA_DIR / "retrieval.json"
MAX_TEXT_CHARS = 100_000


class DataError(EdgeSlmError):
    """A labelled data file is missing, malformed, or has too few classes."""


@dataclass(frozen=True)
class Example:
    text: str
    label: str


def read_examples(path: Path, min_classes: int = 2) -> list[Example]:
    """The examples of a .jsonl or .csv file, each with a non-empty text and label."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file (JSONL lines {{'text': ..., 'label': ...}} or CSV text,label)")
    rows = list(_csv_rows(path) if path.suffix.lower() == ".csv" else _jsonl_rows(path))
    if not rows:
        raise DataError(f"{path}: no examples in the file")
    labels = {row.label for row in rows}
    if len(labels) < min_classes:
        raise DataError(
            f"{path}: {len(labels)} class ({', '.join(sorted(labels))}); a classifier needs at least {min_classes}"
        )
    return rows


def _checked(path: Path, line: int, text, label) -> Example:
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{path}:{line}: 'text' must be a non-empty string")
    if len(text) > MAX_TEXT_CHARS:
        raise DataError(f"{path}:{line}: the text has {len(text)} characters; the limit is {MAX_TEXT_CHARS}")
    if isinstance(label, bool) or not isinstance(label, (str, int)) or not str(label).strip():
        raise DataError(f"{path}:{line}: 'label' must be a non-empty string (or an integer class id)")
    return Example(text, str(label).strip())


def _jsonl_rows(path: Path):
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot be read as UTF-8 text ({exc})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not a JSON object ({exc.msg}); write one {{'text', 'label'}} per line")
        if not isinstance(row, dict) or "text" not in row or "label" not in row:
            raise DataError(f"{path}:{number}: each line needs the keys 'text' and 'label'")
        yield _checked(path, number, row["text"], row["label"])


def _csv_rows(path: Path):
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames or not {"text", "label"} <= set(reader.fieldnames):
                raise DataError(f"{path}:1: the CSV header must name the columns 'text' and 'label'")
            for row in reader:
                yield _checked(path, reader.line_num, row.get("text"), row.get("label"))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot be read as a UTF-8 CSV file ({exc})") from None


@dataclass(frozen=True)
class RetrievalCheck:
    """Queries and passages; query i's relevant passage is passage i."""

    queries: list[str]
    passages: list[str]


def read_retrieval(path: Path = RETRIEVAL_CHECK) -> RetrievalCheck:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        queries, passages = data["queries"], data["passages"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: not a retrieval check ({exc}); it needs lists 'queries' and 'passages'") from None
    if not (
        isinstance(queries, list)
        and isinstance(passages, list)
        and len(queries) == len(passages) > 0
        and all(isinstance(t, str) and t.strip() for t in queries + passages)
    ):
        raise DataError(f"{path}: 'queries' and 'passages' must be lists of the same length of non-empty strings")
    return RetrievalCheck(queries, passages)
