"""The texts a pruned sentence embedder is distilled on when no --data is given: everything
English that ships in edge_slm/data except what the gate measures on.

Distillation only needs inputs (the teacher gives the targets), so variety matters more than
labels: short commands (the intents' training split, the smart-home requests), questions and
answers about the manuals, the manuals' paragraphs and their sentences, the English side of the
parallel text, the sentences of the calibration text and of the decoders' evaluation story
(general prose: the retrieval check asks about cooking and gardening too), and about 4,300 texts of
general English on everyday topics the default decoder wrote (`general-texts.txt`: no corpus may be
downloaded, and a student distilled on the shipped texts alone matched its teacher at cosine 0.98 on
them and 0.89-0.94 on held-out ones). Held out, so the measured cosine and retrieval
top-1 are on texts the student never saw: the intents test split and the retrieval check's
queries and passages (any training text equal to one of them, ignoring case, is dropped).
"""

from __future__ import annotations

import json
import re

from edge_slm.core.data import CALIBRATION_TEXT, DATA_DIR, EVAL_TEXT, GENERAL_TEXT, PARALLEL_EN_DE
from edge_slm.core.labelled import INTENTS_TEST, INTENTS_TRAIN, read_examples, read_retrieval

MANUALS = DATA_DIR / "manuals"
SMARTHOME = DATA_DIR / "smarthome"


def held_out_texts() -> list[str]:
    """What the embedder's gate and benchmark measure on."""
    check = read_retrieval()
    return check.queries + check.passages + [e.text for e in read_examples(INTENTS_TEST)]


def shipped_embedder_texts() -> list[str]:
    """The shipped training texts, in a fixed order, without duplicates or held-out texts."""
    texts = [e.text for e in read_examples(INTENTS_TRAIN)]
    for name in ("eval.jsonl", "prompt.jsonl"):
        texts += [json.loads(line)["text"] for line in (SMARTHOME / name).read_text("utf-8").splitlines() if line]
    for line in (MANUALS / "questions.jsonl").read_text("utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            texts += [row.get("question") or "", row.get("answer") or ""]  # unanswerable ones have none
    for paragraph in manual_paragraphs():
        texts += [paragraph, *sentences(paragraph)]
    texts += [line.split("\t")[0] for line in PARALLEL_EN_DE.read_text("utf-8").splitlines() if "\t" in line]
    texts += sentences(CALIBRATION_TEXT.read_text("utf-8")) + sentences(EVAL_TEXT.read_text("utf-8"))
    texts += GENERAL_TEXT.read_text("utf-8").splitlines()
    held_out = {t.strip().lower() for t in held_out_texts()}
    seen, kept = set(), []
    for text in (t.strip() for t in texts):
        if text and text.lower() not in held_out and text.lower() not in seen:
            seen.add(text.lower())
            kept.append(text)
    return kept


def manual_paragraphs() -> list[str]:
    """The manuals' prose paragraphs (headings dropped, list items joined into their paragraph)."""
    paragraphs = []
    for path in sorted(MANUALS.glob("*.md")) + sorted(MANUALS.glob("*.txt")):
        for block in re.split(r"\n\s*\n", path.read_text("utf-8")):
            lines = [line.lstrip("-* ").strip() for line in block.splitlines() if not line.startswith("#")]
            text = " ".join(line for line in lines if line)
            if len(text.split()) >= 4:
                paragraphs.append(text)
    return paragraphs


def sentences(text: str) -> list[str]:
    """Sentences of four words or more (a plain split at end punctuation: the texts are simple prose)."""
    parts = re.split(r"(?<=[.!?])\s+", text.replace("\n", " "))
    return [p.strip() for p in parts if len(p.split()) >= 4]
