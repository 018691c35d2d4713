"""Extractive question answering with a question-answering encoder bundle: the span of a context
that answers a question, over a context of any length, torch-free.

    from edge_slm import runtime
    reader = runtime.load("export/x86-laptop-reader")        # an encoder bundle, task question-answering
    best = reader.answer("How many codes?", manual_text)[0]  # Span(answer="50", score=0.93, start=..., end=...)

The reference is transformers' `pipeline("question-answering")` (4.57), and this module follows it
step by step so that the same bundle gives the same best span and the same score: the question and
the context are tokenized as one pair with the context truncated into windows of `max_seq_len`
tokens that overlap by `doc_stride` tokens (the tokenizer's own overflow, as the pipeline asks for
it); in each window every token that is not context (the question, separators, padding) gets a
start and end logit of -10000 (the first token, [CLS], keeps its logit for the softmax but can
never be picked); start and end logits become probabilities with a softmax over the window; a
span's score is P(start) * P(end), with end >= start and at most `max_answer_len` tokens; the
best spans are widened to whole words and cut from the context by character offsets; a span found
in several windows adds up its scores (the same text, ignoring case). transformers cannot run on
the device, so the steps are written out here rather than imported.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from edge_slm.core.errors import EdgeSlmError
from edge_slm.core.text import check_text

DEFAULT_MAX_ANSWER_LEN = 15  # the pipeline's default, in tokens
MAX_SEQ_LEN = 384  # the pipeline's window when the model takes more
WINDOW_BATCH = 8  # windows per onnxruntime call: padded to the longest, which is all but the last


@dataclass(frozen=True)
class Span:
    answer: str
    score: float  # P(start) * P(end) in its window, summed over windows that found the same text
    start: int  # character offsets of the answer in the context
    end: int

    def to_dict(self) -> dict:
        return {"answer": self.answer, "score": round(self.score, 6), "start": self.start, "end": self.end}


class SpanReader:
    """The windows, the span search and the answers over an `EncoderGraph` whose output is
    [windows, tokens, 2] start and end logits."""

    def __init__(self, graph):
        self.graph = graph
        self.max_seq_len = min(graph.max_length, MAX_SEQ_LEN)
        probe = graph.tokenizer.encode("x")
        # The first token of an encoded text is [CLS] (<s> for RoBERTa) when the tokenizer adds one.
        self.cls_id = probe.ids[0] if probe.special_tokens_mask and probe.special_tokens_mask[0] else None
        self.windows_tokenizer = Tokenizer.from_str(graph.tokenizer.to_str())
        self.windows_tokenizer.no_padding()

    def context_room(self, question: str, max_seq_len: int) -> int:
        """Tokens of context a window holds beside the question and the special tokens."""
        pair = self.windows_tokenizer.post_processor.num_special_tokens_to_add(True)
        return max_seq_len - len(self.windows_tokenizer.encode(question, add_special_tokens=False).ids) - pair

    def windows(self, question: str, context: str, max_seq_len: int, doc_stride: int) -> list:
        """The tokenizer's encodings of (question, context): the first window and its overflow."""
        self.windows_tokenizer.enable_truncation(max_seq_len, stride=doc_stride, strategy="only_second")
        first = self.windows_tokenizer.encode(question, context)
        return [first, *first.overflowing]

    def answer(
        self,
        question: str,
        context: str,
        top_k: int = 1,
        doc_stride: int | None = None,
        max_answer_len: int = DEFAULT_MAX_ANSWER_LEN,
        max_seq_len: int | None = None,
        handle_impossible_answer: bool = False,
        align_to_words: bool = True,
    ) -> list[Span]:
        """The `top_k` best answers, best first (the pipeline's arguments, with its defaults)."""
        for name, text in (("question", question), ("context", context)):
            if not isinstance(text, str) or not text.strip():
                raise EdgeSlmError(f"the {name} is empty: give the reader a question and a context to answer it from")
            check_text(text, f"the {name}")
        max_seq_len = self.max_seq_len if max_seq_len is None else max_seq_len
        if not 8 <= max_seq_len <= self.graph.max_length:
            raise EdgeSlmError(f"max_seq_len is {max_seq_len}; this bundle takes 8 to {self.graph.max_length} tokens")
        room = self.context_room(question, max_seq_len)
        if room < 2:
            raise EdgeSlmError(
                f"the question takes {max_seq_len - room} of the {max_seq_len} tokens of a window, leaving no room "
                "for the context: ask a shorter question"
            )
        # The pipeline's default overlap, made smaller when a long question leaves less room than
        # that (where the pipeline itself fails: the tokenizer needs the overlap below the room).
        doc_stride = min(max_seq_len // 2, 128, room - 1) if doc_stride is None else doc_stride
        if not 0 <= doc_stride < room:
            raise EdgeSlmError(
                f"doc_stride is {doc_stride}; with this question a window holds {room} tokens of context: "
                f"give 0 to {room - 1} tokens of overlap"
            )
        if top_k < 1 or max_answer_len < 1:
            raise EdgeSlmError(f"top_k {top_k} and max_answer_len {max_answer_len} must be 1 or more")
        encodings = self.windows(question, context, max_seq_len, doc_stride)
        pre_top_k = top_k * 2 + 10 if align_to_words else top_k  # word alignment can merge candidates
        answers: list[dict] = []
        min_null_score = 1000000.0
        for encoding, logits in zip(encodings, self.logits(encodings)):
            starts, ends, scores, min_null_score = best_spans(
                logits, self.allowed(encoding), pre_top_k, max_answer_len, handle_impossible_answer, min_null_score
            )
            for s, e, score in zip(starts, ends, scores):
                first, last = _char_span(encoding, int(s), int(e), align_to_words)
                text = context[first:last]
                same = next((a for a in answers if a["answer"].lower() == text.lower()), None)
                if same is not None:
                    same["score"] += float(score)
                else:
                    answers.append({"score": float(score), "start": first, "end": last, "answer": text})
        if handle_impossible_answer:
            answers.append({"score": min_null_score, "start": 0, "end": 0, "answer": ""})
        ranked = sorted(answers, key=lambda a: a["score"], reverse=True)[:top_k]
        return [Span(a["answer"], a["score"], a["start"], a["end"]) for a in ranked]

    def allowed(self, encoding) -> np.ndarray:
        """1 for the tokens an answer may use (the context's) and for [CLS], 0 elsewhere."""
        allowed = np.array([sequence == 1 for sequence in encoding.sequence_ids], dtype=np.int64)
        if self.cls_id is not None:
            allowed[np.array(encoding.ids) == self.cls_id] = 1
        return allowed

    def logits(self, encodings) -> list[np.ndarray]:
        """Each window's [tokens, 2] start and end logits, padding cut off."""
        out = []
        for first in range(0, len(encodings), WINDOW_BATCH):
            batch = encodings[first : first + WINDOW_BATCH]
            (logits,) = self.graph.session.run(None, self.graph.feed(batch))
            out.extend(row[: len(e.ids)].astype(np.float32, copy=False) for row, e in zip(logits, batch))
        return out


def best_spans(
    logits: np.ndarray,
    allowed: np.ndarray,
    top_k: int,
    max_answer_len: int,
    handle_impossible_answer: bool = False,
    min_null_score: float = 1000000.0,
):
    """One window's best (start, end, score) candidates and the lowest no-answer score so far: the
    pipeline's `select_starts_ends` and `decode_spans`."""
    blocked = allowed == 0
    start = np.where(blocked, -10000.0, logits[:, 0]).astype(np.float32)
    end = np.where(blocked, -10000.0, logits[:, 1]).astype(np.float32)
    start = np.exp(start - start.max())
    start = start / start.sum()
    end = np.exp(end - end.max())
    end = end / end.sum()
    if handle_impossible_answer:
        min_null_score = min(min_null_score, float(start[0] * end[0]))
    start[0] = end[0] = 0.0  # [CLS] is never an answer
    candidates = np.tril(np.triu(np.outer(start, end)), max_answer_len - 1)
    flat = candidates.flatten()
    if top_k == 1:
        order = np.array([np.argmax(flat)])
    elif len(flat) < top_k:
        order = np.argsort(-flat)
    else:
        chosen = np.argpartition(-flat, top_k)[:top_k]
        order = chosen[np.argsort(-flat[chosen])]
    starts, ends = np.unravel_index(order, candidates.shape)
    # The pipeline tests membership in `allowed.nonzero()` of a [1, tokens] array, whose row
    # indices (0) join the column indices: token 0 always passes this test there, so here too.
    usable = np.union1d(allowed.nonzero()[0], [0])
    keep = np.isin(starts, usable) & np.isin(ends, usable)
    starts, ends = starts[keep], ends[keep]
    return starts, ends, candidates[starts, ends], min_null_score


def _char_span(encoding, start: int, end: int, align_to_words: bool) -> tuple[int, int]:
    """Character offsets in the context of tokens `start`..`end`, widened to whole words."""
    if align_to_words:
        try:
            first = encoding.word_to_chars(encoding.token_to_word(start), sequence_index=1)[0]
            last = encoding.word_to_chars(encoding.token_to_word(end), sequence_index=1)[1]
            return first, last
        except Exception:  # a tokenizer without words: the pipeline keeps to token offsets too
            pass
    return encoding.offsets[start][0], encoding.offsets[end][1]
