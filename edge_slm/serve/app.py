"""The OpenAI-compatible routes over one bundle.

    POST /v1/chat/completions   messages -> reply (stream: server-sent events, then `data: [DONE]`)
    POST /v1/completions        prompt -> continuation
    POST /v1/embeddings         input -> vectors (an embedding encoder bundle; float or base64)
    POST /v1/classifications    input -> label and every label's probability (a classifier bundle)
    GET  /v1/models             the bundle, its target and precision
    GET  /health                503 {"status": "loading"} until the model is loaded, then 200
    GET  /metrics               Prometheus text

Errors come in OpenAI's shape ({"error": {"message", "type", "param", "code"}}) with the right
status: 400 for a bad body, a prompt longer than the context or a route the bundle cannot serve,
404 for an unknown model, 429 when the queue is full.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import threading
import time
import uuid
from pathlib import Path

from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from edge_slm.core.errors import EdgeSlmError
from edge_slm.core.manifest import DecoderManifest, EncoderManifest
from edge_slm.serve import requests as req
from edge_slm.serve.engine import EncoderEngine, Engine, Job, QueueFull
from edge_slm.serve.metrics import Metrics

# The bundle's manifest type -> the engine that queues its requests; a new family adds its entry.
ENGINES = {DecoderManifest: Engine, EncoderManifest: EncoderEngine}
FINISH = {"eos": "stop", "stop_string": "stop", "max_new_tokens": "length", "context_full": "length"}


class Service:
    """The loaded model (once it is), its engine, and what the routes need to answer."""

    def __init__(self, bundle: Path, threads: int | None, max_queue: int, context: int | None = None):
        self.bundle, self.threads, self.max_queue, self.context = Path(bundle), threads, max_queue, context
        self.model = self.engine = None
        self.load_error: str | None = None
        self.metrics = Metrics()
        self.model_id = self.bundle.resolve().name

    def load(self) -> None:
        from edge_slm import runtime

        try:
            self.model = runtime.load(self.bundle, threads=self.threads, context=self.context)
        except EdgeSlmError as exc:
            self.load_error = str(exc)
            return
        self.model_id = self.model.manifest.target  # what clients send as "model"
        self.engine = ENGINES[type(self.model.manifest)](self.model, self.max_queue, self.metrics)

    @property
    def serves(self) -> str:
        """What the loaded bundle does: "generation", "embedding" or "classification"."""
        return self.model.manifest.task


def create_app(
    bundle: Path,
    threads: int | None = None,
    max_queue: int = 8,
    load_in_background: bool = True,
    context: int | None = None,
):
    service = Service(bundle, threads, max_queue, context)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if load_in_background:  # /health answers "loading" meanwhile
            threading.Thread(target=service.load, daemon=True).start()
        else:
            service.load()
        yield

    async def health_route(request: Request) -> JSONResponse:
        return await health(service)

    async def metrics_route(request: Request) -> Response:
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4")

    async def models_route(request: Request) -> JSONResponse:
        return await models(service)

    async def chat_route(request: Request):
        return await completion(service, request, chat=True)

    async def completions_route(request: Request):
        return await completion(service, request, chat=False)

    async def embeddings_route(request: Request) -> JSONResponse:
        return await encode(service, request, "embedding")

    async def classifications_route(request: Request) -> JSONResponse:
        return await encode(service, request, "classification")

    routes = [
        Route("/v1/embeddings", embeddings_route, methods=["POST"]),
        Route("/v1/classifications", classifications_route, methods=["POST"]),
        Route("/health", health_route, methods=["GET"]),
        Route("/metrics", metrics_route, methods=["GET"]),
        Route("/v1/models", models_route, methods=["GET"]),
        Route("/v1/chat/completions", chat_route, methods=["POST"]),
        Route("/v1/completions", completions_route, methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.service = service
    return app


async def health(service: Service) -> JSONResponse:
    if service.load_error:
        return JSONResponse({"status": "error", "error": service.load_error}, status_code=500)
    if service.engine is None:
        return JSONResponse({"status": "loading"}, status_code=503)
    return JSONResponse({"status": "ok", "model": service.model_id})


async def models(service: Service) -> JSONResponse:
    manifest = service.model.manifest if service.model else None
    entry = {
        "id": service.model_id,
        "object": "model",
        "created": int(service.bundle.stat().st_mtime),
        "owned_by": "edge-slm",
        "target": manifest.target if manifest else None,
        "precision": manifest.precision if manifest else None,
        "family": manifest.family if manifest else None,
        "task": manifest.task if manifest else None,
    }
    return JSONResponse({"object": "list", "data": [entry]})


def _error(service: Service, route: str, exc: req.ApiError) -> JSONResponse:
    service.metrics.requests.labels(route, str(exc.status)).inc()
    return JSONResponse(exc.body(), status_code=exc.status)


async def completion(service: Service, request: Request, chat: bool):
    route = "chat" if chat else "completions"
    try:
        job, sampling = await _job(service, request, chat)
        queue = service.engine.submit(job)
    except req.ApiError as exc:
        return _error(service, route, exc)
    except QueueFull as exc:
        return _error(service, route, req.ApiError(429, str(exc), code="queue_full"))
    service.metrics.requests.labels(route, "200").inc()
    ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    if sampling.stream:
        return EventSourceResponse(_events(service, job, queue, ident, created, chat, sampling), sep="\n")
    pieces = []
    while True:
        kind, value = await queue.get()
        if kind == "piece":
            pieces.append(value)
        elif kind == "error":
            return _error(service, route, req.ApiError(500, f"generation failed: {value}"))
        else:
            break
    result = job.result
    finish = FINISH.get(result.stop_reason, "stop")
    usage = _usage(result)
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": result.text}, "finish_reason": finish}
        body = {"id": ident, "object": "chat.completion", "created": created, "model": service.model_id}
    else:
        choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": finish}
        body = {"id": ident, "object": "text_completion", "created": created, "model": service.model_id}
    return JSONResponse({**body, "choices": [choice], "usage": usage, "timings": _timings(result)})


def _timings(result) -> dict:
    """The server's own view of the request, as llama.cpp's server reports it."""
    return {
        "prompt_n": len(result.prompt_token_ids),
        "prompt_reused": result.reused_tokens,
        "ttft_ms": round(result.ttft_ms, 2),
        "predicted_n": len(result.token_ids),
        "predicted_per_second": round(result.decode_tokens_per_s, 2),
    }


def _usage(result) -> dict:
    prompt, completion_tokens = len(result.prompt_token_ids), len(result.token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens, "total_tokens": prompt + completion_tokens}


ROUTE_OF = {
    "generation": "/v1/chat/completions",
    "embedding": "/v1/embeddings",
    "classification": "/v1/classifications",
}


async def _body(service: Service, request: Request, task: str) -> dict:
    """The request's JSON object, once the model is loaded, named right and able to do `task`."""
    if service.engine is None:
        raise req.ApiError(503, service.load_error or "the model is still loading: retry when /health says ok")
    if service.serves != task:
        raise req.ApiError(
            400,
            f"the bundle {service.model_id!r} serves {service.serves}, not {task}: "
            f"use {ROUTE_OF[service.serves]} (or serve a {task} bundle)",
            code="unsupported_route",
        )
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        raise req.ApiError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise req.ApiError(400, "the request body must be a JSON object")
    if body.get("model") not in (None, service.model_id):
        raise req.ApiError(
            404,
            f"the model {body.get('model')!r} does not exist; this server has {service.model_id!r}",
            "model",
            "model_not_found",
        )
    return body


