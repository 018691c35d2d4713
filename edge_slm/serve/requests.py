"""OpenAI request bodies, checked: every field the service reads, with its type and range; the
first problem becomes an `ApiError` that the app answers in OpenAI's error shape. Fields the
service does not use are ignored, as OpenAI-compatible servers do, so that clients may send them."""

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
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(400, f"'{name}' must be a number, got {value!r}", name)
    if not low <= value <= high:
        raise ApiError(400, f"'{name}' is {value}; it must be between {low:g} and {high:g}", name)
    return float(value)


def _integer(body: dict, name: str, low: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"'{name}' must be an integer, got {value!r}", name)
    if value < low:
        raise ApiError(400, f"'{name}' is {value}; it must be at least {low}", name)
    return value


def sampling(body: dict) -> Sampling:
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4:
        stops = tuple(stop)
    else:
        raise ApiError(400, "'stop' must be a string or a list of at most 4 strings", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, f"'stream' must be true or false, got {stream!r}", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options")
    n = body.get("n", 1)
    if n != 1:
        raise ApiError(400, f"'n' is {n!r}; this server makes one choice per request", "n")
    max_tokens = _integer(body, "max_completion_tokens", 1) or _integer(body, "max_tokens", 1)
    return Sampling(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0) or 1.0,
        seed=_integer(body, "seed", 0),
        stop=stops,
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
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
