"""`edge-slm serve`: a real uvicorn server on a loopback port, driven by the real `openai` client
(chat, streaming, completions, stop strings, seeds) and by raw HTTP for the error cases; answers
checked token for token against the runtime's own greedy generation."""

import asyncio
import json
import time

import httpx
import pytest
from conftest import start_server
from openai import OpenAI

from edge_slm import runtime

QUESTIONS = ["What is the capital of France?", "Name a small device.", "Why quantize weights?", "Count to three."]


def _start(bundle, max_queue=8, *flags):
    return start_server(bundle, "--max-queue", str(max_queue), *flags)


@pytest.fixture(scope="module")
def server(tiny_bundle):
    proc, base = _start(tiny_bundle)
    yield base
    proc.terminate()
    proc.wait(timeout=20)


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(tiny_bundle):
    return runtime.load(tiny_bundle, threads=1)


@pytest.fixture(scope="module")
def model_id(client):
    return client.models.list().data[0].id


def _expected(model, messages, max_tokens):
    return model.chat(messages, max_new_tokens=max_tokens, keep_cache=False, temperature=0.0)


def test_models_lists_the_bundle(client, tiny_bundle):
    listed = client.models.list().data
    assert [m.id for m in listed] == ["tiny-laptop"]  # the bundle's target
    assert listed[0].model_extra["target"] == "tiny-laptop" and listed[0].model_extra["precision"] == "fp32"


def test_chat_matches_the_runtime_token_for_token(client, model, model_id):
    for question in QUESTIONS:
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}]
        want = _expected(model, messages, 12)
        got = client.chat.completions.create(model=model_id, messages=messages, max_tokens=12, temperature=0)
        assert got.choices[0].message.content == want.text
        assert got.usage.prompt_tokens == len(want.prompt_token_ids)
        assert got.usage.completion_tokens == len(want.token_ids)
        assert got.choices[0].finish_reason == ("length" if want.stop_reason == "max_new_tokens" else "stop")


def test_streaming_equals_the_whole_answer(client, model, model_id):
    messages = [{"role": "user", "content": QUESTIONS[0]}]
    want = _expected(model, messages, 16)
    stream = client.chat.completions.create(
        model=model_id,
        messages=messages,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length" if want.stop_reason == "max_new_tokens" else "stop"]
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)


