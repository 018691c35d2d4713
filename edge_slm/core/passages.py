"""Documents -> sentences -> passages, each with the file lines it came from.

A document is split into sections at its headings (Markdown `#` lines, a line underlined with
`===` / `---`, or a title written as a short line or two without sentence punctuation), a section
into blocks (paragraphs, list items, table rows read with their header), a block into sentences.
Passages are runs of consecutive sentences of one section, as many as fit a token budget, each
starting with the previous passage's last sentence (one sentence of overlap), so that an answer
that straddles two passages is whole in one of them. Every sentence keeps its 1-based line range,
so an answer can be shown with exactly where it came from.

Sentences are split with a regular expression rather than a library (nltk's punkt, spaCy): those
pull in models and hundreds of MB that a device does not have room for, and manuals are written
in plain sentences; the rule keeps abbreviations such as "e.g." and "No. 5" whole.
"""

from __future__ import annotations

import bisect
import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass, field

HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$")
UNDERLINE = re.compile(r"^\s{0,3}(=+|-+)\s*$")
LIST_ITEM = re.compile(r"^\s*(?:[-*+]|\d{1,3}[.)])\s+")
TABLE_RULE = re.compile(r"^\s*\|?[\s:|-]+\|[\s:|-]*$")
# A sentence ends at . ! or ? followed by space and a capital, digit or quote; not after the common
# abbreviations of manuals ("Press button A. Then ..." is two sentences; "e.g. Wool" is one).
SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[A-Z0-9\"'(\[])")
ABBREVIATIONS = ("e.g.", "i.e.", "etc.", "approx.", "No.", "Fig.", "vs.", "min.", "max.", "Mr.", "Dr.")


@dataclass(frozen=True)
class Sentence:
    text: str
    lines: tuple[int, int]  # first and last line, 1-based, inclusive


@dataclass
class Passage:
    file: str
    heading: str  # the section's heading ("" before the first heading)
    sentences: list[Sentence] = field(default_factory=list)
    title: str = ""  # the document's first heading: what the document is about

    @property
    def topic(self) -> str:
        """Title and heading: "KeyNest K2 Smart Door Lock / Batteries"."""
        return " / ".join(part for part in dict.fromkeys((self.title, self.heading)) if part)

    @property
    def text(self) -> str:
        return " ".join(s.text for s in self.sentences)

    @property
    def lines(self) -> tuple[int, int]:
        return self.sentences[0].lines[0], self.sentences[-1].lines[1]

    def embedding_text(self) -> str:
        """What the embedder sees of the passage, for retrieval: its heading and text ("Batteries: A
        fresh set lasts ..."). On the shipped manuals' 64 questions the passage's heading found the
        right passage first for 61, the text alone for 59, the document's title added for 59 (a
        title such as "AIRWISE T300 WI-FI THERMOSTAT" pulls every Wi-Fi question to that document)."""
        return f"{self.heading}: {self.text}" if self.heading else self.text

    def sentence_texts(self) -> list[str]:
        """What the embedder sees of each sentence, for the extractive answer: the sentence with its
        topic ("KeyNest K2 Smart Door Lock / Batteries: A fresh set lasts about 12 months"), which a
        sentence on its own often leaves out (0.84 of the shipped answers found, against 0.80)."""
        return [f"{self.topic}: {s.text}" if self.topic else s.text for s in self.sentences]

    def to_dict(self) -> dict:
        return {
            "file": self.file,
            "lines": list(self.lines),
            "title": self.title,
            "heading": self.heading,
            "text": self.text,
            "sentences": [{"text": s.text, "lines": list(s.lines)} for s in self.sentences],
        }

    @classmethod
    def from_dict(cls, data: dict) -> Passage:
        sentences = [Sentence(s["text"], (int(s["lines"][0]), int(s["lines"][1]))) for s in data["sentences"]]
        return cls(data["file"], data["heading"], sentences, data["title"])


