"""SQuAD-format question-answering data (the JSON of SQuAD 1.1 / 2.0): read, checked, and the
shipped set made from the appliance manuals.

    {"version": "...", "data": [{"title": ..., "paragraphs": [{"context": ...,
        "qas": [{"id": ..., "question": ..., "answers": [{"text": ..., "answer_start": 17}]}]}]}]}

`edge_slm/data/manuals/squad.json` holds the answerable shipped questions (`questions.jsonl`),
each with the section of its manual that answers it as the context and the expected answer at
its place in it (`runtime.qa_eval.squad_from_manuals` writes it). The build's accuracy gate for question-answering
bundles and `edge-slm finetune --task qa` read this format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edge_slm.core.data import DATA_DIR
from edge_slm.core.labelled import DataError

SHIPPED_SQUAD = DATA_DIR / "manuals" / "squad.json"


@dataclass(frozen=True)
class SquadQuestion:
    id: str
    question: str
    context: str
    answers: tuple[tuple[str, int], ...]  # (text, character offset in the context)


def read_squad(path: Path = SHIPPED_SQUAD, require_answers: bool = True) -> list[SquadQuestion]:
    """Every question of a SQuAD-format file; with `require_answers` each must have an answer whose
    text is in its context at `answer_start`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; give SQuAD-format JSON ({{'data': [{{'paragraphs': ...}}]}})") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path}: not SQuAD-format JSON ({exc}); give a UTF-8 JSON file") from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise DataError(f"{path}: no 'data' list: a SQuAD-format file is {{'data': [{{'paragraphs': [...]}}]}}")
    questions = []
    for article in data["data"]:
        for paragraph in article.get("paragraphs", []) if isinstance(article, dict) else []:
            context = paragraph.get("context") if isinstance(paragraph, dict) else None
            if not isinstance(context, str) or not context.strip():
                raise DataError(f"{path}: a paragraph without a 'context' string: give each paragraph its text")
            for qa in paragraph.get("qas", []):
                questions.append(_question(path, qa, context, require_answers))
    if not questions:
        raise DataError(f"{path}: no questions in the file ('qas' of each paragraph)")
    return questions


def _question(path: Path, qa, context: str, require_answers: bool) -> SquadQuestion:
    if not isinstance(qa, dict) or not isinstance(qa.get("question"), str) or not qa["question"].strip():
        raise DataError(f"{path}: a 'qas' entry without a 'question' string")
    where = f"{path}: question {qa.get('id', qa['question'])!r}"
    answers = []
    for answer in qa.get("answers") or []:
        text, start = (answer.get("text"), answer.get("answer_start")) if isinstance(answer, dict) else (None, None)
        if not isinstance(text, str) or not text.strip() or isinstance(start, bool) or not isinstance(start, int):
            raise DataError(f"{where}: each answer needs a non-empty 'text' and an integer 'answer_start'")
        if context[start : start + len(text)] != text:
            raise DataError(
                f"{where}: the answer {text!r} is not in the context at character {start}: "
                "fix 'answer_start' (the offset of the answer's first character in 'context')"
            )
        answers.append((text, start))
    if require_answers and not answers:
        raise DataError(f"{where}: no answers; every question here needs one (an answer text and its answer_start)")
    return SquadQuestion(str(qa.get("id", qa["question"])), qa["question"], context, tuple(answers))