def test_completions_plain_and_streamed(client, model, model_id):
    want = model.generate("The capital of France is", max_new_tokens=10, temperature=0.0)
    got = client.completions.create(model=model_id, prompt="The capital of France is", max_tokens=10, temperature=0)
    assert got.choices[0].text == want.text and got.usage.prompt_tokens == len(want.prompt_token_ids)
    streamed = client.completions.create(
        model=model_id, prompt="The capital of France is", max_tokens=10, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == want.text


def test_stop_strings_and_seeds(client, model, model_id):
    messages = [{"role": "user", "content": QUESTIONS[2]}]
    full = _expected(model, messages, 20).text
    assert len(full) > 4
    stop = full[3:5]
    got = client.chat.completions.create(model=model_id, messages=messages, max_tokens=20, temperature=0, stop=[stop])
    assert got.choices[0].message.content == full[: full.index(stop)] and got.choices[0].finish_reason == "stop"
    sampled = [
        client.chat.completions.create(model=model_id, messages=messages, max_tokens=12, temperature=1.0, seed=7)
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        (b"{not json", 400, "not valid JSON"),
        (
            json.dumps({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}).encode(),
            400,
            "'temperature' must be a number",
        ),
        (json.dumps({"messages": "hi"}).encode(), 400, "'messages' must be a non-empty list"),
        (
            json.dumps({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}).encode(),
            404,
            "does not exist",
        ),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}], "n": 2}).encode(), 400, "one choice per request"),
        (
            json.dumps({"messages": [{"role": "user", "content": "word " * 400}]}).encode(),
            400,
            "the model's context is 128",
        ),
    ],
)
def test_errors_in_openai_shape(server, body, status, fragment):
    response = httpx.post(server + "/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert fragment in error["message"] and set(error) == {"message", "type", "param", "code"}


def test_a_route_the_bundle_cannot_serve_is_400(server, model_id):
    response = httpx.post(server + "/v1/embeddings", json={"model": model_id, "input": "hello"})
    assert response.status_code == 400
    assert response.json()["error"]["message"] == (
        f"the bundle {model_id!r} serves generation, not embedding: use /v1/chat/completions "
        "(or serve a embedding bundle)"
    )


def test_an_embedder_serves_openai_embeddings(embedder_bundles):
    """The openai client's embeddings call (base64 on the wire) gives the runtime's vectors."""
    import numpy as np

    proc, base = _start(embedder_bundles[1])
    try:
        client = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        texts = ["turn off the kitchen lights", "play some jazz", "what's the weather tomorrow"]
        reply = client.embeddings.create(model="tiny-encoder-laptop", input=texts)
        got = np.array([d.embedding for d in reply.data], dtype=np.float32)
        want = runtime.load(embedder_bundles[1], threads=1).embed(texts)
        assert got.shape == (3, 32) and np.abs(got - want).max() < 1e-6
        assert [d.index for d in reply.data] == [0, 1, 2] and reply.usage.prompt_tokens > 6
        as_floats = httpx.post(base + "/v1/embeddings", json={"input": "hello", "encoding_format": "float"}).json()
        assert len(as_floats["data"][0]["embedding"]) == 32
        chat = httpx.post(base + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 400 and chat.json()["error"]["message"] == (
            "the bundle 'tiny-encoder-laptop' serves embedding, not generation: use /v1/embeddings "
            "(or serve a generation bundle)"
        )
        for body, message in (
            ({"input": ""}, "input[0] is empty; give each text some words"),
            ({"input": [1, 2]}, "input[0] must be a string (token arrays are not accepted)"),
            ({"input": "word " * 100}, "tokens; this bundle takes at most 32 (shorten it"),
            ({"input": "hi", "encoding_format": "int8"}, "'encoding_format' is 'int8'; use 'float' or 'base64'"),
        ):
            response = httpx.post(base + "/v1/embeddings", json=body)
            assert response.status_code == 400 and message in response.json()["error"]["message"], body
        models = client.models.list().data[0].model_extra
        assert models["family"] == "encoder" and models["task"] == "embedding"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_a_classifier_serves_classifications(classifier_bundle):
    proc, base = _start(classifier_bundle)
    try:
        texts = ["turn off the kitchen lights", "play some jazz"]
        reply = httpx.post(base + "/v1/classifications", json={"input": texts}).json()
        want = runtime.load(classifier_bundle, threads=1).classify(texts)
        assert [d["label"] for d in reply["data"]] == [r.label for r in want]
        for d, r in zip(reply["data"], want):
            assert abs(d["probability"] - r.probability) < 1e-6 and set(d["probabilities"]) == {"lights", "music"}
        wrong = httpx.post(base + "/v1/embeddings", json={"input": "hi"})
        assert wrong.status_code == 400 and "serves classification, not embedding" in wrong.json()["error"]["message"]
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_eight_clients_get_their_own_answers(server, model, model_id):
    """8 clients x 5 requests at once: every answer complete and the one its own prompt gives."""
    expected = {q: _expected(model, [{"role": "user", "content": q}], 10).text for q in QUESTIONS}

    async def client_loop(n: int, http: httpx.AsyncClient):
        got = []
        for r in range(5):
            question = QUESTIONS[(n + r) % len(QUESTIONS)]
            body = {
                "model": model_id,
                "messages": [{"role": "user", "content": question}],
                "max_tokens": 10,
                "temperature": 0,
            }
            response = await http.post(server + "/v1/chat/completions", json=body, timeout=120)
            got.append((question, response.status_code, response.json()))
        return got

    async def main():
        async with httpx.AsyncClient() as http:
            return await asyncio.gather(*(client_loop(n, http) for n in range(8)))

    results = [item for client in asyncio.run(main()) for item in client]
    assert len(results) == 40
    for question, status, body in results:
        assert status == 200, body
        assert body["choices"][0]["message"]["content"] == expected[question]


def test_queue_overflow_is_429_at_once_and_a_disconnect_frees_the_model(tiny_bundle, model):
    proc, base = _start(tiny_bundle, 1, "--parallel", "1")  # one running, one waiting: the rest refused
    try:
        body = {
            "messages": [{"role": "user", "content": "Tell a story."}],
            "max_tokens": 100,
            "temperature": 0,
            "stream": True,
        }

        async def main():
            async with httpx.AsyncClient(timeout=60) as http:
                started = time.monotonic()
                responses = await asyncio.gather(
                    *(http.post(base + "/v1/chat/completions", json=body) for _ in range(6))
                )
                return [(r.status_code, time.monotonic() - started, r) for r in responses]

        answers = asyncio.run(main())
        refused = [a for a in answers if a[0] == 429]
        assert len(refused) >= 4 and all(a[2].json()["error"]["code"] == "queue_full" for a in refused)
        # A client that leaves mid-stream: the model is free for the next request right after.
        with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=60) as stream:
            for line in stream.iter_lines():
                if line.startswith("data: {") and '"content"' in line:
                    break
        want = _expected(model, [{"role": "user", "content": QUESTIONS[0]}], 5)
        started = time.monotonic()
        done = httpx.post(
            base + "/v1/chat/completions",
            timeout=60,
            json={"messages": [{"role": "user", "content": QUESTIONS[0]}], "max_tokens": 5, "temperature": 0},
        )
        assert done.status_code == 200 and done.json()["choices"][0]["message"]["content"] == want.text
        assert done.json()["choices"][0]["finish_reason"] == (
            "length" if want.stop_reason == "max_new_tokens" else "stop"
        )
        assert time.monotonic() - started < 30
        metrics = httpx.get(base + "/metrics").text
        assert 'edge_slm_requests_total{route="chat",status="429"}' in metrics
        assert "edge_slm_time_to_first_token_seconds_count" in metrics and "edge_slm_peak_rss_megabytes" in metrics
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_health_says_loading_until_the_model_is_loaded(tiny_bundle):
    from edge_slm.serve.app import create_app

    app = create_app(tiny_bundle, threads=1)
    service = app.state.service

    async def ask():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            before = await http.get("/health")
            listed = (await http.get("/v1/models")).json()["data"][0]["id"]
            refused = await http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
            service.load()
            after = await http.get("/health")
            named = await http.post(
                "/v1/chat/completions",
                json={"model": listed, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]},
            )
            return before, listed, refused, after, named

    before, listed, refused, after, named = asyncio.run(ask())
    assert before.status_code == 503 and before.json() == {"status": "loading"}
    assert refused.status_code == 503 and "still loading" in refused.json()["error"]["message"]
    assert after.status_code == 200 and after.json()["status"] == "ok"
    # The name /v1/models gives while the model loads is the one requests are accepted under after.
    assert listed == after.json()["model"] == "tiny-laptop"
    assert named.status_code == 200, named.text
