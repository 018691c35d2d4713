"""OpenAI request bodies, checked: every field the service reads, with its type and range; the
first problem becomes an `ApiError` that the app answers in OpenAI's error shape. Which fields
are read, refused or ignored: `serve.fields`."""

from __future__ import annotations

import math
from dataclasses import dataclass

from edge_slm.core.errors import EdgeSlmError
from edge_slm.runtime.chat_template import check_template_kwargs


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = (
            "rate_limit_error"
            if self.status == 429
            else "invalid_request_error"
            if self.status < 500
            else "server_error"
        )
        return {
            "error": {
                "message": self.message,
                "type": kind,
                "param": self.param,
                "code": self.code,
            }
        }


@dataclass(frozen=True)
class Sampling:
    max_tokens: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    params: dict  # the runtime's sampling names (SamplingConfig), the bundle's defaults filled in
    logprobs: int | None  # None: no logprobs; else how many alternatives per token (top_logprobs)
    cache_prompt: bool  # False: no prefix of an earlier request reused
    echo: bool  # /v1/completions: the prompt written before the reply


# OpenAI's defaults for what a request leaves out and the bundle does not set (greedy is the
# runtime's default, 1.0 is OpenAI's).
OPENAI_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(400, f"'{name}' must be a number, got {value!r}", name)
    if not low <= value <= high or (low_open and value == low):
        bound = f"above {low:g} and at most {high:g}" if low_open else f"between {low:g} and {high:g}"
        raise ApiError(400, f"'{name}' is {value}; it must be {bound}", name)
    return float(value)


def _integer(body: dict, name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"'{name}' must be an integer, got {value!r}", name)
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ApiError(400, f"'{name}' is {value}; it must be {bound}", name)
    return value


def _flag(body: dict, name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"'{name}' must be true or false, got {value!r}", name)
    return value


def _logit_bias(body: dict, vocab_size: int) -> dict[int, float] | None:
    """OpenAI's `logit_bias`: {"token id": bias in [-100, 100]}; -100 bans the token."""
    value = body.get("logit_bias")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ApiError(400, "'logit_bias' must be an object of token id -> bias in [-100, 100]", "logit_bias")
    bias = {}
    for key, amount in value.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and int(key) < vocab_size):
            raise ApiError(
                400, f"logit_bias key {key!r} is not a token id of this model (0 to {vocab_size - 1})", "logit_bias"
            )
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not -100 <= amount <= 100:
            raise ApiError(400, f"logit_bias[{key!r}] is {amount!r}; it must be a number in [-100, 100]", "logit_bias")
        bias[int(key)] = float(amount)
    return bias or None


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4:
        return tuple(stop)
    raise ApiError(400, "'stop' must be a string or a list of at most 4 strings", "stop")


def _logprobs(body: dict, chat: bool) -> int | None:
    """How many alternatives per token to report, or None for no logprobs: chat's `logprobs`
    (true/false) with `top_logprobs` (0-20); the completions route's `logprobs` (an integer 0-5)."""
    if not chat:
        return _integer(body, "logprobs", 0, 5)
    wanted = _flag(body, "logprobs", False)
    top = _integer(body, "top_logprobs", 0, 20)
    if top is not None and not wanted:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return (top or 0) if wanted else None


