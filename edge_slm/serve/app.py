"""The OpenAI-compatible routes over one bundle.

    POST /v1/chat/completions   messages -> reply (stream: server-sent events, then `data: [DONE]`)
    POST /v1/completions        prompt -> continuation
    POST /v1/embeddings         input -> vectors (an embedding encoder bundle; float or base64)
    POST /v1/classifications    input -> label and every label's probability (a classifier bundle)
    POST /v1/translations       input (+ beams, target_lang) -> translations (a seq2seq bundle)
    POST /tokenize, /detokenize llama-server's: {"content"} -> {"tokens"}, {"tokens"} -> {"content"}
                                (and /v1/chat/completions: its last user message translated, translation_chat.py)
    POST /v1/answers            question (+ k) -> answer and sources (with --index: serve/answers.py)
    GET  /v1/models             the bundle, its target and precision
    GET  /health                503 {"status": "loading"} until the model is loaded, then 200
    GET  /metrics               Prometheus text

Errors come in OpenAI's shape ({"error": {"message", "type", "param", "code"}}) with the right
status: 400 for a bad body or a field of OpenAI's API the server does not implement (serve.fields),
401 without the --api-key, a prompt longer than the context or a route the bundle cannot serve,
404 for an unknown model or route, 405 for a wrong method, 413 for a body over the limit, 415 for
a body that is not application/json, 429 when the queue is full, 503 while loading or stopping.
Every body is checked against `Limits` (limits.py) before anything is tokenized; tokenization and
the chat template run in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from edge_slm.core.errors import EdgeSlmError
from edge_slm.core.manifest import DecoderManifest, EncoderManifest, Seq2SeqManifest
from edge_slm.serve import requests as req
from edge_slm.serve import tools
from edge_slm.serve.access import Access, middleware
from edge_slm.serve.engine import BatchEngine, Cancelled, EncoderEngine, Engine, Job, QueueFull
from edge_slm.serve.fields import refuse_unimplemented
from edge_slm.serve.limits import Limits, check_texts, read_json
from edge_slm.serve.logprobs import openai_logprobs
from edge_slm.serve.metrics import Metrics
from edge_slm.serve.translation_chat import chat_translation
from edge_slm.serve.watch import BundleWatch

log = logging.getLogger("edge_slm.serve")


class TranslationEngine(EncoderEngine):
    """A translator behind the encoder's bounded queue: one batch on the model at a time."""

    def text_fit(self) -> tuple[int, int]:
        # A text longer than the model's positions is translated sentence by sentence: up to 16 times.
        return 16 * self.model.max_source_tokens, max(map(len, self.model.source.get_vocab()))


# The bundle's manifest type -> the engine that queues its requests; a new family adds its entry.
ENGINES = {DecoderManifest: Engine, EncoderManifest: EncoderEngine, Seq2SeqManifest: TranslationEngine}


