"""Labelled texts from the user's files (JSONL `{"text": ..., "label": ...}` or CSV with `text` and
`label` columns) and the shipped encoder data: the intents split and the retrieval check.
Device-side too: `edge-slm eval --data` reads the same files on the device. A malformed line is
one error naming the file and the line."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from edge_slm.core.data import DATA_DIR
from edge_slm.core.errors import EdgeSlmError
from edge_slm.core.text import check_text, decode_lines, unicode_problem

INTENTS_TRAIN = DATA_DIR / "intents" / "train.jsonl"
INTENTS_TEST = DATA_DIR / "intents" / "test.jsonl"
RETRIEVAL_CHECK = DATA_DIR / "retrieval.json"
MAX_TEXT_CHARS = 100_000
MAX_LABEL_CHARS = 200
MAX_NUMBER_DIGITS = 100
MAX_CLASSES = 1000  # a classification head this wide on a few hundred examples is a mistake in the data


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
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror})") from None
    rows = list(_csv_rows(path, data) if path.suffix.lower() == ".csv" else _jsonl_rows(path, data))
    if not rows:
        raise DataError(f"{path}: no examples in the file")
    labels = {row.label for row in rows}
    if len(labels) < min_classes:
        raise DataError(
            f"{path}: {len(labels)} class ({', '.join(sorted(labels))}); a classifier needs at least {min_classes}"
        )
    if len(labels) > MAX_CLASSES:
        raise DataError(
            f"{path}: {len(labels):,} different labels; a classifier here takes at most {MAX_CLASSES:,} "
            "(is 'label' the class of each text, not an id of the example?)"
        )
    return rows


def _checked(path: Path, line: int, text, label) -> Example:
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{path}:{line}: 'text' must be a non-empty string")
    if len(text) > MAX_TEXT_CHARS:
        raise DataError(f"{path}:{line}: the text has {len(text)} characters; the limit is {MAX_TEXT_CHARS}")
    if isinstance(label, bool) or not isinstance(label, (str, int)) or not str(label).strip():
        raise DataError(f"{path}:{line}: 'label' must be a non-empty string (or an integer class id)")
    if len(str(label)) > MAX_LABEL_CHARS:
        raise DataError(f"{path}:{line}: the label has {len(str(label))} characters; the limit is {MAX_LABEL_CHARS}")
    check_text(text, f"{path}:{line}: 'text'", DataError)
    check_text(str(label), f"{path}:{line}: 'label'", DataError)
    return Example(text, str(label).strip())


class _NumberTooLong(ValueError):
    pass


def _bounded_int(digits: str) -> int:
    # Python refuses ints over 4,300 digits with a bare ValueError, and converting one near that
    # size is slow: a label or id never needs more than MAX_NUMBER_DIGITS.
    if len(digits) > MAX_NUMBER_DIGITS:
        raise _NumberTooLong(f"a number of {len(digits):,} digits; the limit is {MAX_NUMBER_DIGITS}")
    return int(digits)


def _jsonl_rows(path: Path, data: bytes):
    for number, line in decode_lines(data):
        if not line.strip():
            continue
        check_text(line, f"{path}:{number}", DataError)
        try:
            row = json.loads(line, parse_int=_bounded_int)
        except _NumberTooLong as exc:
            raise DataError(f"{path}:{number}: {exc}") from None
        except RecursionError:
            raise DataError(
                f"{path}:{number}: nested too deeply; write one flat {{'text', 'label'}} per line"
            ) from None
        except ValueError as exc:
            why = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
            raise DataError(f"{path}:{number}: not a JSON object ({why}); write one {{'text', 'label'}} per line")
        if not isinstance(row, dict) or "text" not in row or "label" not in row:
            raise DataError(f"{path}:{number}: each line needs the keys 'text' and 'label'")
        yield _checked(path, number, row["text"], row["label"])


def _csv_rows(path: Path, data: bytes):
    # Decoded here (BOM dropped, as spreadsheets write one) so that a bad byte is reported with its line.
    text = data.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if not reader.fieldnames or not {"text", "label"} <= set(reader.fieldnames):
            raise DataError(f"{path}:1: the CSV header must name the columns 'text' and 'label'")
        for row in reader:
            yield _checked(path, reader.line_num, row.get("text"), row.get("label"))
    except csv.Error as exc:
        raise DataError(f"{path}: cannot be read as a CSV file ({exc})") from None


@dataclass(frozen=True)
class RetrievalCheck:
    """Queries and passages; query i's relevant passage is passage i."""

    queries: list[str]
    passages: list[str]


def read_retrieval(path: Path = RETRIEVAL_CHECK) -> RetrievalCheck:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"), parse_int=_bounded_int)
        queries, passages = data["queries"], data["passages"]
    except RecursionError:
        raise DataError(f"{path}: nested too deeply; it needs lists 'queries' and 'passages'") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: not a retrieval check ({exc}); it needs lists 'queries' and 'passages'") from None
    if not (
        isinstance(queries, list)
        and isinstance(passages, list)
        and len(queries) == len(passages) > 0
        and all(isinstance(t, str) and t.strip() and not unicode_problem(t) for t in queries + passages)
    ):
        raise DataError(f"{path}: 'queries' and 'passages' must be lists of the same length of non-empty UTF-8 strings")
    return RetrievalCheck(queries, passages)
