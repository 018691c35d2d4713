"""One model, one request at a time, a bounded queue in front of it.

Generation runs in a worker thread (onnxruntime releases the GIL), the model's responses (one per
token: text piece, id, logprob, counters) are handed to the event loop as they come, and a request
whose client has gone is cancelled between two tokens so the model is free for the next one.
Requests beyond `max_queue` waiting are refused at once. Successive requests share the KV cache's
longest common prefix (the same system prompt and earlier turns are not computed again);
everything after it is the request's own.
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


@dataclass
class Job:
    prompt_ids: list[int]
    max_tokens: int
    stop: tuple[str, ...] = ()
    sampling: dict = field(default_factory=dict)
    result: Generation | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)


class Engine:
    def __init__(self, model, max_queue: int, metrics=None):
        self.model, self.max_queue, self.metrics = model, max_queue, metrics
        self._lock = asyncio.Lock()
        self.pending = 0  # the running request and those waiting for the model

    def submit(self, job: Job) -> asyncio.Queue:
        """Queue `job` now or refuse it now; ("piece", GenerationResponse) per token, then ("done",
        result) or ("error", exc), arrive on the returned queue. Setting `job.cancelled` stops it
        between two tokens."""
        if self.pending > self.max_queue:  # one running plus max_queue waiting
            raise QueueFull(f"the server is busy: {self.max_queue} requests are already waiting; retry later")
        self.pending += 1
        self._gauge()
        out: asyncio.Queue = asyncio.Queue()
        asyncio.get_running_loop().create_task(self._serve(job, out))
        return out

    async def _serve(self, job: Job, out: asyncio.Queue) -> None:
        try:
            async with self._lock:
                if job.cancelled.is_set():  # the client left while it waited
                    out.put_nowait(("error", EdgeSlmError("cancelled")))
                    return
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(None, self._run, job, loop, out)
        finally:
            self.pending -= 1
            self._gauge()

    def _run(self, job: Job, loop, out: asyncio.Queue) -> None:
        job.result = Generation(prompt_token_ids=job.prompt_ids)
        started = time.perf_counter()
        try:
            for response in self.model.stream(
                job.prompt_ids,
                max_new_tokens=job.max_tokens,
                stop=job.stop,
                keep_cache=True,
                **job.sampling,
            ):
                job.result.add(response)
                loop.call_soon_threadsafe(out.put_nowait, ("piece", response))
                if job.cancelled.is_set():
                    job.result.stop_reason = "cancelled"
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

    def __init__(self, model, max_queue: int, metrics=None):
        self.model, self.max_queue, self.metrics = model, max_queue, metrics
        self._lock = asyncio.Lock()
        self.pending = 0

    async def run(self, call, *args):
        if self.pending > self.max_queue:
            raise QueueFull(f"the server is busy: {self.max_queue} requests are already waiting; retry later")
        self.pending += 1
        self._gauge()
        try:
            async with self._lock:
                return await asyncio.get_running_loop().run_in_executor(None, call, *args)
        finally:
            self.pending -= 1
            self._gauge()

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(max(0, self.pending - 1))
