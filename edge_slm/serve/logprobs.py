"""Logprobs in OpenAI's response shapes, from the runtime's `GenerationResponse`s (their logprob is
the log-softmax of the raw logits; their `top_logprobs` the likeliest tokens, as (id, logprob))."""

from __future__ import annotations


def openai_logprobs(pieces: list[bytes], responses: list, chat: bool, start: int = 0) -> dict:
    """The responses' logprobs in OpenAI's shape: chat's `{"content": [{token, logprob, bytes,
    top_logprobs}]}`, the completions route's `{tokens, token_logprobs, top_logprobs, text_offset}`
    (offsets counted from `start`: a stream's chunk continues where the one before it ended)."""

    def entry(token: int, logprob: float) -> dict:
        raw = pieces[token] if 0 <= token < len(pieces) else b""
        return {"token": raw.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(raw)}

    if chat:
        content = [
            {**entry(r.token, r.logprob), "top_logprobs": [entry(t, lp) for t, lp in r.top_logprobs]} for r in responses
        ]
        return {"content": content, "refusal": None}
    tokens = [pieces[r.token].decode("utf-8", "replace") for r in responses]
    offsets, at = [], start
    for token in tokens:
        offsets.append(at)
        at += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": [r.logprob for r in responses],
        "top_logprobs": [{entry(t, lp)["token"]: lp for t, lp in r.top_logprobs} for r in responses],
        "text_offset": offsets,
    }
