"""Continuous batching (`edge-slm serve --parallel N`): the runtime's `BatchDecoder` against the
one-request path token for token, and a real uvicorn server with the `openai` client: concurrent
streams, joins mid-stream, a client that hangs up, the KV budget refusal."""

import asyncio
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import start_server
from openai import OpenAI

from edge_slm import runtime
from edge_slm.runtime.batch import BatchDecoder, Sequence, small_page_zeros

PROMPTS = ["What is the capital of France?", "Name a small device.", "Why quantize weights?", "Count to three.", "hi"]


@pytest.fixture(scope="module")
def model(tiny_bundle):
    return runtime.load(tiny_bundle, threads=1)


def _solo(model, ids, n, **kw):
    return model.generate(ids, max_new_tokens=n, **kw).token_ids


def _drain(decoder, seqs, out, joins=None):
    """Step until every sequence is done; `joins` {step: sequence} admits newcomers mid-stream."""
    joins, step = dict(joins or {}), 0
    while decoder.active or joins:
        if joins and min(joins) <= step and decoder.free_slots:  # at its step, or once a slot is free
            seq = joins.pop(min(joins))
            first = decoder.admit(seq)
            out.setdefault(id(seq), []).extend([first] if first else [])
        for seq, response in decoder.step():
            out.setdefault(id(seq), []).append(response)
        step += 1


@pytest.mark.parametrize("chunk", [0, 5])
def test_batched_greedy_equals_solo_with_a_join_mid_stream(model, chunk):
    """Five requests through four slots, two joining mid-stream; prompts whole (chunk 0) or in
    chunks of 5 tokens between decode steps: each answer token for token its solo answer."""
    decoder = BatchDecoder(model, slots=4, prefill_chunk=chunk)
    ids = [model.encode(p) for p in PROMPTS]
    lengths = [20, 7, 30, 12, 25]
    seqs = [Sequence(i, n) for i, n in zip(ids, lengths)]
    out = {}
    for seq in seqs[:3]:
        first = decoder.admit(seq)
        out[id(seq)] = [first] if first else []
    assert all(len(i) > 5 for i in ids[:3]) and (chunk == 0) == all(out[id(seq)] for seq in seqs[:3])
    _drain(decoder, seqs, out, joins={3: seqs[3], 9: seqs[4]})
    for seq, prompt_ids, n in zip(seqs, ids, lengths):
        tokens = [r.token for r in out[id(seq)] if r.stop_reason != "eos"]
        assert tokens == _solo(model, prompt_ids, n), seq.slot
        assert out[id(seq)][-1].finish_reason in ("stop", "length")
    assert decoder.free_slots == 4


def test_chunks_write_the_slot_in_place_with_the_lm_head_on_their_last_position(model):
    """A chunked prompt's runs read and write the slot's row of the shared buffer (no present
    arrays): the row holds exactly the keys the single-request path computes for the prompt, the
    other slots stay zero, and the chunk's logits are the last position's."""
    decoder = BatchDecoder(model, slots=3, prefill_chunk=4)
    assert model.session.keeps_logits  # else chunks take the all-logits path, not the one tested
    ids = model.encode(PROMPTS[2])
    seq = Sequence(ids, 1)
    assert decoder.admit(seq) is None and seq.slot == 0
    while seq.prefilling:
        decoder.step()
    single = model.session
    single.reset()
    expected_logits = single.forward(ids)
    for batch_array, single_array in zip(decoder.arrays, single._arrays):
        np.testing.assert_allclose(batch_array[0, :, : len(ids)], single_array[0, :, : len(ids)], atol=1e-5)
        assert not batch_array[1:].any()
    assert seq.history[len(ids)] == int(np.argmax(expected_logits))


def test_the_kv_buffer_is_backed_by_small_pages():
    """One write every 2 MB into a 64 MB KV-sized buffer makes a few kB resident each, not a 2 MB
    transparent huge page each (np.zeros asks for those on big arrays)."""
    if not Path("/proc/self/status").is_file():
        pytest.skip("reads the resident size from /proc")

    def rss_kb():
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmRSS:"))
        return int(line.split()[1])

    array = small_page_zeros((32, 2**19), np.float32)  # 32 rows of 2 MB
    before = rss_kb()
    array[:, 0] = 1.0
    assert rss_kb() - before < 8 * 1024, "32 writes 2 MB apart made more than 8 MB resident"
    assert array.sum() == 32 and array.flags.writeable


