"""Several sequences decoding together: one onnxruntime run per step for all of them.

Decoding one token of a small model is bound by reading its weights; reading them once for N
sequences costs little more than for one. `BatchDecoder` keeps `slots` batch rows of one shared KV
buffer ([slots, kv_heads, context, head_dim] per layer, as numpy memory that onnxruntime uses in
place); each sequence owns one row. GroupQueryAttention takes each row's length from its row of the
attention mask (`seqlens_k`) and writes that row's new key at that position, so rows of different
lengths decode in the same run. A sequence joins by a prefill of its prompt into its row, in runs
of its own between two steps (a long prompt in chunks of `prefill_chunk` tokens, one chunk per
step, so that the others' tokens keep coming), and leaves at once; rows above the highest busy one
are not run.

The single-request path (`Model.stream`) is untouched: this class shares its onnxruntime sessions
(the weights are loaded once) and its sampling and text functions, not its cache.
"""

from __future__ import annotations

import mmap
import time
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import _pybind_state as ortc

from edge_slm.core.errors import EdgeSlmError
from edge_slm.runtime.grammar import Constraint, GrammarState
from edge_slm.runtime.model import FINISH_REASON, GenerationResponse, check_top_logprobs
from edge_slm.runtime.sampling import Sampler, SamplingConfig, token_logprobs
from edge_slm.runtime.session import LOGITS_TO_KEEP, _run
from edge_slm.runtime.textstream import TextStream


def kv_bytes(model_manifest, slots: int, context: int, dtype_bytes: int = 4) -> int:
    """Bytes of the KV cache of `slots` sequences of `context` tokens (keys and values, every layer)."""
    m = model_manifest
    return 2 * m.num_layers * m.num_kv_heads * m.head_dim * context * slots * dtype_bytes