def sections(text: str) -> tuple[str, list[tuple[str, list[Sentence]]]]:
    """The document's title (its first heading, or "") and the (heading, sentences) of each
    section, in order; sections without sentences left out."""
    lines = text.split("\n")
    out: list[tuple[str, list[Sentence]]] = []
    headings, block, sentences = [""], [], []
    columns: list[str] = []  # the header of the Markdown table being read

    def close_block() -> None:
        if block and is_title(block):  # a title written as plain lines ("AIRWISE T300 THERMOSTAT")
            start_section(" ".join(_clean(line).strip() for _, line in block))
        elif block:
            sentences.extend(split_sentences(block))
        block.clear()

    def start_section(heading: str) -> None:
        if sentences:
            out.append((headings[-1], list(sentences)))
            sentences.clear()
        headings.append(heading)

    for number, raw in enumerate(lines, start=1):
        line = raw.rstrip("\r")
        following = lines[number].rstrip("\r") if number < len(lines) else ""
        match = HEADING.match(line)
        if match or (line.strip() and UNDERLINE.match(following) and not block and not LIST_ITEM.match(line)):
            close_block()
            start_section((match.group(1) if match else line).strip())
            continue
        if UNDERLINE.match(line) and not block or TABLE_RULE.match(line) and "|" in line:
            continue  # the underline of a heading, or a Markdown table's |---|---| rule
        if line.lstrip().startswith("|") and TABLE_RULE.match(following) and "|" in following:
            close_block()
            columns = _cells(line)  # a table's header: each row below is read with it
            continue
        if line.lstrip().startswith("|") and columns:
            # A row as "Programme: Wool; Maximum load: 2 kg": a row alone does not say what its cells are.
            pairs = itertools.zip_longest(columns, _cells(line), fillvalue="")
            line = "| " + " | ".join(f"{c}: {v}" if c else v for c, v in pairs if v) + " |"
        elif not line.lstrip().startswith("|"):
            columns = []
        if not line.strip():
            close_block()
            continue
        if LIST_ITEM.match(line) or line.lstrip().startswith("|"):
            close_block()  # each list item and table row is a block of its own
        block.append((number, line))
    close_block()
    start_section("")
    title = next((h for h in headings if h), "")
    return title, out


def is_title(block: list[tuple[int, str]]) -> bool:
    """Up to two short lines, none ending like a sentence, not a list item or table row."""
    lines = [line.strip() for _, line in block]
    return (
        len(lines) <= 2
        and all(len(line.split()) <= 10 and not line.endswith((".", "!", "?", ":", ";", ",")) for line in lines)
        and not any(LIST_ITEM.match(line) or line.startswith("|") for line in lines)
    )


def split_sentences(block: list[tuple[int, str]]) -> list[Sentence]:
    """The sentences of a block of (line number, line), each with the lines it spans."""
    starts, parts, offset = [], [], 0
    for number, line in block:
        starts.append(offset)
        parts.append(_clean(line))
        offset += len(parts[-1]) + 1
    joined = " ".join(parts)
    numbers = [number for number, _ in block]
    sentences, begin = [], 0
    for match in SENTENCE_END.finditer(joined):
        before = joined[begin : match.start()]  # up to and with the stop
        if before.endswith(ABBREVIATIONS):
            continue
        sentences.append((begin, match.start() + len(match.group(0).rstrip())))
        begin = match.end()
    sentences.append((begin, len(joined)))
    out = []
    for start, end in sentences:
        text = " ".join(joined[start:end].split())
        if text:
            first = numbers[bisect.bisect_right(starts, start) - 1]
            last = numbers[bisect.bisect_right(starts, max(start, end - 1)) - 1]
            out.append(Sentence(text, (first, last)))
    return out


def _clean(line: str) -> str:
    """A line without its Markdown list marker, table pipes or emphasis."""
    line = LIST_ITEM.sub("", line, count=1)
    if line.lstrip().startswith("|"):
        line = "; ".join(cell for cell in _cells(line) if cell)
    return line.replace("**", "").replace("__", "").replace("`", "")


def _cells(row: str) -> list[str]:
    return [cell.strip() for cell in row.strip().strip("|").split("|")]


def passages(file: str, text: str, budget: int, count_tokens: Callable[[list[str]], list[int]]) -> list[Passage]:
    """The passages of one document: each section's sentences packed up to `budget` tokens, with
    one sentence of overlap between neighbours (a sentence longer than the budget stands alone)."""
    out = []
    title, parts = sections(text)
    for heading, section in parts:
        sizes = count_tokens([s.text for s in section])  # the heading is not counted: the budget is half the maximum
        start = 0
        while start < len(section):
            end, used = start, 0
            while end < len(section) and (end == start or used + sizes[end] <= budget):
                used += sizes[end]
                end += 1
            out.append(Passage(file, heading, section[start:end], title))
            if end >= len(section):
                break
            # One sentence of overlap when it fits beside the next one; always move on.
            overlap = end - 1 > start and sizes[end - 1] + sizes[end] <= budget
            start = end - 1 if overlap else end
    return out