class Service:
    """The loaded model (once it is), its engine, and what the routes need to answer."""

    def __init__(
        self,
        bundle: Path,
        threads: int | None,
        max_queue: int,
        context: int | None = None,
        limits: Limits | None = None,
        on_fatal: Callable[[str], None] | None = None,
        parallel: int = 1,
        access: Access | None = None,
    ):
        self.access = access or Access()
        self.token_pieces: list[bytes] | None = None  # each token's bytes, for logprobs (built on first use)
        self.parallel = parallel  # requests decoding together (BatchEngine) when above 1
        self.bundle, self.threads, self.max_queue, self.context = Path(bundle), threads, max_queue, context
        self.limits, self.on_fatal = limits or Limits(), on_fatal
        self.model = self.engine = None
        self.load_error: str | None = None
        self.fit: tuple[int, int] | None = None
        self.stopping = False
        self.metrics = Metrics()
        self.model_id = self.access.aliases[0] if self.access.aliases else _target_or_folder(self.bundle)
        self.watch = BundleWatch(self.bundle)
        # Tokenization and chat templates, off the event loop; one at a time (the tokenizer's
        # special-token switch is per tokenizer, not per call).
        self.text_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-slm-text")

    def load(self) -> None:
        from edge_slm import runtime

        self.watch.snapshot()  # before the checksums are verified: any later change is seen
        try:
            self.model = runtime.load(self.bundle, threads=self.threads, context=self.context)
        except EdgeSlmError as exc:  # e.g. changed since `serve` checked it: logged, and the process exits
            self.fail(str(exc))
            return
        self.model_id = self.access.aliases[0] if self.access.aliases else self.model.manifest.target
        self.limits = self.limits.resolved(self.model.manifest.profile.runtime)
        engine = self._engine()
        self.fit = engine.text_fit()  # what check_texts needs
        self.engine = engine  # last: requests are taken from here on

    def _engine(self):
        kind = ENGINES[type(self.model.manifest)]
        if kind is Engine and self.parallel > 1:
            try:
                return BatchEngine(self.model, self.max_queue, self.metrics, self.limits, parallel=self.parallel)
            except EdgeSlmError as exc:  # a GPU cache or a generic graph: one request at a time
                log.warning("%s; serving one request at a time", exc)
        return kind(self.model, self.max_queue, self.metrics, self.limits)

    async def on_text_worker(self, call, *args):
        return await asyncio.get_running_loop().run_in_executor(self.text_worker, call, *args)

    def stop(self) -> None:
        """The server is stopping (SIGTERM): cancel the running and the waiting jobs, refuse new ones."""
        self.stopping = True
        if isinstance(self.engine, (Engine, BatchEngine)):
            self.engine.cancel_all()

    def fail(self, message: str) -> None:
        """The bundle no longer passes its checks: one line logged, jobs cancelled, /health 500, and
        the process told to exit non-zero (so that systemd restarts it on a bundle that loads)."""
        log.error("%s", message)
        self.load_error = message
        self.stop()
        if self.on_fatal is not None:
            self.on_fatal(message)

    async def watch_bundle(self, every: float) -> None:
        """A stat of the bundle's files every `every` seconds; a change re-verifies every sha256."""
        while self.load_error is None:
            await asyncio.sleep(every)
            if self.model is None or not self.watch.changed():
                continue
            problem = await self.on_text_worker(self.watch.verify)
            if problem:
                self.fail(f"the bundle changed on disk after start-up and fails its checks: {problem}")
                return

    @property
    def serves(self) -> str:
        """What the loaded bundle does: "generation", "embedding" or "classification"."""
        return self.model.manifest.task

    def accepts_model(self, name) -> bool:
        """Whether a request may name this model: any name with --accept-any-model, else an --alias
        (or the bundle's target without one); leaving it out is fine."""
        if name is None or self.access.accept_any_model:
            return True
        return name in (self.access.aliases or (self.model_id,))

    def pieces(self) -> list[bytes]:
        """Each token id's bytes (logprobs report them); the first call reads the whole vocabulary."""
        if self.token_pieces is None:
            from edge_slm.runtime.grammar import token_bytes

            self.token_pieces = token_bytes(self.model.tokenizer, self.model.session.vocab_size)[0]
        return self.token_pieces


