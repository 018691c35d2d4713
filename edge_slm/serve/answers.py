"""POST /v1/answers: an answer from the documents of an index, with its sources (`edge-slm serve
BUNDLE --index INDEX`).

    {"question": "How many user codes can the lock store?", "k": 3, "model"?: ...}
    -> {"object": "answer", "answer": "...", "found": true, "mode": "extractive",
        "sources": [{"file", "lines", "text", "score"}, ...], "model": ..., "timings": {"ms": ...}}

BUNDLE is the index's embedder (the answer is the sentence of the passages nearest the question,
as `edge-slm ask` without --decoder) or a decoder (the answer is written from the numbered passages,
as `ask --decoder`; the index's embedder, or --embedder, is loaded beside it). Retrieval waits in
the embedder's bounded queue (the served bundle's own when it is the embedder), generation in the
decoder's, as /v1/chat/completions does; 429 when full. A question the documents do not answer
(best passage below the threshold `ask` uses) gets `"found": false` and no sources. Errors are
OpenAI-shaped: 400 for a missing or empty question, a `k` outside 1-50, or a question longer than
the embedder takes; 404 for another model; 503 until the index and its embedder are loaded.

With a decoder served, `/v1/chat/completions` takes `"retrieval": true` or `{"k": N}` too (`ground`):
the last user message becomes the same grounded prompt, quoting the passages retrieved for it,
and the reply carries them as a top-level `sources` (a stream: in its first chunk).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from sse_starlette.sse import EventSourceResponse
from starlette.requests import Request
from starlette.responses import JSONResponse

from edge_slm.core.errors import EdgeSlmError
from edge_slm.core.manifest import EncoderManifest
from edge_slm.runtime.qa import DEFAULT_MIN_SCORE, NOTHING_RELEVANT
from edge_slm.serve import requests as req
from edge_slm.serve.engine import EncoderEngine, Job, QueueFull
from edge_slm.serve.limits import read_json

ROUTE = "answers"
MAX_K = 50  # as `edge-slm ask -k`
DEFAULT_K = 3
RETRIEVAL = "retrieval"  # the chat request's field that asks for passages (not OpenAI's: ours to define)
ANSWER_TOKENS = 128  # a written answer's most new tokens (ask's --max-new-tokens default)


class Answers:
    """The index, its embedder and the route; loads in its own thread once the served bundle has."""

    def __init__(self, service, index: Path, embedder: Path | None = None):
        self.service, self.index, self.embedder = service, Path(index), embedder
        self.qa = self.retrieval = None
        self.load_error: str | None = None
        threading.Thread(target=self._load, daemon=True, name="edge-slm-index").start()

    def _load(self) -> None:
        from edge_slm.runtime.qa import open_index

        service = self.service
        while service.engine is None and service.load_error is None:
            time.sleep(0.05)
        if service.load_error is not None:
            return
        try:
            if self.serves_embedder:  # the served embedder answers retrieval too, in its own queue
                self.qa, self.retrieval = open_index(self.index, service.model), service.engine
            else:
                self.qa = open_index(self.index, self.embedder, service.threads)
                self.retrieval = EncoderEngine(self.qa.encoder, service.max_queue)
        except EdgeSlmError as exc:  # the index changed or broke after `serve` checked it
            self.load_error = str(exc)
            service.fail(f"{self.index}: {exc}")

    @property
    def loading(self) -> bool:
        """The served bundle is loaded but the index not yet: /health still says "loading"."""
        service = self.service
        return self.qa is None and service.engine is not None and not (service.load_error or self.load_error)

    @property
    def serves_embedder(self) -> bool:
        model = self.service.model
        return isinstance(model.manifest, EncoderManifest) and model.task == "embedding"

    async def route(self, request: Request) -> JSONResponse:
        service = self.service
        try:
            question, k = await self._question(request)
            started = time.perf_counter()
            answer = await self._answer(question, k, request)
        except req.ApiError as exc:
            service.metrics.requests.labels(ROUTE, str(exc.status)).inc()
            return JSONResponse(exc.body(), status_code=exc.status)
        except QueueFull as exc:
            service.metrics.requests.labels(ROUTE, "429").inc()
            return JSONResponse(req.ApiError(429, str(exc), code="queue_full").body(), status_code=429)
        service.metrics.requests.labels(ROUTE, "200").inc()
        body = {"object": "answer", **answer.to_dict(), "found": answer.found, "mode": answer.mode}
        timings = {"ms": round(1e3 * (time.perf_counter() - started), 2)}
        return JSONResponse({**body, "model": service.model_id, "timings": timings})

    async def _question(self, request: Request) -> tuple[str, int]:
        service = self.service
        if self.qa is None or service.load_error or service.stopping:
            message = service.load_error or self.load_error
            raise req.ApiError(503, message or "the index is still loading: retry when /health says ok")
        body = await read_json(request, service.limits)
        if body.get("model") not in (None, service.model_id):
            raise req.ApiError(
                404,
                f"the model {body.get('model')!r} does not exist; this server has {service.model_id!r}",
                "model",
                "model_not_found",
            )
        question, k = body.get("question"), body.get("k", 3)
        if not isinstance(question, str) or not question.strip():
            raise req.ApiError(
                400, "'question' must be a non-empty string: ask what the documents may answer", "question"
            )
        if len(question) > service.limits.max_text_chars:
            raise req.ApiError(
                400,
                f"'question' is {len(question):,} characters; this server takes at most "
                f"{service.limits.max_text_chars:,} per text",
                "question",
            )
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
            raise req.ApiError(400, f"'k' is {k!r}; retrieve 1 to {MAX_K} passages", "k")
        await self._check_length(question, "question")
        return question, k

    async def _check_length(self, question: str, param: str) -> None:
        graph = self.qa.encoder.graph
        tokens = (await self.service.on_text_worker(graph.token_counts, [question]))[0]
        if tokens > graph.max_length:
            raise req.ApiError(
                400,
                f"'{param}' has {tokens} tokens; the index's embedder takes at most {graph.max_length}: shorten it",
                param,
                "context_length_exceeded",
            )

    async def _answer(self, question: str, k: int, request: Request):
        """Retrieval (and the extractive answer) in the embedder's queue; with a decoder served,
        the written answer in its queue."""
        from edge_slm.runtime.qa import Answer

        try:
            found = await self.retrieval.run(lambda: self.qa.ask(question, k=k, min_score=DEFAULT_MIN_SCORE))
        except EdgeSlmError as exc:
            raise req.ApiError(400, str(exc), "question") from None
        if self.serves_embedder or not found.found:
            return found
        model, sources = self.service.model, list(found.sources)
        while True:  # the least relevant passages give way to the answer, as `ask` does
            messages = self.qa.messages(question, sources, found.evidence)
            ids = await self.service.on_text_worker(model.encode_chat, messages)
            if len(ids) + ANSWER_TOKENS <= model.context_length or len(sources) == 1:
                break
            sources = sources[:-1]
        room = model.context_length - len(ids)
        if room < 1:
            raise req.ApiError(
                400,
                f"the question with its best passage takes {len(ids)} tokens, the decoder's context is "
                f"{model.context_length}: serve a decoder with a longer context",
                "question",
                "context_length_exceeded",
            )
        limits = self.service.limits
        job = Job(ids, min(ANSWER_TOKENS, room, limits.max_tokens), deadline=time.monotonic() + limits.request_seconds)
        queue = self.service.engine.submit(job)
        try:
            while True:
                kind, value = await queue.get()
                if kind == "error":
                    raise req.ApiError(503 if isinstance(value, EdgeSlmError) else 500, str(value))
                if kind == "done":
                    break
        finally:
            self.service.engine.cancel(job)  # a no-op once done; frees the model if the client left
        return Answer(job.result.text.strip(), sources, found=True, mode="generated", evidence=found.evidence)

    async def ground(self, messages: list[dict], k: int, reply_tokens: int | None, encode) -> tuple[list, list]:
        """A chat request's `retrieval`: the prompt ids (`encode` renders messages) with its last user
        message quoting the `k` passages nearest it, and those passages; (None, []) when none is
        relevant. The least relevant passages give way until the reply has 128 tokens (or its
        max_tokens, if fewer)."""
        service = self.service
        if self.qa is None:
            raise req.ApiError(503, self.load_error or "the index is still loading: retry when /health says ok")
        last = next((n for n in range(len(messages) - 1, -1, -1) if messages[n]["role"] == "user"), None)
        if last is None or not messages[last]["content"].strip():
            raise req.ApiError(
                400, f"'{RETRIEVAL}' retrieves passages for the last user message: send one with text", "messages"
            )
        question, param = messages[last]["content"], f"messages[{last}]"
        await self._check_length(question, param)
        try:
            sources, evidence = await self.retrieval.run(lambda: self._retrieve(question, k))
        except EdgeSlmError as exc:
            raise req.ApiError(400, str(exc), param) from None
        if evidence is None:
            return None, []
        model, reserve = service.model, min(reply_tokens or ANSWER_TOKENS, ANSWER_TOKENS)
        while True:
            grounded = self.qa.messages(question, sources, evidence)[0]["content"]
            ids = await encode([*messages[:last], {**messages[last], "content": grounded}, *messages[last + 1 :]])
            if len(ids) + reserve <= model.context_length or len(sources) == 1:
                break
            sources = sources[:-1]
        if len(ids) >= model.context_length:
            raise req.ApiError(
                400,
                f"the messages with the best passage take {len(ids)} tokens, the decoder's context is "
                f"{model.context_length}: shorten them or serve a decoder with a longer context",
                RETRIEVAL,
                "context_length_exceeded",
            )
        return ids, sources

    def _retrieve(self, question: str, k: int):
        sources, hits, query = self.qa.retrieve(question, k)
        if not sources or sources[0].score < DEFAULT_MIN_SCORE:
            return [], None
        return sources, self.qa.best_sentence(question, query, hits)


def retrieval_k(body: dict, answers: Answers | None, chat: bool) -> int | None:
    """The passages a completion request asks for with `retrieval` (true: 3), or None."""
    value = body.get(RETRIEVAL)
    if value is None or value is False:
        return None
    if not chat:
        raise req.ApiError(400, f"'{RETRIEVAL}' is for /v1/chat/completions", RETRIEVAL)
    if answers is None:
        raise req.ApiError(
            400, f"'{RETRIEVAL}' needs documents: start the server with --index INDEX (docs/serving.md)", RETRIEVAL
        )
    k = value.get("k", DEFAULT_K) if isinstance(value, dict) and set(value) <= {"k"} else None
    k = DEFAULT_K if value is True else k
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise req.ApiError(
            400, f"'{RETRIEVAL}' is {json.dumps(value)}; send true or {{\"k\": 1 to {MAX_K}}}", RETRIEVAL
        )
    return k


def nothing_relevant(model_id: str, ident: str, created: int, stream: bool, include_usage: bool = False):
    """The reply when no passage is relevant: said, as /v1/answers says it, and no model asked to invent."""
    head = {"id": ident, "created": created, "model": model_id, "sources": []}
    message = {"role": "assistant", "content": NOTHING_RELEVANT}
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    if not stream:
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
        return JSONResponse({**head, "object": "chat.completion", "choices": [choice], "usage": usage})

    async def events():
        head["object"] = "chat.completion.chunk"
        yield {"data": json.dumps({**head, "choices": [{"index": 0, "delta": message, "finish_reason": None}]})}
        yield {"data": json.dumps({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})}
        if include_usage:
            yield {"data": json.dumps({**head, "choices": [], "usage": usage})}
        yield {"data": "[DONE]"}

    return EventSourceResponse(events(), sep="\n")
