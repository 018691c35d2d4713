"""How well `ask` answers from documents: the shipped appliance manuals and their questions.

`edge_slm/data/manuals/` holds four short manuals written for the project and
`questions.jsonl`: each line a question, the manual that answers it and the answer (a sentence
of the manual, or the distinctive part of one); questions whose `file` is null have no answer in
the manuals. Each question belongs to a `split`: "tune" questions set `DEFAULT_MIN_SCORE`, the
prompt and the identifier bonus; "heldout" questions were written after those were fixed and are
only measured, never tuned on (`calibrate_min_score` reads the tuning split only). Used by
`benchmarks/ask.py` and the tests.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from edge_slm.core.data import DATA_DIR
from edge_slm.core.errors import EdgeSlmError
from edge_slm.core.labelled import DataError

MANUALS_DIR = DATA_DIR / "manuals"
QUESTIONS_FILE = MANUALS_DIR / "questions.jsonl"
SPLITS = ("tune", "heldout")


@dataclass(frozen=True)
class Question:
    question: str
    file: str | None  # None: the documents do not answer it
    answer: str | None
    split: str = "tune"


def load_questions(path: Path = QUESTIONS_FILE, split: str | None = None) -> list[Question]:
    """The questions of `path`, those of one `split` when it is given (a row without one is "tune")."""
    if split is not None and split not in SPLITS:
        raise EdgeSlmError(f"split is {split!r}; choose one of {', '.join(SPLITS)}")
    questions = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
                question = Question(row["question"], row["file"], row["answer"], row.get("split", "tune"))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise EdgeSlmError(f"{path}:{number}: {exc}; want question, file, answer and split") from None
            if question.split not in SPLITS:
                raise EdgeSlmError(f"{path}:{number}: split is {question.split!r}; want one of {', '.join(SPLITS)}")
            if split is None or question.split == split:
                questions.append(question)
    return questions


def calibrate_min_score(rows: list[dict]) -> float:
    """The refusal threshold that gets the most of `rows` (from `evaluate_qa` on the tuning split)
    right: answerable questions whose best passage scores at or above it are answered, unanswerable
    ones below it refused. Halfway between the two best-passage scores it falls between; of equally
    good places the lowest, which answers more."""
    scores = sorted({r["best_score"] for r in rows})
    cuts = [(a + b) / 2 for a, b in zip(scores, scores[1:])] or scores

    def correct(cut: float) -> int:
        return sum((r["best_score"] >= cut) == ("rank" in r) for r in rows)

    return round(max(cuts, key=lambda cut: (correct(cut), -cut)), 3)


def _normal(text: str) -> str:
    return " ".join(text.split()).lower()


def holds(text: str, answer: str) -> bool:
    return _normal(answer) in _normal(text)


STOPWORDS = frozenset(
    "a an and are at be by can do does for from how i if in is it my of on or the this to what when where which "
    "why with you your".split()
)


def facts(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z0-9](?:[a-z0-9.]*[a-z0-9])?", text.lower()) if w not in STOPWORDS}


def covers(text: str, answer: str) -> bool:
    """A written answer states the expected one when it holds every number of it and most (60%) of
    its other words: "The lock stores 50 user codes." covers "The lock stores up to 50 user codes."."""
    want, have = facts(answer), facts(text)
    numbers = {w for w in want if any(c.isdigit() for c in w)}
    return numbers <= have and len(want & have) >= 0.6 * len(want)


def evaluate_qa(
    qa, questions: list[Question], k: int = 3, decoder=None, min_score: float | None = None, reader=None
) -> dict:
    """Retrieval top-1 / top-k (the right file, in a passage holding the answer), extractive answer
    accuracy (the expected sentence returned), with a decoder the share of written answers that
    state the expected one (`covers`), refusal accuracy on the unanswerable questions, ask latency; and each question's
    outcome, to see what failed. With a `reader` (a question-answering bundle) the evidence is the
    sentence holding its span, and `reader_span_in_answer` the share of spans inside the expected
    answer."""
    from edge_slm.runtime.qa import DEFAULT_MIN_SCORE

    min_score = DEFAULT_MIN_SCORE if min_score is None else min_score
    rows, latencies = [], []
    for q in questions:
        started = time.perf_counter()
        answer = qa.ask(q.question, k=k, decoder=decoder, min_score=min_score, reader=reader)
        latencies.append((time.perf_counter() - started) * 1000)
        sources = qa.retrieve(q.question, k)[0]  # all k, also when the answer was "nothing relevant"
        best = sources[0].score if sources else -1.0
        row = {"question": q.question, "best_score": round(best, 4), "found": answer.found, "answer": answer.answer}
        if q.file is not None:
            ranks = [i for i, s in enumerate(sources) if s.file == q.file and holds(s.text, q.answer)]
            row["rank"] = ranks[0] + 1 if ranks else None
            evidence = answer.evidence.text if answer.evidence else ""
            row["extractive_correct"] = bool(answer.found and holds(evidence, q.answer))
            if reader is not None and decoder is None:
                row["reader_span_in_answer"] = bool(answer.found and answer.answer and holds(q.answer, answer.answer))
            if decoder is not None:
                row["generated_covers_answer"] = bool(answer.found and covers(answer.answer, q.answer))
        rows.append(row)
    answerable = [r for r in rows if "rank" in r]
    unanswerable = [r for r in rows if "rank" not in r]

    def share(items, test) -> float | None:
        return round(sum(map(test, items)) / len(items), 4) if items else None

    result = {
        "questions": len(answerable),
        "unanswerable": len(unanswerable),
        "k": k,
        "min_score": min_score,
        "top1": share(answerable, lambda r: r["rank"] == 1),
        f"top{k}": share(answerable, lambda r: r["rank"] is not None),
        "extractive_accuracy": share(answerable, lambda r: r["extractive_correct"]),
        "answered_when_answerable": share(answerable, lambda r: r["found"]),
        "refusal_accuracy": share(unanswerable, lambda r: not r["found"]),
        "ask_ms_mean": round(sum(latencies) / len(latencies), 2) if latencies else None,
        "rows": rows,
    }
    if reader is not None and decoder is None:
        result["reader_span_in_answer"] = share(answerable, lambda r: r["reader_span_in_answer"])
    if decoder is not None:
        result["generated_covers_answer"] = share(answerable, lambda r: r["generated_covers_answer"])
    return result


def squad_from_manuals() -> dict:
    """The shipped manuals' answerable questions as SQuAD-format data: the context of each is the
    section of its manual (heading and sentences) whose sentence holds the answer."""
    from edge_slm.core.passages import sections

    articles: dict[str, dict] = {}
    for number, q in enumerate(load_questions(), 1):
        if q.file is None:
            continue
        _, parts = sections((MANUALS_DIR / q.file).read_text(encoding="utf-8"))
        for heading, sentences in parts:
            context = " ".join([heading + "."] + [s.text for s in sentences]) if heading else ""
            context = context or " ".join(s.text for s in sentences)
            start = context.lower().find(" ".join(q.answer.split()).lower())
            if start >= 0:
                break
        else:
            raise DataError(f"{q.file}: no section holds the answer to {q.question!r}")
        article = articles.setdefault(q.file, {"title": q.file, "contexts": {}})
        paragraph = article["contexts"].setdefault(context, [])
        text = context[start : start + len(" ".join(q.answer.split()))]
        paragraph.append(
            {
                "id": f"manuals-{number}",
                "question": q.question,
                "split": q.split,
                "answers": [{"text": text, "answer_start": start}],
            }
        )
    return {
        "version": "edge-slm-manuals-1",
        "data": [
            {"title": a["title"], "paragraphs": [{"context": c, "qas": qas} for c, qas in a["contexts"].items()]}
            for a in articles.values()
        ],
    }
