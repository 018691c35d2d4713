"""One model, one request at a time, a bounded queue in front of it.

Generation runs in a worker thread (onnxruntime releases the GIL), the model's responses (one per
token: text piece, id, logprob, counters) are handed to the event loop as they come, and a request whose client has gone is cancelled between two tokens so
the model is free for the next one; so is one past its deadline. Requests beyond `max_queue`
waiting are refused at once. Successive requests of the same client (the same API key) share the
KV cache's longest common prefix (the same system prompt and earlier turns are not computed
again); a request of another client starts from an empty cache, so neither its speed nor its
`prompt_reused` tells it anything of another client's prompt (unless the server shares the cache
across clients: `--share-prefix-cache`).
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

from edge_slm.core.errors import EdgeSlmError
from edge_slm.runtime import Generation


class QueueFull(EdgeSlmError):
    """More requests are waiting than the server was started to queue."""


class Cancelled(EdgeSlmError):
    """The job was cancelled before it ran: its client left, its time ran out, or the server stops."""


@dataclass(eq=False)  # compared (and hashed) by identity: `Engine.jobs` is keyed by jobs
class Job:
    prompt_ids: list[int]
    max_tokens: int
    stop: tuple[str, ...] = ()
    sampling: dict = field(default_factory=dict)
    result: Generation | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    deadline: float = float("inf")  # time.monotonic() after which it stops (between two tokens)
    owner: str = ""  # who sent it (a hash of its API key): the KV cache is reused only for its owner


class Engine:
    def __init__(self, model, max_queue: int, metrics=None, limits=None):
        self.model, self.max_queue, self.metrics = model, max_queue, metrics
        self.share_prefix_cache = bool(limits and limits.share_prefix_cache)
        self._lock = asyncio.Lock()
        self.pending = 0  # the running request and those waiting for the model
        self.jobs: dict[Job, asyncio.Task] = {}  # running and waiting
        self._running: Job | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cache_owner: str | None = None  # whose prompt the KV cache holds

    def text_fit(self) -> tuple[int, int]:
        """Tokens one prompt may have, and the longest token in characters (serve.limits.check_texts)."""
        return self.model.context_length, max(map(len, self.model.tokenizer.get_vocab()))

    def submit(self, job: Job) -> asyncio.Queue:
        """Queue `job` now or refuse it now; ("piece", GenerationResponse) per token, then ("done",
        result) or ("error", exc), arrive on the returned queue. Setting `job.cancelled` stops it
        between two tokens."""
        if self.pending > self.max_queue:  # one running plus max_queue waiting
            raise QueueFull(f"the server is busy: {self.max_queue} requests are already waiting; retry later")
        self.pending += 1
        self._gauge()
        out: asyncio.Queue = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self.jobs[job] = self._loop.create_task(self._serve(job, out))
        return out

    def cancel(self, job: Job) -> None:
        """Stop `job`: between two tokens if it runs; at once if it waits, freeing its place in the
        queue (a client that hangs up while queued does not keep others out). Safe from any thread
        and from a signal handler."""
        job.cancelled.set()
        if self._loop is not None and job is not self._running:
            self._loop.call_soon_threadsafe(self._drop_waiting, job)

    def cancel_all(self) -> None:
        """Stop the running job between two tokens and every waiting one (the server is stopping)."""
        for job in list(self.jobs):
            self.cancel(job)

    def _drop_waiting(self, job: Job) -> None:
        task = self.jobs.get(job)
        if task is not None and job is not self._running:  # never a job on the model: it would run on
            task.cancel()

    async def _serve(self, job: Job, out: asyncio.Queue) -> None:
        try:
            async with self._lock:
                if job.cancelled.is_set() or time.monotonic() > job.deadline:  # it waited too long, or left
                    out.put_nowait(("error", Cancelled("the request was cancelled or ran out of time while queued")))
                    return
                loop = asyncio.get_running_loop()
                self._running = job  # no await since the check: a cancel now reaches the model loop
                try:
                    await loop.run_in_executor(None, self._run, job, loop, out)
                finally:
                    self._running = None
        except asyncio.CancelledError:  # dropped while waiting (see `cancel`)
            out.put_nowait(("error", Cancelled("the request was cancelled while queued")))
        finally:
            self.pending -= 1
            self.jobs.pop(job, None)
            self._gauge()

    def _run(self, job: Job, loop, out: asyncio.Queue) -> None:
        job.result = Generation(prompt_token_ids=job.prompt_ids)
        started = time.perf_counter()
        reuse = self.share_prefix_cache or job.owner == self._cache_owner
        self._cache_owner = job.owner
        try:
            for response in self.model.stream(
                job.prompt_ids,
                max_new_tokens=job.max_tokens,
                stop=job.stop,
                keep_cache=reuse,
                **job.sampling,
            ):
                job.result.add(response)
                loop.call_soon_threadsafe(out.put_nowait, ("piece", response))
                stop = (
                    "cancelled" if job.cancelled.is_set() else "time_limit" if time.monotonic() > job.deadline else ""
                )
                if stop:  # the generator is left unfinished: the text so far is the answer
                    job.result.stop_reason = stop
                    break
        except Exception as exc:  # handed to the request's coroutine, which answers with it
            loop.call_soon_threadsafe(out.put_nowait, ("error", exc))
            return
        if self.metrics is not None:
            self.metrics.observe(job.result, time.perf_counter() - started)
        loop.call_soon_threadsafe(out.put_nowait, ("done", job.result))

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(max(0, self.pending - 1))


class EncoderEngine:
    """An encoder behind the same bounded queue: one batch at a time on the model, in a worker
    thread; requests beyond `max_queue` waiting are refused at once."""

    def __init__(self, model, max_queue: int, metrics=None, limits=None):
        self.model, self.max_queue, self.metrics = model, max_queue, metrics
        self._lock = asyncio.Lock()
        self.pending = 0

    def text_fit(self) -> tuple[int, int]:
        """Tokens one text may have, and the longest token in characters (serve.limits.check_texts)."""
        graph = self.model.graph
        return graph.max_length, max(map(len, graph.tokenizer.get_vocab()))

    async def run(self, call, *args):
        if self.pending > self.max_queue:
            raise QueueFull(f"the server is busy: {self.max_queue} requests are already waiting; retry later")
        self.pending += 1
        self._gauge()
        try:
            async with self._lock:  # one batch on the model at a time
                return await asyncio.get_running_loop().run_in_executor(None, call, *args)
        finally:
            self.pending -= 1
            self._gauge()

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(max(0, self.pending - 1))
