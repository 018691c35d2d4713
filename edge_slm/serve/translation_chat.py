"""POST /v1/chat/completions on a translation (seq2seq) bundle: the last user message is translated
and the translation is the assistant's reply, so that an OpenAI client (or a chat UI) can use a
translation bundle as it is. The body is OpenAI's chat completion plus the translation route's
own fields:

    {"messages": [..., {"role": "user", "content": "Good morning."}],
     "target_lang": "de",         # a multilingual model's target language (extra_body in openai)
     "beams": 4,                  # beam width; a streamed reply is greedy
     "max_tokens": 64, "stream": true, "stream_options": {"include_usage": true}}

Sampling fields (temperature, top_p, seed) are accepted and ignored: translation is a search, not
a sample. The translator runs behind the same bounded queue as /v1/translations; a stream sends the
greedy translation as it is written (`Translator.stream`), in chat.completion.chunk events.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid

from sse_starlette.sse import EventSourceResponse
from starlette.requests import Request
from starlette.responses import JSONResponse

from edge_slm.core.errors import EdgeSlmError
from edge_slm.serve import requests as req
from edge_slm.serve.engine import QueueFull
from edge_slm.serve.fields import refuse_unimplemented


def last_user_text(body: dict) -> str:
    messages = req.messages(body)
    users = [m["content"] for m in messages if m["role"] == "user"]
    if not users or not users[-1].strip():
        raise req.ApiError(400, "'messages' needs a user message with the text to translate", "messages")
    return users[-1]


# Chat fields a translation cannot honour: a 400 naming each, never silence (serve.fields).
NOT_FOR_TRANSLATION = (
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "logprobs",
    "top_logprobs",
    "retrieval",
    "stop",
    "logit_bias",
    "chat_template_kwargs",
)


def refuse_for_translation(body: dict) -> None:
    for name in NOT_FOR_TRANSLATION:
        if body.get(name) not in (None, False, [], {}):
            raise req.ApiError(
                400,
                f"'{name}' is not supported on a translation bundle (the reply is the translation); leave it out",
                name,
                "unsupported_parameter",
            )
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise req.ApiError(
            400,
            "'response_format' other than text is not supported on a translation bundle",
            "response_format",
            "unsupported_parameter",
        )
    for name in ("n", "best_of"):
        if body.get(name) not in (None, 1):
            raise req.ApiError(400, f"'{name}' is {body[name]!r}; this server makes one choice per request", name)


def _max_tokens(body: dict, limit: int) -> int:
    """OpenAI's max_tokens is an upper bound: a larger one than the model's cap is the cap."""
    value = body.get("max_completion_tokens")
    if value is None:
        value = body.get("max_tokens")
    if value is None:
        return limit
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise req.ApiError(400, f"'max_tokens' is {value!r}; give a positive integer", "max_tokens")
    return min(value, limit)


async def chat_translation(service, request: Request, body_of, error_of):
    """The chat route of a translation bundle; `body_of` and `error_of` are the app's own body
    reader (loading, model name and size checks) and error responder (metrics)."""
    route = "chat"
    try:
        body = await body_of(service, request, "translation")
        refuse_unimplemented(body, chat=True)
        refuse_for_translation(body)
        text = last_user_text(body)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise req.ApiError(400, "'stream' must be true or false", "stream")
        model = service.model
        max_tokens = _max_tokens(body, model.generation.max_new_tokens)
        beams = 1 if stream else body.get("beams", model.generation.default_beams)
        target_lang = body.get("target_lang")
        try:
            prompt_tokens = await service.on_text_worker(model.check, [text], max_tokens, beams, target_lang)
        except EdgeSlmError as exc:
            raise req.ApiError(400, str(exc), "messages") from None
        options = body.get("stream_options") or {}
        include_usage = bool(options.get("include_usage", False)) if isinstance(options, dict) else False
        head = {
            "id": "chatcmpl-" + uuid.uuid4().hex[:24],
            "created": int(time.time()),
            "model": service.model_id,
        }
        if stream:
            if service.engine.pending > service.engine.max_queue:  # refused with a status while it still can be
                raise QueueFull(f"the server is busy: {service.engine.max_queue} requests are already waiting")
            events = _events(service, text, max_tokens, target_lang, head, prompt_tokens, include_usage)
            service.metrics.requests.labels(route, "200").inc()
            return EventSourceResponse(events, sep="\n")
        try:
            [result] = await service.engine.run(lambda: model.translations([text], max_tokens, beams, target_lang))
        except EdgeSlmError as exc:
            raise req.ApiError(400, str(exc), "messages") from None
    except req.ApiError as exc:
        return error_of(service, route, exc)
    except QueueFull as exc:
        return error_of(service, route, req.ApiError(429, str(exc), code="queue_full"))
    service.metrics.requests.labels(route, "200").inc()
    choice = {"index": 0, "message": {"role": "assistant", "content": result.text}, "finish_reason": "stop"}
    usage = _usage(prompt_tokens, len(result.token_ids))
    return JSONResponse({**head, "object": "chat.completion", "choices": [choice], "usage": usage})


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _events(service, text, max_tokens, target_lang, head, prompt_tokens, include_usage):
    """Server-sent events: the role, then each piece of the greedy translation as the worker
    thread writes it, the finish reason, the usage if asked, [DONE]. A client that leaves stops
    the translation at its next step."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    leave = threading.Event()
    model = service.model

    def work() -> None:
        pieces = model.stream(text, max_tokens, target_lang)
        try:
            while not leave.is_set():
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, ("piece", next(pieces)))
                except StopIteration as end:  # the stream returns how many tokens it wrote
                    loop.call_soon_threadsafe(queue.put_nowait, ("done", end.value))
                    return
        except Exception as exc:  # reported in the stream: the status line has been sent
            loop.call_soon_threadsafe(queue.put_nowait, ("error", exc))

    async def run() -> None:
        try:
            await service.engine.run(work)
        except QueueFull as exc:
            queue.put_nowait(("error", exc))

    head = {**head, "object": "chat.completion.chunk"}

    def chunk(delta: dict, finish: str | None = None) -> str:
        return json.dumps({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    task = loop.create_task(run())
    try:
        yield {"data": chunk({"role": "assistant"})}
        while True:
            kind, value = await queue.get()
            if kind == "piece":
                yield {"data": chunk({"content": value})}
            elif kind == "error":
                status, code = (429, "queue_full") if isinstance(value, QueueFull) else (500, None)
                yield {"data": json.dumps(req.ApiError(status, f"translation failed: {value}", code=code).body())}
                return
            else:
                break
        yield {"data": chunk({}, "stop")}
        if include_usage:
            yield {"data": json.dumps({**head, "choices": [], "usage": _usage(prompt_tokens, value)})}
        yield {"data": "[DONE]"}
    finally:
        leave.set()  # the worker stops at its next piece; the engine's lock is released then
        task.add_done_callback(lambda t: t.exception())  # a QueueFull here was already sent