def sampling(body: dict, chat: bool = True, defaults: dict | None = None, vocab_size: int = 2**31) -> Sampling:
    """The request's generation settings, each checked against OpenAI's range (llama.cpp's names
    against theirs); a field the request leaves out takes the bundle's default (`defaults`, from
    its generation_config.json), else OpenAI's."""
    defaults = {**OPENAI_DEFAULTS, **(defaults or {})}
    stream = _flag(body, "stream", False)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options")
    for name in ("n", "best_of"):
        if body.get(name) not in (None, 1):
            raise ApiError(400, f"'{name}' is {body[name]!r}; this server makes one choice per request", name)
    max_tokens = _integer(body, "max_tokens", 1)
    max_tokens = _integer(body, "max_completion_tokens", 1) or max_tokens  # both checked; the newer name wins
    if body.get("repetition_penalty") is not None and body.get("repeat_penalty") is not None:
        raise ApiError(400, "give 'repetition_penalty' or its alias 'repeat_penalty', not both", "repeat_penalty")
    penalty_name = "repeat_penalty" if body.get("repeat_penalty") is not None else "repetition_penalty"
    top_k = _integer(body, "top_k", -1)  # -1 (vLLM) and 0 (llama.cpp): no limit
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError(400, f"'seed' must be an integer, got {seed!r}", "seed")
    params = {
        "temperature": _number(body, "temperature", defaults["temperature"], 0.0, 2.0),
        "top_p": _number(body, "top_p", defaults["top_p"], 0.0, 1.0),  # 0: greedy
        "top_k": max(top_k, 0) if top_k is not None else int(defaults["top_k"]),
        "min_p": _number(body, "min_p", 0.0, 0.0, 1.0),
        "repetition_penalty": _number(body, penalty_name, defaults["repetition_penalty"], 0.0, 2.0, low_open=True),
        "presence_penalty": _number(body, "presence_penalty", 0.0, -2.0, 2.0),
        "frequency_penalty": _number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        "logit_bias": _logit_bias(body, vocab_size),
        # OpenAI takes any 64-bit seed; numpy's generator takes non-negative ones: the same bits.
        "seed": seed % 2**64 if seed is not None else None,
    }
    echo = False if chat else _flag(body, "echo", False)
    if body.get("suffix") not in (None, ""):
        raise ApiError(400, "'suffix' (insertion) is not supported by this server; leave it out", "suffix")
    logprobs = _logprobs(body, chat)
    if echo and logprobs is not None:
        raise ApiError(400, "'echo' with 'logprobs' (the prompt's logprobs) is not supported; drop one", "echo")
    return Sampling(
        max_tokens=max_tokens,
        stop=_stop(body),
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
        params=params,
        logprobs=logprobs,
        cache_prompt=_flag(body, "cache_prompt", True),
        echo=echo,
    )


def messages(body: dict) -> list[dict]:
    value = body.get("messages")
    if not isinstance(value, list) or not value:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content}", "messages")
    out = []
    for n, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError(400, f"messages[{n}] needs a 'role'", f"messages[{n}]")
        content = message.get("content")
        if content is None:
            content = ""
        if isinstance(content, list):
            parts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise ApiError(400, f"messages[{n}].content: only text parts are supported", f"messages[{n}]")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{n}].content must be text", f"messages[{n}]")
        out.append({**message, "content": content})
    return out


def chat_template_kwargs(body: dict) -> dict:
    """Extra chat template variables (Qwen3's enable_thinking), as vLLM's server takes them."""
    try:
        return check_template_kwargs(body.get("chat_template_kwargs"), "'chat_template_kwargs'")
    except EdgeSlmError as exc:
        raise ApiError(400, str(exc), "chat_template_kwargs") from None


def prompt(body: dict) -> str:
    value = body.get("prompt")
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]
    if not isinstance(value, str) or not value:
        raise ApiError(400, "'prompt' must be a non-empty string", "prompt")
    return value


MAX_INPUTS = 2048  # texts per embeddings / classification request, as OpenAI's embeddings API allows


def inputs(body: dict) -> list[str]:
    """`input`: one text or a list of texts, each non-empty."""
    value = body.get("input")
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts:
        raise ApiError(400, "'input' must be a string or a non-empty list of strings", "input")
    if len(texts) > MAX_INPUTS:
        raise ApiError(400, f"'input' has {len(texts)} texts; send at most {MAX_INPUTS} per request", "input")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ApiError(400, f"input[{i}] must be a string (token arrays are not accepted)", "input")
        if not text.strip():
            raise ApiError(400, f"input[{i}] is empty; give each text some words", "input")
    return texts


def encoding_format(body: dict) -> str:
    value = body.get("encoding_format", "float")
    if value not in ("float", "base64"):
        raise ApiError(400, f"'encoding_format' is {value!r}; use 'float' or 'base64'", "encoding_format")
    return value