def create_app(
    bundle: Path,
    threads: int | None = None,
    max_queue: int = 8,
    load_in_background: bool = True,
    context: int | None = None,
    limits: Limits | None = None,
    on_fatal: Callable[[str], None] | None = None,
    watch_seconds: float = 2.0,
    parallel: int = 1,
    access: Access | None = None,
    index: Path | None = None,
    index_embedder: Path | None = None,
):
    service = Service(bundle, threads, max_queue, context, limits, on_fatal, parallel, access)
    answers = None
    if index is not None:
        from edge_slm.serve.answers import Answers

        answers = Answers(service, index, index_embedder)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if load_in_background:  # /health answers "loading" meanwhile
            threading.Thread(target=service.load, daemon=True).start()
        else:
            service.load()
        watcher = asyncio.get_running_loop().create_task(service.watch_bundle(watch_seconds))
        yield
        watcher.cancel()
        service.stop()
        service.text_worker.shutdown(wait=False, cancel_futures=True)

    async def health_route(request: Request) -> JSONResponse:
        if answers is not None and answers.loading:
            return JSONResponse({"status": "loading"}, status_code=503)
        return await health(service)

    async def metrics_route(request: Request) -> Response:
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4")

    async def models_route(request: Request) -> JSONResponse:
        return await models(service)

    async def chat_route(request: Request):
        if service.model is not None and service.serves == "translation":  # the last user message, translated
            return await chat_translation(service, request, _body, _error)
        return await completion(service, request, chat=True, answers=answers)

    async def completions_route(request: Request):
        return await completion(service, request, chat=False, answers=answers)

    async def embeddings_route(request: Request) -> JSONResponse:
        return await encode(service, request, "embedding")

    async def classifications_route(request: Request) -> JSONResponse:
        return await encode(service, request, "classification")

    async def translations_route(request: Request) -> JSONResponse:
        return await translations(service, request)

    async def tokenize_route(request: Request) -> JSONResponse:
        return await tokenize(service, request)

    async def detokenize_route(request: Request) -> JSONResponse:
        return await detokenize(service, request)

    routes = [
        Route("/v1/embeddings", embeddings_route, methods=["POST"]),
        Route("/v1/translations", translations_route, methods=["POST"]),
        Route("/v1/classifications", classifications_route, methods=["POST"]),
        Route("/health", health_route, methods=["GET"]),
        Route("/metrics", metrics_route, methods=["GET"]),
        Route("/v1/models", models_route, methods=["GET"]),
        Route("/v1/chat/completions", chat_route, methods=["POST"]),
        Route("/v1/completions", completions_route, methods=["POST"]),
        Route("/tokenize", tokenize_route, methods=["POST"]),
        Route("/detokenize", detokenize_route, methods=["POST"]),
        *([Route("/v1/answers", answers.route, methods=["POST"])] if answers else []),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=middleware(service.access),
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
    )
    app.state.service = service
    return app


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own refusals (unknown route, wrong method) in OpenAI's shape."""
    if exc.status_code == 404:
        message = f"there is no route {request.url.path!r}: see GET /v1/models, POST /v1/chat/completions"
    elif exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        message = f"{request.method} is not allowed on {request.url.path}; use {allowed or 'another method'}"
    else:
        message = str(exc.detail)
    code = {404: "unknown_route", 405: "method_not_allowed"}.get(exc.status_code)
    return JSONResponse(req.ApiError(exc.status_code, message, code=code).body(), exc.status_code, exc.headers)


async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("%s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
    return JSONResponse(req.ApiError(500, f"internal error: {type(exc).__name__}").body(), 500)


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


def _target_or_folder(bundle: Path) -> str:
    """The name the server answers to from its first request: the manifest's target, which the
    loaded model reports too (a client that lists /v1/models while the model loads must get the
    name its requests will be accepted under); the folder's name when the manifest is unreadable
    (loading then fails and says why)."""
    from edge_slm.core.bundle import read_manifest

    try:
        return read_manifest(bundle).target
    except EdgeSlmError:
        return bundle.resolve().name


def _error(service: Service, route: str, exc: req.ApiError) -> JSONResponse:
    service.metrics.requests.labels(route, str(exc.status)).inc()
    return JSONResponse(exc.body(), status_code=exc.status)


async def completion(service: Service, request: Request, chat: bool, answers=None):
    """`answers` (serve/answers.py, with --index) puts passages into a chat request that asks for them."""
    route = "chat" if chat else "completions"
    try:
        job, sampling, form, sources = await _job(service, request, chat, answers)
        queue = service.engine.submit(job) if job is not None else None
    except req.ApiError as exc:
        return _error(service, route, exc)
    except QueueFull as exc:
        return _error(service, route, req.ApiError(429, str(exc), code="queue_full"))
    service.metrics.requests.labels(route, "200").inc()
    ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    if job is None:  # retrieval found nothing relevant
        from edge_slm.serve.answers import nothing_relevant

        return nothing_relevant(service.model_id, ident, created, sampling.stream, sampling.include_usage)
    extra = {} if sources is None else {"sources": [s.to_dict() for s in sources]}
    if sampling.stream:
        events = _events(service, job, queue, ident, created, chat, sampling, form, extra)
        return EventSourceResponse(events, sep="\n")
    # As a stream's end does: a client that hangs up cancels its job, so the model moves on.
    watcher = asyncio.get_running_loop().create_task(_cancel_on_disconnect(request, service.engine, job))
    try:
        while True:
            kind, value = await queue.get()
            if kind == "error":
                return _error(service, route, _failure(service, value))
            if kind == "done":
                break
            job.responses.append(value)
    finally:
        watcher.cancel()
        service.engine.cancel(job)  # a no-op once done; frees the model if this coroutine is cancelled
    result = job.result
    if result.stop_reason == "cancelled":
        return _error(service, route, _failure(service, Cancelled("cancelled")))
    finish = result.finish_reason
    usage = _usage(result)
    logprobs = None
    if sampling.logprobs is not None:
        pieces = await service.on_text_worker(service.pieces)
        logprobs = openai_logprobs(pieces, [r for r in job.responses if r.stop_reason != "eos"], chat)
    if chat:
        message = {"role": "assistant", "content": result.text}
        if form.calls:
            message["content"], calls = tools.read_reply(result.text)
            if calls:
                message["tool_calls"] = calls
                finish = "tool_calls" if finish == "stop" else finish
        choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish}
        body = {"id": ident, "object": "chat.completion", "created": created, "model": service.model_id, **extra}
    else:
        text = (job.prompt_text if sampling.echo else "") + result.text
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}
        body = {"id": ident, "object": "text_completion", "created": created, "model": service.model_id}
    return JSONResponse({**body, "choices": [choice], "usage": usage, "timings": _timings(result)})


