"""What one request may ask of the server, checked before any tokenization: the body's size, media
type, JSON nesting and text, the number of chat messages and the size of each text; and the
server-side caps on generation (tokens, seconds). docs/security.md lists them with their defaults."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from starlette.requests import Request

from edge_slm.serve.requests import ApiError


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 2 * 1024 * 1024  # 2,048 embedding inputs of ~1 kB fit; 200 MB bodies do not
    max_json_depth: int = 64  # chat bodies nest 4 deep; tool schemas (JSON Schema) deeper; 1,000 is an attack
    max_messages: int = 512
    body_seconds: float = 30.0  # a body sent a byte at a time holds a connection no longer than this
    max_text_chars: int = 65_536  # one message, prompt or input: ~16k tokens, past any bundle's context
    max_tokens: int | None = None  # None: the bundle's profile (runtime.serve_max_tokens)
    request_seconds: float | None = None  # None: the bundle's profile (runtime.serve_request_seconds)
    share_prefix_cache: bool = False  # reuse (and report) the KV cache across clients with other keys

    def resolved(self, profile_runtime) -> Limits:
        """The caps the server was not given, from the bundle's profile (a bundle built before these
        keys existed: the profile defaults)."""
        import dataclasses

        from edge_slm.core.targets import Runtime

        def setting(key: str):
            default = getattr(Runtime, key)
            if isinstance(profile_runtime, dict):
                return profile_runtime.get(key, default)
            return getattr(profile_runtime, key, default)

        return dataclasses.replace(
            self,
            max_tokens=self.max_tokens or int(setting("serve_max_tokens")),
            request_seconds=self.request_seconds or float(setting("serve_request_seconds")),
        )


JSON_TYPES = ("application/json",)


async def read_json(request: Request, limits: Limits) -> dict:
    """The body as a JSON object: application/json, at most `max_body_bytes`, valid UTF-8, nested at
    most `max_json_depth`, every string valid Unicode (no lone surrogates from `\\ud800` escapes)."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media not in JSON_TYPES:
        # A form or text/plain body is a "simple" request a web page may send cross-site without a
        # CORS preflight: refusing it keeps any page the user visits from starting generation.
        raise ApiError(
            415, f"the content type is {media or 'missing'!r}; send 'application/json'", code="unsupported_media_type"
        )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise ApiError(413, _too_large(int(declared), limits), code="request_too_large")

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():  # a chunked body without a length is counted as it comes
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise ApiError(413, _too_large(size, limits, at_least=True), code="request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    try:  # asyncio.wait_for, not asyncio.timeout: devices run Python 3.10
        raw = await asyncio.wait_for(read(), limits.body_seconds)
    except asyncio.TimeoutError:
        raise ApiError(
            408, f"the request body took over {limits.body_seconds:g} s to arrive", code="request_timeout"
        ) from None
    return parse(raw, limits)


def _too_large(size: int, limits: Limits, at_least: bool = False) -> str:
    more = "over " if at_least else ""
    return f"the request body is {more}{size:,} bytes; this server takes at most {limits.max_body_bytes:,}"


def parse(raw: bytes, limits: Limits) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"the request body is not valid UTF-8 (byte {exc.start}): send UTF-8 JSON") from None
    try:
        body = json.loads(text)
    except RecursionError:  # json's C parser gives up near Python's recursion limit
        raise ApiError(400, f"the request body nests deeper than {limits.max_json_depth} levels") from None
    except ValueError:
        raise ApiError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    check_values(body, limits)
    return body


def check_values(body: dict, limits: Limits) -> None:
    """One walk over the parsed body (iterative: no recursion to exhaust): its depth, and every
    key and string encodable as UTF-8; the first problem names its field."""
    stack = [(body, "", 1)]
    while stack:
        value, path, depth = stack.pop()
        if depth > limits.max_json_depth and isinstance(value, (dict, list)):  # objects and arrays nest
            raise ApiError(400, f"'{path}' nests deeper than {limits.max_json_depth} levels", path or None)
        if isinstance(value, dict):
            for key, item in value.items():
                where = f"{path}.{key}" if path else key
                _check_text(key, where)
                stack.append((item, where, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value))
        elif isinstance(value, str):
            _check_text(value, path)


def _check_text(text: str, path: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        name = _printable(path)
        raise ApiError(
            400,
            f"'{name}' is not valid Unicode: a lone surrogate {text[exc.start]!r} at character {exc.start}; "
            "send UTF-8 text (escape pairs such as \\ud83d\\ude00 are fine)",
            name,
        ) from None


def _printable(path: str) -> str:
    return path if path.isprintable() and len(path) <= 80 else repr(path[:80])[1:-1]


def check_texts(body: dict, limits: Limits, fit: tuple[int, int] | None = None) -> None:
    """The number of messages and the size of each text, before anything is tokenized. With `fit`
    = (the model's tokens, its longest token in characters): text that cannot fit in that many
    tokens is refused too, without spending the tokenizer's memory on it (hundreds of bytes a character)."""
    messages = body.get("messages")
    if isinstance(messages, list):
        if len(messages) > limits.max_messages:
            raise ApiError(
                400,
                f"'messages' has {len(messages):,} messages; this server takes at most {limits.max_messages:,}",
                "messages",
            )
        total = 0
        for n, message in enumerate(messages):
            content = message.get("content") if isinstance(message, dict) else None
            parts = content if isinstance(content, list) else [content]
            size = sum(len(_text_of(part)) for part in parts)
            _check_size(size, f"messages[{n}].content", limits)
            total += size
        _check_fit(total, "messages", fit)
    for name in ("prompt", "input"):
        value = body.get(name)
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            if isinstance(item, str):
                field = name if not isinstance(value, list) else f"{name}[{i}]"
                _check_size(len(item), field, limits)
                _check_fit(len(item), field, fit)


def _check_fit(size: int, field: str, fit: tuple[int, int] | None) -> None:
    # Every token covers at most `longest` characters of text, so more than tokens x longest
    # characters cannot become `tokens` tokens (the chat template only adds to them). Twice that is
    # refused: a normalizer that drops characters (accents, control characters) may shrink a text.
    if fit is not None and size > 2 * fit[0] * fit[1]:
        raise ApiError(
            400,
            f"'{field}' has {size:,} characters; the model's context is {fit[0]:,} tokens of at most {fit[1]} "
            "characters each: shorten it",
            field,
            "context_length_exceeded",
        )


def _text_of(part) -> str:
    """A message's content or one of its parts ({"type": "text", "text": ...}); anything else is
    left to the field checks that follow."""
    text = part.get("text") if isinstance(part, dict) else part
    return text if isinstance(text, str) else ""


def _check_size(size: int, field: str, limits: Limits) -> None:
    if size > limits.max_text_chars:
        raise ApiError(
            400,
            f"'{field}' is {size:,} characters; this server takes at most {limits.max_text_chars:,} per text",
            field,
        )