@pytest.mark.parametrize("chunk", [0, 4])
def test_a_prompt_continuing_a_slots_cache_answers_as_alone(model, chunk):
    """A follow-up whose prompt extends what a slot holds runs only its new tokens (several: the
    LM head on the last one only, the slot's past copied in), whole or in chunks, and answers
    token for token as the whole prompt run alone."""
    decoder = BatchDecoder(model, slots=2, prefill_chunk=chunk)
    first_ids = model.encode(PROMPTS[0])
    first = Sequence(first_ids, 6)
    out = {id(first): [r for r in [decoder.admit(first)] if r]}
    _drain(decoder, [first], out)
    follow_ids = first_ids + [r.token for r in out[id(first)]][:5] + model.encode(PROMPTS[2])
    follow = Sequence(follow_ids, 12)
    out[id(follow)] = [r for r in [decoder.admit(follow)] if r]
    assert follow.slot == first.slot and follow.reused == len(first_ids) + 5
    assert len(follow_ids) - follow.reused > 4
    _drain(decoder, [follow], out)
    assert [r.token for r in out[id(follow)] if r.stop_reason != "eos"] == _solo(model, follow_ids, 12)
    assert out[id(follow)][-1].reused_tokens == follow.reused


def test_a_slot_above_the_running_rows_is_taken_only_for_a_prefix_worth_a_chunk(model):
    """Every step runs the rows up to the highest busy slot: a lone request whose short prefix is
    cached in slot 2 takes slot 0 (a batch of one at every step), and one whose cached prefix
    there saves more than a prefill chunk continues from it."""
    decoder = BatchDecoder(model, slots=3, prefill_chunk=4)
    ids = model.encode(PROMPTS[1])
    assert len(ids) > 8
    decoder.cached[2] = list(ids[:3])  # the owner "" is every Sequence's by default
    short = Sequence(ids, 2)
    decoder.admit(short)
    assert (short.slot, short.reused) == (0, 0)
    decoder.release(short)
    decoder.cached[2] = list(ids[:-1])  # all but the last token, which always runs: more than a chunk
    long = Sequence(ids, 2)
    decoder.admit(long)
    assert (long.slot, long.reused) == (2, len(ids) - 1)
    decoder.release(long)
    # Slot 0 holds another conversation longer than a chunk: a prompt sharing only 2 tokens with it
    # goes where it throws away less (slot 2, whose cache is its own prefix), keeping slot 0's.
    other = list(ids[:2]) + [t for t in model.encode(PROMPTS[2]) * 3][:12]
    decoder.cached[0], decoder.cached[1], decoder.cached[2] = other, [], list(ids[:3])
    kept = Sequence(ids, 2)
    decoder.admit(kept)
    assert (kept.slot, kept.reused) == (2, 3) and decoder.cached[0] == other


@pytest.fixture(scope="module")
def server(tiny_bundle):
    proc, base = start_server(tiny_bundle, "--parallel", "4", "--max-queue", "8")
    yield base, proc
    proc.terminate()
    proc.wait(timeout=20)


def _stream(base, messages, **params):
    """One streamed chat: its text, finish reasons and usage, as the openai client reads them."""
    client = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    chunks = list(
        client.chat.completions.create(
            model="tiny-laptop", messages=messages, stream=True, stream_options={"include_usage": True}, **params
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return text, finals, chunks[-1].usage


def test_eight_concurrent_streams_match_their_solo_answers(server, model):
    base, proc = server
    requests, wants = [], []
    for i in range(8):
        messages = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS))}]
        params = {"max_tokens": 6 + 5 * i, "temperature": 0.0 if i % 2 == 0 else 1.0, "seed": 100 + i}
        solo = model.chat(messages, max_new_tokens=params["max_tokens"], keep_cache=False, **params_of(params))
        if i % 3 == 2:  # a stop string from inside the solo answer
            assert len(solo.text) > 6, solo.text
            params["stop"] = [solo.text[4:6]]
            cut = solo.text[: solo.text.index(params["stop"][0])]
            solo_text, reason = cut, "stop"
            tokens = None
        else:
            solo_text, reason = solo.text, solo.finish_reason
            tokens = len(solo.token_ids)
        requests.append((messages, params))
        wants.append((solo_text, reason, tokens, len(solo.prompt_token_ids)))
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda r: _stream(base, r[0], **r[1]), requests))
    for (text, finals, usage), (want_text, reason, tokens, prompt) in zip(results, wants):
        assert text == want_text
        assert finals == [reason]
        assert usage.prompt_tokens == prompt
        if tokens is not None:
            assert usage.completion_tokens == tokens and usage.total_tokens == prompt + tokens
    metrics = httpx.get(base + "/metrics").text
    assert "edge_slm_slots 4.0" in metrics and "edge_slm_slots_busy 0.0" in metrics


def params_of(params):
    return {"temperature": params["temperature"], "seed": params["seed"]}


