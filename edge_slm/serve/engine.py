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
from collections import deque
from dataclasses import dataclass, field

from edge_slm.core.errors import EdgeSlmError
from edge_slm.runtime import Generation
from edge_slm.runtime.grammar import Constraint


class QueueFull(EdgeSlmError):
    """More requests are waiting than the server was started to queue."""


class Cancelled(EdgeSlmError):
    """The job was cancelled before it ran: its client left, its time ran out, or the server stops."""


@dataclass(eq=False)  # compared (and hashed) by identity: `Engine.jobs` is keyed by jobs
class Job:
    prompt_ids: list[int]
    max_tokens: int
    stop: tuple[str, ...] = ()
    sampling: dict = field(default_factory=dict)  # the runtime's sampling names, and top_logprobs
    cache_prompt: bool = True  # False: no prefix of an earlier request reused (exactness over speed)
    prompt_text: str = ""  # /v1/completions' prompt, for `echo`
    responses: list = field(default_factory=list)  # the responses as the request's coroutine took them
    result: Generation | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    deadline: float = float("inf")  # time.monotonic() after which it stops (between two tokens)
    owner: str = ""  # who sent it (a hash of its API key): the KV cache is reused only for its owner
    constraint: Constraint | None = None  # the reply's grammar (structured output, tool calls), compiled


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
        reuse = job.cache_prompt and (self.share_prefix_cache or job.owner == self._cache_owner)
        self._cache_owner = job.owner
        try:
            for response in self.model.stream(
                job.prompt_ids,
                max_new_tokens=job.max_tokens,
                stop=job.stop,
                keep_cache=reuse,
                constraint=job.constraint,
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


class BatchEngine:
    """`parallel` requests decoding together (`runtime.batch.BatchDecoder`): one onnxruntime run per
    step for every running request, in one worker thread. A request joins at the next step (its
    prompt run between two steps, a long one in chunks, one per step) when a slot is free, else it waits in the queue; a finished,
    cancelled or timed-out one leaves its slot at once. The same interface as `Engine` (submit,
    cancel, cancel_all; the same messages on the returned queue), and the same per-key rule for
    prefix reuse: a slot's cached prefix serves only its last owner's requests (unless
    `--share-prefix-cache`)."""

    def __init__(self, model, max_queue: int, metrics=None, limits=None, parallel: int = 2):
        from edge_slm.runtime.batch import BatchDecoder

        self.model, self.max_queue, self.metrics = model, max_queue, metrics
        self.share_prefix_cache = bool(limits and limits.share_prefix_cache)
        self.decoder = BatchDecoder(model, parallel)
        self.parallel = parallel
        self.pending = 0  # running and waiting
        self.jobs: set[Job] = set()
        self._waiting: deque[tuple[Job, asyncio.AbstractEventLoop, asyncio.Queue]] = deque()
        self._running: dict[Job, tuple] = {}  # job -> (sequence, loop, queue, started)
        # Re-entrant: `cancel` also runs from the SIGTERM handler, which may interrupt `submit` holding it.
        self._wake = threading.Condition(threading.RLock())
        self._worker: threading.Thread | None = None
        self.slots_busy = None
        if metrics is not None:
            from prometheus_client import Gauge

            self.slots_busy = Gauge("edge_slm_slots_busy", "KV slots decoding a request", registry=metrics.registry)
            Gauge("edge_slm_slots", "KV slots (--parallel)", registry=metrics.registry).set(parallel)

    def text_fit(self) -> tuple[int, int]:
        """Tokens one prompt may have (a slot's), and the longest token in characters."""
        return self.decoder.context, max(map(len, self.model.tokenizer.get_vocab()))

    def submit(self, job: Job) -> asyncio.Queue:
        """As `Engine.submit`: refused now when `parallel` run and `max_queue` wait already."""
        if self.pending >= self.parallel + self.max_queue:
            raise QueueFull(f"the server is busy: {self.max_queue} requests are already waiting; retry later")
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()
        self.pending += 1
        self.jobs.add(job)
        with self._wake:
            self._waiting.append((job, loop, out))
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="edge-slm-batch", daemon=True)
                self._worker.start()
            self._wake.notify()
        self._gauge()
        return out

    def cancel(self, job: Job) -> None:
        """Stop `job`: a waiting one leaves the queue now, a running one its slot before the next step."""
        job.cancelled.set()
        with self._wake:
            for entry in list(self._waiting):
                if entry[0] is job:
                    self._waiting.remove(entry)
                    self._post(entry[1], entry[2], job, ("error", Cancelled("the request was cancelled while queued")))
            self._wake.notify()

    def cancel_all(self) -> None:
        for job in list(self.jobs):
            self.cancel(job)

    # -- the worker thread ------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._wake:
                while not self._waiting and not self._running:
                    self._wake.wait()
                joining = [self._waiting.popleft() for _ in range(min(len(self._waiting), self.decoder.free_slots))]
            for job, loop, out in joining:
                self._admit(job, loop, out)
            self._drop_stopped()
            try:
                responses = self.decoder.step()
            except Exception as exc:  # every running request answers with it; the slots are freed
                for job, (seq, loop, out, _) in list(self._running.items()):
                    self.decoder.release(seq)
                    self._finish(job, loop, out, ("error", exc))
                continue
            by_sequence = {entry[0]: job for job, entry in self._running.items()}
            for seq, response in responses:
                self._deliver(by_sequence[seq], response)
            self._gauge_slots()

    def _admit(self, job: Job, loop, out) -> None:
        from edge_slm.runtime.batch import Sequence

        if job.cancelled.is_set() or time.monotonic() > job.deadline:  # it waited too long, or left
            self._post(
                loop, out, job, ("error", Cancelled("the request was cancelled or ran out of time while queued"))
            )
            return
        job.result = Generation(prompt_token_ids=job.prompt_ids)
        try:
            seq = Sequence(
                job.prompt_ids,
                job.max_tokens,
                job.stop,
                job.sampling,
                owner=job.owner,
                cache_prompt=job.cache_prompt,
                constraint=job.constraint,
            )
            self._running[job] = (seq, loop, out, time.perf_counter())
            response = self.decoder.admit(seq, reuse_any=self.share_prefix_cache)
        except Exception as exc:  # handed to the request's coroutine, which answers with it
            self._running.pop(job, None)
            self._post(loop, out, job, ("error", exc))
            return
        if response is not None:  # else its prompt runs in chunks, at the next steps
            self._deliver(job, response)
        self._gauge_slots()

    def _deliver(self, job: Job, response) -> None:
        seq, loop, out, started = self._running[job]
        job.result.add(response)
        loop.call_soon_threadsafe(out.put_nowait, ("piece", response))
        if response.finish_reason is not None:
            if self.metrics is not None:
                self.metrics.observe(job.result, time.perf_counter() - started)
            self._finish(job, loop, out, ("done", job.result))

    def _drop_stopped(self) -> None:
        """Requests whose client left or whose time ran out leave their slots before the next step;
        the text so far is the answer (as `Engine` does)."""
        now = time.monotonic()
        for job, (seq, loop, out, _) in list(self._running.items()):
            stop = "cancelled" if job.cancelled.is_set() else "time_limit" if now > job.deadline else ""
            if stop:
                self.decoder.release(seq)
                job.result.stop_reason = stop
                self._finish(job, loop, out, ("done", job.result))

    def _finish(self, job: Job, loop, out, message) -> None:
        self._running.pop(job, None)
        self._post(loop, out, job, message)

    def _post(self, loop, out, job: Job, message) -> None:
        loop.call_soon_threadsafe(out.put_nowait, message)
        loop.call_soon_threadsafe(self._done, job)

    def _done(self, job: Job) -> None:  # on the event loop
        if job in self.jobs:
            self.jobs.discard(job)
            self.pending -= 1
            self._gauge()

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(max(0, self.pending - len(self._running)))

    def _gauge_slots(self) -> None:
        if self.slots_busy is not None:
            self.slots_busy.set(self.parallel - self.decoder.free_slots)


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
