"""Answer a question from a document index, with the passages it came from: `edge-slm ask`.

    from edge_slm import runtime
    docs = runtime.open_index("manuals.index")           # the index and its embedder, loaded once
    answer = docs.ask("How many user codes can the lock store?")
    print(answer.answer, answer.sources[0].file, answer.sources[0].lines)
    answer = docs.ask("...", decoder=runtime.load("export/x86-laptop"), on_text=print)  # generated, streamed

Retrieval embeds the question and takes the `k` passages nearest it. Without a decoder the answer
is extractive: the sentence of those passages nearest the question (scored with the same
embedder), quoted as written; or, with a question-answering encoder bundle as `reader`, the span
of the retrieved passages the reader scores best (`runtime/reader.py`). With a decoder the passages are
quoted in a prompt as [1], [2], ... and the model writes the answer citing them. When even the
best passage scores below `min_score`, the answer says nothing relevant was found, and no model
is asked to invent one.

A server keeps one `DocumentQA` per index: `retrieve` and `messages` give it the sources and the
chat messages to run through its own scheduler; `ask` does all of it in this process.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_slm.core.errors import EdgeSlmError
from edge_slm.core.index import DocumentIndex, DocumentIndexError, read_index
from edge_slm.core.text import check_text
from edge_slm.runtime.index import identity_of, open_embedder

NOTHING_RELEVANT = "Nothing in the indexed documents answers this question."
# Calibrated with all-MiniLM-L6-v2 (int8) on edge_slm/data/manuals (benchmarks/ask.py): the best
# passage of every one of the 64 answerable questions scores 0.33 or more; of the 11 unanswerable
# ones, 10 score 0.29 or less (one, "How do I descale the coffee machine?", scores 0.41 on the
# washing machine's manual). Halfway between 0.29 and 0.33.
DEFAULT_MIN_SCORE = 0.31
# Identifiers (error codes, model numbers, addresses: "E20", "2.4", "192.168.8.1") look alike to an
# embedder ("E20" and "E90" score nearly the same); a sentence that holds one the question names
# gets this much more: one more of the 64 shipped questions answered right.
IDENTIFIER_BONUS = 0.2
IDENTIFIER = re.compile(r"\b[A-Za-z]*\d[\w.]*\b")
# The best sentence is named in the prompt: the 135M default decoder, given only the passages,
# answered 7 of 18 shipped questions with their facts; pointed at the sentence too, 11 of 18.
PROMPT = (
    "Answer the question using only the numbered passages below, in one sentence. "
    'Cite the passage you used like [1].\n\n{passages}\n\nThe sentence that answers it is probably: "{best}"\n\n'
    "Question: {question}"
)


@dataclass(frozen=True)
class Source:
    file: str  # relative to the indexed folder
    lines: tuple[int, int]  # first and last line, 1-based, inclusive
    heading: str
    text: str
    score: float  # cosine similarity of the passage and the question

    def to_dict(self) -> dict:
        return {"file": self.file, "lines": list(self.lines), "text": self.text, "score": round(self.score, 4)}


@dataclass(frozen=True)
class Answer:
    answer: str
    sources: list[Source]  # best first; empty when nothing relevant was found
    found: bool
    mode: str  # "extractive", "reader" (a span), "generated", or "none" (nothing relevant)
    evidence: Source | None = None  # the sentence the extractive answer is or holds, with its lines

    def to_dict(self) -> dict:
        return {"answer": self.answer, "sources": [s.to_dict() for s in self.sources]}


class DocumentQA:
    """An index with its embedder loaded: `retrieve`, `messages` and `ask`."""

    def __init__(self, index: str | Path | DocumentIndex, embedder=None, threads: int | None = None):
        self.index = index if isinstance(index, DocumentIndex) else read_index(Path(index))
        if hasattr(embedder, "embed"):  # an Encoder already loaded (a server, a benchmark)
            self.encoder, where = embedder, embedder.path
        else:
            where = Path(embedder if embedder is not None else self.index.embedder["path"])
            if embedder is None and not where.is_dir():
                raise DocumentIndexError(
                    f"{self.index.path} was built with the embedder at {where}, which is not on this machine: "
                    "give a copy of it with --embedder"
                )
            self.encoder = open_embedder(where, threads)
        self.index.check_embedder(identity_of(self.encoder), str(where))

    def embed(self, texts: list[str]) -> np.ndarray:
        vectors = self.encoder.embed(texts)
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)

    def retrieve(self, question: str, k: int = 3) -> tuple[list[Source], list[tuple[int, float]], np.ndarray]:
        """The `k` passages nearest the question, best first; their (number, score); the question's
        vector."""
        question = _checked_question(question)
        if not isinstance(k, int) or k < 1:
            raise EdgeSlmError(f"k is {k!r}; retrieve 1 passage or more")
        query = self.embed([question])[0]
        hits = self.index.search(query, k)
        sources = []
        for number, score in hits:
            passage = self.index.passages[number]
            sources.append(Source(passage.file, passage.lines, passage.heading, passage.text, score))
        return sources, hits, query

    def best_sentence(self, question: str, query: np.ndarray, hits: list[tuple[int, float]]) -> Source:
        """The sentence of the retrieved passages that best answers the question (extractive): the
        most similar to it (each sentence was embedded with its passage's topic), with
        IDENTIFIER_BONUS if it holds an identifier the question names. Adding the passage's own
        score changed none of the 64 shipped answers, so it is left out."""
        best, best_score = None, -np.inf
        named = set(IDENTIFIER.findall(question.lower()))
        for number, _ in hits:
            passage = self.index.passages[number]
            similarities = self.index.sentences_of(number) @ query
            for sentence, similarity in zip(passage.sentences, similarities.tolist()):
                score = similarity
                if named & set(IDENTIFIER.findall(sentence.text.lower())):
                    score += IDENTIFIER_BONUS
                if score > best_score:
                    best, best_score = (
                        Source(passage.file, sentence.lines, passage.heading, sentence.text, similarity),
                        score,
                    )
        return best

    def read(self, question: str, hits: list[tuple[int, float]], reader) -> tuple[str, Source]:
        """The span of the retrieved passages a question-answering bundle (`reader`) scores best,
        and the sentence that holds it (as the evidence a decoder is pointed at)."""
        best, best_score, where = None, -1.0, None
        for number, _ in hits:
            passage = self.index.passages[number]
            span = reader.answer(question, passage.text)[0]
            if span.score > best_score:
                best, best_score, where = span, span.score, passage
        holding = [s for s in where.sentences if best.answer and best.answer in s.text] or where.sentences[:1]
        sentence = holding[0]
        return best.answer, Source(where.file, sentence.lines, where.heading, sentence.text, best_score)

    def messages(self, question: str, sources: list[Source], best: Source) -> list[dict]:
        """The chat messages that ask a decoder to answer from `sources`, numbered [1], [2], ... as
        the sources are listed, pointing it at the `best` sentence (`best_sentence`)."""
        quoted = "\n\n".join(f"[{n}] {s.text}" for n, s in enumerate(sources, 1))
        return [{"role": "user", "content": PROMPT.format(passages=quoted, best=best.text, question=question)}]

    def ask(
        self,
        question: str,
        k: int = 3,
        decoder=None,
        min_score: float = DEFAULT_MIN_SCORE,
        on_text: Callable[[str], None] | None = None,
        max_new_tokens: int = 128,
        reader=None,
    ) -> Answer:
        """The answer and its sources; `on_text` receives a decoder's answer piece by piece;
        `reader`, a question-answering encoder bundle, picks the answer span (and the sentence a
        decoder is pointed at)."""
        sources, hits, query = self.retrieve(question, k)
        if not sources or sources[0].score < min_score:
            return Answer(NOTHING_RELEVANT, [], found=False, mode="none")
        if reader is not None:
            span, evidence = self.read(question, hits, reader)
            if decoder is None:
                return Answer(span, sources, found=True, mode="reader", evidence=evidence)
        else:
            evidence = self.best_sentence(question, query, hits)
        if decoder is None:
            return Answer(evidence.text, sources, found=True, mode="extractive", evidence=evidence)
        ids = decoder.encode_chat(self.messages(question, sources, evidence))
        while len(ids) + max_new_tokens > decoder.context_length and len(sources) > 1:
            sources = sources[:-1]  # the least relevant passage gives way to the answer
            ids = decoder.encode_chat(self.messages(question, sources, evidence))
        if len(ids) + max_new_tokens > decoder.context_length:
            raise EdgeSlmError(
                f"the question with its best passage takes {len(ids)} tokens and the answer {max_new_tokens}, "
                f"beyond the decoder's context of {decoder.context_length}: ask for fewer new tokens, or use a "
                "decoder with a longer context"
            )
        text = ""
        for piece in decoder.stream(ids, max_new_tokens=max_new_tokens):
            text += piece.text
            if on_text is not None and piece.text:
                on_text(piece.text)
        return Answer(text.strip(), sources, found=True, mode="generated", evidence=evidence)


def open_index(index: str | Path, embedder=None, threads: int | None = None) -> DocumentQA:
    """An index and its embedder (the one recorded in the index, or `embedder`: a bundle path or a
    loaded `Encoder`, checked to be the same model), ready to answer questions."""
    return DocumentQA(index, embedder, threads)


def ask(index, question: str, embedder=None, decoder=None, k: int = 3, **kwargs) -> Answer:
    """One question: `index` is a path (opened for this call) or an open `DocumentQA`; `decoder`
    a loaded decoder `Model`, or None for an extractive answer."""
    qa = index if isinstance(index, DocumentQA) else open_index(index, embedder)
    return qa.ask(question, k=k, decoder=decoder, **kwargs)


def _checked_question(question) -> str:
    if not isinstance(question, str) or not question.strip():
        raise EdgeSlmError("the question is empty: ask something the documents may answer")
    return check_text(question, "the question")