async def encode(service: Service, request: Request, task: str) -> JSONResponse:
    """/v1/embeddings (OpenAI's shape) and /v1/classifications (the same shape, labels for vectors)."""
    route = "embeddings" if task == "embedding" else "classifications"
    try:
        body = await _body(service, request, task)
        texts = req.inputs(body)
        form = req.encoding_format(body) if task == "embedding" else "float"
        model = service.model
        tokens = sum(model.graph.token_counts(texts))
        call = model.embed if task == "embedding" else model.classify
        started = time.perf_counter()
        try:
            results = await service.engine.run(lambda: call(texts, truncate=False))
        except EdgeSlmError as exc:
            raise req.ApiError(400, str(exc), "input") from None
    except req.ApiError as exc:
        return _error(service, route, exc)
    except QueueFull as exc:
        return _error(service, route, req.ApiError(429, str(exc), code="queue_full"))
    service.metrics.requests.labels(route, "200").inc()
    service.metrics.prompt_tokens.inc(tokens)
    if task == "embedding":
        data = [{"object": "embedding", "index": i, "embedding": _vector(row, form)} for i, row in enumerate(results)]
    else:
        data = [{"object": "classification", "index": i, **r.to_dict()} for i, r in enumerate(results)]
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    timings = {"texts": len(texts), "ms": round(1e3 * (time.perf_counter() - started), 2)}
    return JSONResponse({"object": "list", "data": data, "model": service.model_id, "usage": usage, "timings": timings})


def _vector(row, form: str):
    # OpenAI's base64 form is the float32 little-endian bytes; its Python client asks for it.
    return base64.b64encode(row.astype("<f4").tobytes()).decode() if form == "base64" else row.tolist()


async def _job(service: Service, request: Request, chat: bool):
    body = await _body(service, request, "generation")
    sampling = req.sampling(body)
    model = service.model
    try:
        ids = model.encode_chat(req.messages(body)) if chat else model.encode(req.prompt(body))
    except EdgeSlmError as exc:
        raise req.ApiError(400, str(exc), "messages" if chat else "prompt") from None
    room = model.context_length - len(ids)
    if room < 1:
        raise req.ApiError(
            400,
            f"the prompt has {len(ids)} tokens; the model's context is {model.context_length}: shorten it",
            "messages" if chat else "prompt",
            "context_length_exceeded",
        )
    max_tokens = min(sampling.max_tokens or room, room)
    params = {"temperature": sampling.temperature, "top_p": sampling.top_p, "seed": sampling.seed}
    return Job(ids, max_tokens, sampling.stop, params), sampling


async def _events(service, job: Job, queue: asyncio.Queue, ident: str, created: int, chat: bool, sampling):
    head = {
        "id": ident,
        "created": created,
        "model": service.model_id,
        "object": "chat.completion.chunk" if chat else "text_completion",
    }

    def chunk(text: str | None, finish: str | None, first: bool = False) -> str:
        if chat:
            delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return json.dumps({**head, "choices": [choice]})

    try:
        if chat:
            yield {"data": chunk(None, None, first=True)}
        while True:
            kind, value = await queue.get()
            if kind == "piece":
                yield {"data": chunk(value, None)}
            elif kind == "error":
                yield {"data": json.dumps(req.ApiError(500, f"generation failed: {value}").body())}
                return
            else:
                break
        yield {"data": chunk(None if chat else "", FINISH.get(job.result.stop_reason, "stop"))}
        if sampling.include_usage:
            yield {
                "data": json.dumps(
                    {**head, "choices": [], "usage": _usage(job.result), "timings": _timings(job.result)}
                )
            }
        yield {"data": "[DONE]"}
    finally:
        job.cancelled.set()  # the client left (or the stream ended): free the model