def small_page_zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    """A zeroed array in its own anonymous memory map that the kernel backs with 4 kB pages only.
    np.zeros asks for transparent huge pages on arrays of 4 MB or more (madvise), and a KV buffer
    is written a few kB at a time in places 2 MB apart (each slot's row of each head): every first
    write then makes a whole 2 MB page resident, and 4 slots of 1,040 tokens held 320 MB instead of
    their 190 MB. Written with mmap because numpy has no per-array switch (only a process-wide one)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    private = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)  # POSIX: not shared memory
    memory = mmap.mmap(-1, max(nbytes, 1), flags=private) if private else mmap.mmap(-1, max(nbytes, 1))
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # Linux; elsewhere the default pages are small already
        try:
            memory.madvise(mmap.MADV_NOHUGEPAGE)
        except OSError:  # a kernel without transparent huge pages (Raspberry Pi OS's) refuses the advice
            pass
    return np.frombuffer(memory, dtype=dtype, count=int(np.prod(shape))).reshape(shape)


@dataclass(eq=False)
class Sequence:
    """One request in a slot: its prompt, caps, sampler and text, and its running counters."""

    prompt_ids: list[int]
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    sampling: dict = field(default_factory=dict)  # SamplingConfig's names, and top_logprobs
    owner: str = ""  # the key the slot's cached prefix is reused for
    cache_prompt: bool = True  # False: start from an empty slot, no prefix reused
    constraint: Constraint | None = None  # the reply's grammar; its parser is this sequence's own
    slot: int = -1
    length: int = 0  # tokens of this sequence in its slot's cache
    token: int = -1  # the last sampled token, fed at the next step
    count: int = 0
    reused: int = 0
    finished: bool = False
    prefilling: bool = False  # its prompt is still going into the cache, a chunk per step
    started: float = 0.0
    first_at: float = 0.0
    ttft_ms: float = 0.0
    prompt_tps: float = 0.0

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise EdgeSlmError(f"max_new_tokens is {self.max_new_tokens}; generate 1 token or more")
        options = dict(self.sampling)
        self.top_logprobs = options.pop("top_logprobs", 0)
        check_top_logprobs(self.top_logprobs)
        self.sampler = Sampler(SamplingConfig.of(**options))
        self.history = list(self.prompt_ids)
        self.grammar: GrammarState | None = None  # started when the sequence is admitted


class BatchDecoder:
    """`slots` sequences of at most `context` tokens each over a loaded `Model`'s sessions."""

    def __init__(self, model, slots: int, context: int | None = None, prefill_chunk: int = 256):
        session = model.session
        if not session.shared or session.kv_device != "cpu":
            raise EdgeSlmError(
                f"{model.path}: batched decoding needs a fused graph with its KV cache in CPU memory "
                f"(this bundle's is {'on ' + session.kv_device if session.shared else 'not shared'}): "
                "serve it with --parallel 1"
            )
        self.model, self.slots = model, slots
        # A prompt longer than this runs in chunks between decode steps (0: whole, at once), so that
        # the others' tokens keep coming.
        self.prefill_chunk = prefill_chunk
        self.context = context or session.context_length
        if session.rope_switch is not None and self.context > session.rope_switch:
            # The graph picks the long-factor rotary table by the batch's longest row, and a row
            # growing past the switch must be encoded again whole (Session.forward): rows that
            # share a step cannot each follow their own table.
            raise EdgeSlmError(
                f"{model.path}: the rotary table of this longrope model changes past {session.rope_switch} tokens, "
                f"which sequences decoded together cannot follow: serve it with --parallel 1 or --context "
                f"{session.rope_switch}"
            )
        self.session, self.prefill_session = session.session, session.prefill_session
        self.keeps_logits, self.vocab_size = session.keeps_logits, session.vocab_size
        self.past_names, self.present_names = session.past_names, session.present_names
        self.eos_ids = model.eos_ids
        _, heads, _, head_dim = session.kv_shape
        self.kv_dtype = session.kv_dtype
        # Pages become resident only when written: an idle slot costs address space only.
        self.arrays = [small_page_zeros((slots, heads, self.context, head_dim), self.kv_dtype) for _ in self.past_names]
        self.nbytes = sum(a.nbytes for a in self.arrays)
        self._bindings: dict[tuple[int, int, int], object] = {}
        self._row_values: dict[tuple[int, int], list[ort.OrtValue]] = {}
        self._chunk_logits: ort.OrtValue | None = None
        self._step_logits: dict[int, ort.OrtValue] = {}
        self.cached: list[list[int]] = [[] for _ in range(slots)]  # tokens whose keys each slot holds
        self.owners: list[str] = [""] * slots
        self.busy: list[Sequence | None] = [None] * slots

    # -- slots ------------------------------------------------------------------------------------
    @property
    def free_slots(self) -> int:
        return sum(s is None for s in self.busy)

    @property
    def active(self) -> list[Sequence]:
        return [s for s in self.busy if s is not None]

    def _pick_slot(self, seq: Sequence, reuse_any: bool) -> tuple[int, int]:
        """The free slot holding the longest prefix of the prompt cached for this owner (or for anyone
        with `reuse_any`), else the lowest free one. Every step runs the rows up to the highest busy
        slot, so a slot above them is taken only when its cache saves at least a prefill chunk more
        than a slot within them (a reused prefix is paid back once, an extra row at every step of
        the reply), or when the slot within would throw away more than a chunk of another
        conversation's cache and one above throws away less."""
        busy_rows = max((slot + 1 for slot, holder in enumerate(self.busy) if holder is not None), default=0)
        free = [slot for slot, holder in enumerate(self.busy) if holder is None]
        if not free:
            raise EdgeSlmError(f"all {self.slots} slots are busy: wait for one to finish")

        def common(slot: int) -> int:
            if not seq.cache_prompt or not (reuse_any or self.owners[slot] == seq.owner):
                return 0
            count = 0
            for a, b in zip(self.cached[slot], seq.prompt_ids[:-1]):  # the last prompt token always runs
                if a != b:
                    break
                count += 1
            return count

        shared = {slot: common(slot) for slot in free}
        lost = {slot: len(self.cached[slot]) - shared[slot] for slot in free}  # cache the prompt overwrites
        rows = max(busy_rows, free[0] + 1)  # the rows the next steps run anyway
        chunk = max(self.prefill_chunk, 1)
        within = max((slot for slot in free if slot < rows), key=lambda slot: (shared[slot], -lost[slot], -slot))
        above = max(free, key=lambda slot: (shared[slot], -lost[slot], -slot))
        keeps = min(free, key=lambda slot: (lost[slot], -shared[slot], slot))
        if shared[above] - shared[within] >= chunk:
            best = above
        elif lost[within] > chunk and lost[keeps] < lost[within]:
            best = keeps
        else:
            best = within
        return best, shared[best]

    def admit(self, seq: Sequence, reuse_any: bool = False) -> GenerationResponse | None:
        """Put `seq` in a free slot and run its prompt (the part not cached there); returns its first
        token's response (which may already finish it), or None for a prompt longer than
        `prefill_chunk`: it runs a chunk per `step`, and its first token comes from a step."""
        seq.sampler.config.check_vocab(self.vocab_size)
        if len(seq.prompt_ids) >= self.context:
            raise EdgeSlmError(f"the prompt has {len(seq.prompt_ids)} tokens; a slot holds {self.context}: shorten it")
        if seq.constraint is not None and seq.grammar is None:  # a fresh parser: it matches only this reply
            seq.grammar = GrammarState(seq.constraint, self.model.grammar_tokenizer(), self.vocab_size)
        slot, common = self._pick_slot(seq, reuse_any)
        seq.slot, seq.reused, seq.started = slot, common, time.perf_counter()
        self.busy[slot], self.owners[slot] = seq, seq.owner
        self.cached[slot] = list(seq.prompt_ids)
        seq.length = common
        if self.prefill_chunk and len(seq.prompt_ids) - common > self.prefill_chunk:
            seq.prefilling = True
            return None
        try:
            logits = self._prefill(slot, seq.prompt_ids, common, len(seq.prompt_ids))
        except Exception:
            self.release(seq)
            self.cached[slot] = []
            raise
        seq.length = len(seq.prompt_ids)
        return self._emit(seq, logits)

    def release(self, seq: Sequence) -> None:
        """`seq` leaves its slot (finished, cancelled or out of time); the slot's cache stays for reuse."""
        if 0 <= seq.slot < self.slots and self.busy[seq.slot] is seq:
            self.busy[seq.slot] = None
            self.cached[seq.slot] = self.cached[seq.slot][: seq.length]
        seq.finished = True

    # -- model runs -------------------------------------------------------------------------------
    def _rows(self, first: int, rows: int) -> list[ort.OrtValue]:
        """OrtValues over rows [first, first + rows) of every layer's shared buffer (kept alive here:
        onnxruntime reads and writes the numpy memory under them)."""
        key = (first, rows)
        if key not in self._row_values:
            self._row_values[key] = [ort.OrtValue.ortvalue_from_numpy(a[first : first + rows]) for a in self.arrays]
        return self._row_values[key]

    def _binding(self, session, first: int, rows: int):
        """An IO binding whose past and present are rows [first, first + rows) of the shared buffers."""
        key = (id(session), first, rows)
        if key not in self._bindings:
            binding = session.io_binding()
            for past, present, value in zip(self.past_names, self.present_names, self._rows(first, rows)):
                binding.bind_ortvalue_input(past, value)
                binding.bind_ortvalue_output(present, value)
            self._bindings[key] = binding
        return self._bindings[key]

    def _prefill(self, slot: int, ids: list[int], common: int, total: int) -> np.ndarray:
        """Prompt tokens [common, total) into `slot` (the first `common` are cached there); the last
        position's logits."""
        new = np.asarray(ids[common:total], dtype=np.int64)[None, :]
        positions = np.arange(common, total, dtype=np.int64)[None, :]
        mask = np.ones((1, total), dtype=np.int64)
        session = self.prefill_session if new.shape[1] > 1 and self.prefill_session is not None else self.session
        if new.shape[1] > 1 and self.keeps_logits:
            return self._prefill_in_place(session, slot, new, mask, positions, at=common)
        binding = self._binding(session, slot, 1)
        binding.bind_cpu_input("input_ids", new)
        binding.bind_cpu_input("attention_mask", mask)
        binding.bind_cpu_input("position_ids", positions)
        binding.bind_output("logits", "cpu")
        _run(session.run_with_iobinding, binding, at=common)
        logits = next(v for v in binding.get_outputs() if len(v.shape()) == 3).numpy()
        return logits[0, -1].copy()

    def _prefill_in_place(self, session, slot, new, mask, positions, at: int) -> np.ndarray:
        """Several prompt tokens with the LM head on the last position only (`logits_to_keep` 1; on
        all 256 positions of a chunk it is a quarter of the chunk's work and 50 MB of logits), their
        keys and values written by GroupQueryAttention straight into the slot's row: past and
        present are the same row views, as in a decode step, so a chunk copies no cache and its
        working memory is its activations only. IO binding cannot set `logits_to_keep` (an input
        with a default is not in its list of inputs) and `run` allocates every present anew
        (the whole row so far, copied: ~50 MB per chunk at 1,000 tokens, kept by the allocators
        once used), so this goes through onnxruntime's run over OrtValue vectors, which takes
        both feeds by any input name and preallocated outputs (the call its own IO binding and
        ORTModule use)."""
        if self._chunk_logits is None:
            self._chunk_logits = ort.OrtValue.ortvalue_from_shape_and_type(
                (1, 1, self.vocab_size), np.float32, "cpu", 0
            )
        rows = self._rows(slot, 1)
        small = [new, mask, positions, np.array([1], dtype=np.int64)]
        feeds = ortc.OrtValueVector()
        for array in small:
            feeds.push_back(ort.OrtValue.ortvalue_from_numpy(array)._ortvalue)
        fetches = ortc.OrtValueVector()
        fetches.push_back(self._chunk_logits._ortvalue)
        for value in rows:
            feeds.push_back(value._ortvalue)
            fetches.push_back(value._ortvalue)
        feed_names = ["input_ids", "attention_mask", "position_ids", LOGITS_TO_KEEP, *self.past_names]
        cpu = ortc.OrtDevice(ortc.OrtDevice.cpu(), ortc.OrtDevice.default_memory(), 0)
        run = session._sess.run_with_ortvaluevector
        options = ortc.RunOptions()
        _run(run, options, feed_names, feeds, ["logits", *self.present_names], fetches, [cpu] * len(fetches), at=at)
        return self._chunk_logits.numpy()[0, -1].copy()

    def step(self) -> list[tuple[Sequence, GenerationResponse]]:
        """One chunk of the earliest waiting prompt, if any, then one token for every decoding
        sequence in one run; a response per token."""
        out = []
        waiting = [s for s in self.active if s.prefilling]
        if waiting:
            seq = min(waiting, key=lambda s: s.started)
            end = min(seq.length + self.prefill_chunk, len(seq.prompt_ids))
            logits = self._prefill(seq.slot, seq.prompt_ids, seq.length, end)
            seq.length = end
            if end == len(seq.prompt_ids):
                seq.prefilling = False
                out.append((seq, self._emit(seq, logits)))
        active = [s for s in self.active if not s.prefilling]
        if not active:
            return out
        rows = max(s.slot for s in active) + 1
        tokens = np.zeros((rows, 1), dtype=np.int64)
        lengths = np.zeros(rows, dtype=np.int64)
        for slot in range(rows):
            seq = self.busy[slot]
            if seq is not None:
                # A prompt half in: a dummy key lands where its next chunk will write.
                tokens[slot, 0], lengths[slot] = (0, seq.length) if seq.prefilling else (seq.token, seq.length)
            else:
                # An idle row in the batch: its dummy token's key lands just past what the slot
                # holds (kept for prefix reuse), never over it.
                cached = self.cached[slot] = self.cached[slot][: self.context - 1]
                lengths[slot] = len(cached)
        total = int(lengths.max()) + 1
        mask = (np.arange(total)[None, :] <= lengths[:, None]).astype(np.int64)
        binding = self._binding(self.session, 0, rows)
        binding.bind_cpu_input("input_ids", tokens)
        binding.bind_cpu_input("attention_mask", mask)
        binding.bind_cpu_input("position_ids", lengths[:, None].copy())
        if rows not in self._step_logits:  # preallocated, as DecoderSession's one-token logits
            self._step_logits[rows] = ort.OrtValue.ortvalue_from_shape_and_type(
                (rows, 1, self.vocab_size), np.float32, "cpu", 0
            )
        binding.bind_ortvalue_output("logits", self._step_logits[rows])
        _run(self.session.run_with_iobinding, binding, at=int(lengths.max()))
        logits = self._step_logits[rows].numpy()  # read before the next step overwrites it
        for seq in active:
            self.cached[seq.slot].append(seq.token)
            seq.length += 1
            out.append((seq, self._emit(seq, logits[seq.slot, -1])))
        return out

    # -- one token's bookkeeping, as Model.stream does it ----------------------------------------
    def _emit(self, seq: Sequence, logits: np.ndarray) -> GenerationResponse:
        token = seq.sampler(logits, seq.history, seq.grammar.allowed() if seq.grammar else None)
        now = time.perf_counter()
        if seq.count == 0 and not seq.first_at:
            seq.first_at, seq.ttft_ms = now, (now - seq.started) * 1e3
            seq.prompt_tps = (len(seq.prompt_ids) - seq.reused) / max(now - seq.started, 1e-9)
            seq.text = TextStream(self.model.tokenizer, seq.stop)
        if token in self.eos_ids:
            reason, piece = "eos", ""
        else:
            seq.history.append(token)
            seq.count += 1
            piece = seq.text.push(token)
            if seq.grammar:
                seq.grammar.advance(token)
            if seq.text.stopped:
                reason = "stop_string"
            elif seq.grammar and seq.grammar.complete:
                reason = "grammar"
            elif seq.count == seq.max_new_tokens:
                reason = "max_new_tokens"
            elif seq.length >= self.context:
                reason = "context_full"
            else:
                reason = None
        if reason is not None:
            piece += seq.text.flush()
        seq.token = token
        logprob, likeliest = token_logprobs(logits, token, seq.top_logprobs)
        response = GenerationResponse(
            text=piece,
            token=token,
            logprob=logprob,
            finish_reason=FINISH_REASON.get(reason),
            stop_reason=reason,
            prompt_tokens=len(seq.prompt_ids),
            reused_tokens=seq.reused,
            generation_tokens=seq.count,
            ttft_ms=seq.ttft_ms,
            prompt_tps=seq.prompt_tps,
            generation_tps=(seq.count - 1) / (now - seq.first_at) if seq.count > 1 else 0.0,
            top_logprobs=likeliest,
        )
        if reason is not None:
            self.release(seq)
        return response