async def _cancel_on_disconnect(request: Request, engine: Engine, job: Job) -> None:
    """Once the body is read, the next ASGI message is the client's hang-up (uvicorn sends it when
    the connection closes)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    engine.cancel(job)


def _failure(service: Service, exc: Exception) -> req.ApiError:
    if isinstance(exc, Cancelled) and service.stopping:
        return req.ApiError(503, "the server is stopping; retry with another instance", code="server_stopping")
    if isinstance(exc, Cancelled):
        return req.ApiError(503, "the request ran out of time waiting for the model; retry later", code="timeout")
    return req.ApiError(500, f"generation failed: {exc}")


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
    "translation": "/v1/translations",
}


async def _body(service: Service, request: Request, task: str) -> dict:
    """The request's JSON object, once the model is loaded, named right and able to do `task`."""
    if service.engine is None or service.load_error or service.stopping:
        raise req.ApiError(
            503,
            service.load_error
            or (
                "the server is stopping"
                if service.stopping
                else "the model is still loading: retry when /health says ok"
            ),
        )
    if service.serves != task:
        raise req.ApiError(
            400,
            f"the bundle {service.model_id!r} serves {service.serves}, not {task}: "
            f"use {ROUTE_OF[service.serves]} (or serve a {task} bundle)",
            code="unsupported_route",
        )
    body = await read_json(request, service.limits)
    check_texts(body, service.limits, service.fit)
    if not service.accepts_model(body.get("model")):
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
        tokens = sum(await service.on_text_worker(model.graph.token_counts, texts))
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


async def translations(service: Service, request: Request) -> JSONResponse:
    """/v1/translations: {"input": str | [str], "beams"?, "max_tokens"?, "target_lang"?} ->
    {"data": [{"index", "translation"}]}; a bad beam count, language or text is a 400."""
    route = "translations"
    try:
        body = await _body(service, request, "translation")
        texts = req.inputs(body)
        model = service.model
        beams = body.get("beams", 1)
        max_tokens, target_lang = body.get("max_tokens"), body.get("target_lang")
        started = time.perf_counter()
        try:
            results = await service.engine.run(lambda: model.translate(texts, max_tokens, beams, target_lang))
        except EdgeSlmError as exc:
            raise req.ApiError(400, str(exc), "input") from None
    except req.ApiError as exc:
        return _error(service, route, exc)
    except QueueFull as exc:
        return _error(service, route, req.ApiError(429, str(exc), code="queue_full"))
    service.metrics.requests.labels(route, "200").inc()
    data = [{"object": "translation", "index": i, "translation": t} for i, t in enumerate(results)]
    timings = {"texts": len(texts), "ms": round(1e3 * (time.perf_counter() - started), 2)}
    return JSONResponse({"object": "list", "data": data, "model": service.model_id, "timings": timings})