def test_a_client_that_hangs_up_frees_its_slot_for_the_next_request(tiny_bundle, model):
    proc, base = start_server(tiny_bundle, "--parallel", "2", "--max-queue", "4")
    try:
        long = [{"role": "user", "content": PROMPTS[2]}]
        solo = model.chat(long, max_new_tokens=90, keep_cache=False, temperature=0.0)
        assert len(solo.token_ids) == 90, "the tiny model must not end this answer early"
        body = {"messages": long, "max_tokens": 90, "temperature": 0, "stream": True}
        with httpx.Client(base_url=base, timeout=30) as a, httpx.Client(base_url=base, timeout=30) as b:
            with (
                a.stream("POST", "/v1/chat/completions", json=body) as sa,
                b.stream("POST", "/v1/chat/completions", json=body) as sb,
            ):
                lines_b = sb.iter_lines()
                next(lines_b)
                # Both slots are busy: a third request waits until A hangs up.
                waiting = ThreadPoolExecutor(1).submit(
                    httpx.post,
                    base + "/v1/chat/completions",
                    json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0},
                    timeout=30,
                )
                next(sa.iter_lines())
                sa.close()  # A hangs up
                third = waiting.result()
                # B is still far from its 90 tokens when the third request has its whole answer.
                rest_b = [line for line in lines_b if line.startswith("data: {")]
        assert third.status_code == 200 and third.json()["usage"]["completion_tokens"] >= 1
        assert len(rest_b) > 40, len(rest_b)
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_a_prompt_longer_than_a_slot_is_400_and_the_slots_are_reported(tiny_bundle):
    proc, base = start_server(tiny_bundle, "--parallel", "2", "--context", "32", "--max-queue", "1")
    try:
        reply = httpx.post(base + "/v1/completions", json={"prompt": "word " * 40, "max_tokens": 2})
        assert reply.status_code == 400
        assert reply.json()["error"]["message"] == "the prompt has 200 tokens; the model's context is 32: shorten it"
        # Two decoding and one waiting: the rest of six at once are refused.
        body = {"prompt": "1, 2, 3,", "max_tokens": 25, "temperature": 0}

        async def six():
            async with httpx.AsyncClient(timeout=60) as http:
                return await asyncio.gather(*(http.post(base + "/v1/completions", json=body) for _ in range(6)))

        statuses = sorted(r.status_code for r in asyncio.run(six()))
        assert statuses.count(200) >= 3 and statuses.count(429) >= 2, statuses
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    from edge_slm.core.bundle import verify_bundle

    m = verify_bundle(tiny_bundle, checksums=False).model
    mb = 2 * m.num_layers * m.num_kv_heads * m.head_dim * 32 * 2 * 4 / 2**20
    first = proc.stderr.read().decode().splitlines()[0]
    assert first.endswith(f"(health: /health, metrics: /metrics); KV cache: 2 slots x 32 tokens = {mb:.1f} MB"), first


def test_slots_times_context_over_the_budget_refuses_to_start(tiny_bundle):
    from edge_slm.core.bundle import verify_bundle

    m = verify_bundle(tiny_bundle, checksums=False).model
    mb = 2 * m.num_layers * m.num_kv_heads * m.head_dim * 128 * 8 * 4 / 2**20
    done = subprocess.run(
        [sys.executable, "-m", "edge_slm.cli", "serve", str(tiny_bundle), "--parallel", "8", "--kv-budget-mb", "0.01"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: KV cache: 8 slots x 128 tokens = {mb:.1f} MB, over the budget of 0.01 MB (--kv-budget-mb): "
        "lower --parallel or --context"
    ]


MALLOC_PROBE = """
import ctypes, sys
from pathlib import Path

def rss_mb():
    return int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) / 1024

if sys.argv[1] == "set":
    from edge_slm.serve.malloc import return_large_blocks_to_system
    assert return_large_blocks_to_system()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 8 << 20
for _ in range(2):  # glibc raises its threshold after the first free: the second block lands in the heap
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    before = rss_mb()
    libc.free(block)
print(before - rss_mb())
"""


def test_the_kv_buffer_is_made_where_the_kernel_refuses_the_page_advice(monkeypatch):
    """A kernel without transparent huge pages (Raspberry Pi OS's) refuses MADV_NOHUGEPAGE with
    EINVAL: the buffer is made anyway. An advice number no kernel knows gets the same refusal."""
    import mmap

    from edge_slm.runtime.batch import small_page_zeros

    monkeypatch.setattr(mmap, "MADV_NOHUGEPAGE", 9999, raising=False)
    with pytest.raises(OSError):
        mmap.mmap(-1, 4096).madvise(9999)
    array = small_page_zeros((2, 1024), np.float32)
    assert array.shape == (2, 1024) and not array.any()


@pytest.mark.skipif(
    not Path("/proc/self/status").exists() or __import__("platform").libc_ver()[0] != "glibc",
    reason="glibc's allocator, VmRSS from /proc",
)
def test_serve_malloc_setting_returns_freed_large_blocks_to_the_system():
    """`edge-slm serve` sets glibc's mmap threshold at 1 MiB before loading: a second 8 MiB block,
    freed, goes back to the system (without the setting glibc keeps it in the heap)."""

    def released(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", MALLOC_PROBE, mode], capture_output=True, text=True, check=True)
        return float(out.stdout)

    assert released("set") > 7.5
    assert released("default") < 1.0