async def tokenize(service: Service, request: Request) -> JSONResponse:
    """llama-server's /tokenize: {"content", "add_special"?, "with_pieces"?} -> {"tokens": [...]}
    (with_pieces: [{"id", "piece"}])."""
    try:
        body = await _body(service, request, "generation")
        content = body.get("content")
        if not isinstance(content, str):
            raise req.ApiError(400, "'content' must be a string", "content")
        check_texts({"prompt": content}, service.limits, service.fit)
        flags = {name: body.get(name, False) for name in ("add_special", "with_pieces")}
        for name, value in flags.items():
            if not isinstance(value, bool):
                raise req.ApiError(400, f"'{name}' must be true or false, got {value!r}", name)
        tokenizer = service.model.tokenizer
        try:
            encoding = await service.on_text_worker(
                lambda: tokenizer.encode(content, add_special_tokens=flags["add_special"])
            )
        except Exception as exc:  # lone surrogates and the like
            raise req.ApiError(400, f"'content' cannot be tokenized: {exc}", "content") from None
    except req.ApiError as exc:
        return _error(service, "tokenize", exc)
    service.metrics.requests.labels("tokenize", "200").inc()
    if flags["with_pieces"]:
        pieces = await service.on_text_worker(service.pieces)
        tokens = [{"id": i, "piece": pieces[i].decode("utf-8", "replace")} for i in encoding.ids]
        return JSONResponse({"tokens": tokens})
    return JSONResponse({"tokens": encoding.ids})


async def detokenize(service: Service, request: Request) -> JSONResponse:
    """llama-server's /detokenize: {"tokens": [ids]} -> {"content": text} (control tokens written out)."""
    try:
        body = await _body(service, request, "generation")
        tokens = body.get("tokens")
        vocab = service.model.session.vocab_size
        if not isinstance(tokens, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in tokens
        ):
            raise req.ApiError(400, f"'tokens' must be a list of token ids (0 to {vocab - 1})", "tokens")
        if len(tokens) > service.model.context_length * 4:
            raise req.ApiError(400, f"'tokens' has {len(tokens)} ids; send at most {service.model.context_length * 4}")
        content = await service.on_text_worker(
            lambda: service.model.tokenizer.decode(tokens, skip_special_tokens=False)
        )
    except req.ApiError as exc:
        return _error(service, "detokenize", exc)
    service.metrics.requests.labels("detokenize", "200").inc()
    return JSONResponse({"content": content})


def _vector(row, form: str):
    # OpenAI's base64 form is the float32 little-endian bytes; its Python client asks for it.
    return base64.b64encode(row.astype("<f4").tobytes()).decode() if form == "base64" else row.tolist()


async def _job(service: Service, request: Request, chat: bool, answers=None):
    """The job, its sampling, and the passages put into its prompt (None: not asked; the job is None
    when none was relevant)."""
    body = await _body(service, request, "generation")
    refuse_unimplemented(body, chat)
    model = service.model
    sampling = req.sampling(body, chat, model.manifest.sampling_defaults, model.session.vocab_size)
    extra = req.chat_template_kwargs(body) if chat else {}
    prompt = None if chat else req.prompt(body)
    form = await service.on_text_worker(tools.structure, body, chat)  # a grammar compiles in 2-15 ms, then is kept
    from edge_slm.serve.answers import retrieval_k

    k, sources = retrieval_k(body, answers, chat), None  # None/false: not asked; 0, "" etc. a 400
    try:
        if chat:
            template = model.generation.get("chat_template") or ""
            specials = list(model.generation.get("special_tokens", {}))

            async def encode(messages):
                messages, variables = await service.on_text_worker(
                    tools.prompt_messages, messages, form, template, specials
                )
                return await service.on_text_worker(model.encode_chat, messages, True, extra, variables.get("tools"))

            if k is not None:
                ids, sources = await answers.ground(req.messages(body), k, sampling.max_tokens, encode)
                # A schema or a forced call is still honoured when nothing is relevant: generated ungrounded.
                forced = form.constraint is not None and not (form.calls and body.get("tool_choice") in (None, "auto"))
                if ids is None and not forced:
                    return None, sampling, form, sources
                if ids is None:
                    ids = await encode(req.messages(body))
            else:
                ids = await encode(req.messages(body))
        else:
            ids = await service.on_text_worker(model.encode, prompt)
        if form.constraint is not None:  # llguidance's view of the tokenizer: built once, ~1 s
            await service.on_text_worker(model.grammar_tokenizer)
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
    limits = service.limits
    max_tokens = min(sampling.max_tokens or room, room, limits.max_tokens)
    params = dict(sampling.params)
    if sampling.logprobs is not None:
        params["top_logprobs"] = sampling.logprobs
    deadline = time.monotonic() + limits.request_seconds
    if form.calls and sampling.logprobs is not None and sampling.stream:
        raise req.ApiError(
            400,
            "'logprobs' with 'tools' in a stream is not implemented; ask without stream or without logprobs",
            "logprobs",
        )
    job = Job(
        ids, max_tokens, sampling.stop, params, deadline=deadline, owner=_client(request), constraint=form.constraint
    )
    job.cache_prompt, job.prompt_text = sampling.cache_prompt, prompt or ""
    return job, sampling, form, sources


def _client(request: Request) -> str:
    """Who sent the request, for the KV cache's reuse: its API key (hashed: never kept), or no key."""
    return hashlib.sha256(request.headers.get("authorization", "").encode("utf-8", "replace")).hexdigest()


async def _events(service, job: Job, queue: asyncio.Queue, ident: str, created: int, chat: bool, sampling, form, extra):
    """The stream's chunks; `extra` (the retrieved `sources`) rides on the first."""
    head = {
        "id": ident,
        "created": created,
        "model": service.model_id,
        "object": "chat.completion.chunk" if chat else "text_completion",
    }

    pieces = await service.on_text_worker(service.pieces) if sampling.logprobs is not None else None
    offset = [0]  # the completions route's text_offset: characters of the reply streamed so far

    def chunk(
        text: str | None, finish: str | None, first: bool = False, response=None, calls: list | None = None
    ) -> str:
        logprobs = None
        if response is not None and pieces is not None and response.stop_reason != "eos":
            logprobs = openai_logprobs(pieces, [response], chat, offset[0])
            offset[0] += 0 if chat else sum(len(token) for token in logprobs["tokens"])
        if chat:
            delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text is not None else {})
            delta |= {"tool_calls": calls} if calls else {}
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
        return json.dumps({**head, **(extra if first else {}), "choices": [choice]})

    calls = tools.ToolCallStream() if form.calls else None
    try:
        if chat:
            yield {"data": chunk(None, None, first=True)}
        elif sampling.echo:
            yield {"data": chunk(job.prompt_text, None)}
        while True:
            kind, value = await queue.get()
            if kind == "piece":
                if calls is not None:
                    for data in _call_chunks(calls, calls.push(value.text), chunk):
                        yield {"data": data}
                # With logprobs, one chunk per token (its text may be held back: ""), as OpenAI streams them.
                elif value.text or (pieces is not None and value.stop_reason != "eos"):
                    yield {"data": chunk(value.text, None, response=value)}
            elif kind == "error":
                yield {"data": json.dumps(req.ApiError(500, f"generation failed: {value}").body())}
                return
            else:
                break
        finish = job.result.finish_reason
        if calls is not None:
            for data in _call_chunks(calls, calls.finish(), chunk):
                yield {"data": data}
            finish = "tool_calls" if calls.index >= 0 and finish == "stop" else finish
        yield {"data": chunk(None if chat else "", finish)}
        if sampling.include_usage:
            yield {
                "data": json.dumps(
                    {**head, "choices": [], "usage": _usage(job.result), "timings": _timings(job.result)}
                )
            }
        yield {"data": "[DONE]"}
    finally:
        service.engine.cancel(job)  # the client left (or the stream ended): free the model


def _call_chunks(calls: tools.ToolCallStream, events: list[tuple], chunk) -> list[str]:
    """Chunks of a reply read as tool calls, as OpenAI streams them: text as `content`; a call's
    index, id, type and name in its first `tool_calls` delta, then its arguments in pieces."""
    out = []
    for event in events:
        if event[0] == "content":
            out.append(chunk(event[1], None))
        elif event[0] == "call":
            _, index, ident, name = event
            call = {"index": index, "id": ident, "type": "function", "function": {"name": name, "arguments": ""}}
            out.append(chunk(None, None, calls=[call]))
        else:
            out.append(chunk(None, None, calls=[{"index": event[1], "function": {"arguments": event[2]}}]))
    return out
