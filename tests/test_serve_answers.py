"""POST /v1/answers through a real server (`edge-slm serve BUNDLE --index INDEX`, its own process),
with the tiny embedder bundle served (extractive answers) and with the tiny decoder served beside
the index's embedder (written answers)."""

from __future__ import annotations

import httpx
import pytest
from conftest import start_server

from edge_slm.runtime.index import build_index

# Each section is one sentence: asked word for word, its passage is the nearest, whatever the
# (random) tiny embedder makes of it.
DOCS = """# Home

## Lights

turn on the lights in the kitchen.

## Music

play some music in the living room.

## Alarm

set an alarm for seven in the morning.
"""


@pytest.fixture(scope="module")
def home_index(tmp_path_factory, embedder_bundles):
    root = tmp_path_factory.mktemp("answers")
    (root / "docs").mkdir()
    (root / "docs" / "home.md").write_text(DOCS)
    build_index(root / "docs", embedder_bundles[0], root / "home.index")
    return root / "home.index"


@pytest.fixture(scope="module")
def embedder_server(embedder_bundles, home_index):
    proc, base = start_server(embedder_bundles[0], "--index", home_index, "--max-queue", "2")
    yield base
    proc.terminate()
    proc.wait(timeout=10)


def test_answers_come_with_their_sources(embedder_server):
    response = httpx.post(
        embedder_server + "/v1/answers", json={"question": "play some music in the living room.", "k": 2}, timeout=30
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "answer" and body["found"] is True and body["mode"] == "extractive"
    assert body["answer"] == "play some music in the living room."
    assert len(body["sources"]) == 2 and body["sources"][0]["file"] == "home.md"
    assert body["sources"][0]["text"].endswith("play some music in the living room.")
    assert body["sources"][0]["score"] >= body["sources"][1]["score"] and body["timings"]["ms"] > 0


@pytest.mark.parametrize(
    ("payload", "status", "param", "message"),
    [
        ({"k": 2}, 400, "question", "'question' must be a non-empty string"),
        ({"question": "  "}, 400, "question", "'question' must be a non-empty string"),
        ({"question": "music", "k": 0}, 400, "k", "'k' is 0; retrieve 1 to 50 passages"),
        ({"question": "music", "k": 100000}, 400, "k", "'k' is 100000; retrieve 1 to 50 passages"),
        ({"question": "music", "k": True}, 400, "k", "'k' is True"),
        ({"question": "music " * 200}, 400, "question", "tokens; the index's embedder takes at most 32: shorten it"),
        ({"question": "music", "model": "other"}, 404, "model", "the model 'other' does not exist"),
    ],
)
def test_bad_requests_get_openai_shaped_errors(embedder_server, payload, status, param, message):
    response = httpx.post(embedder_server + "/v1/answers", json=payload, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["param"] == param
    assert error["type"] == "invalid_request_error"


def test_answers_refuse_a_body_that_is_not_json(embedder_server):
    response = httpx.post(embedder_server + "/v1/answers", content="question=music", timeout=30)
    assert response.status_code == 415 and response.json()["error"]["code"] == "unsupported_media_type"


def test_without_an_index_there_is_no_answers_route(embedder_bundles):
    proc, base = start_server(embedder_bundles[0])
    try:
        response = httpx.post(base + "/v1/answers", json={"question": "music"}, timeout=30)
        assert response.status_code == 404 and response.json()["error"]["code"] == "unknown_route"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def long_decoder(tmp_path_factory, tiny_llama):
    """The tiny decoder with a context of 512: room for the prompt that quotes the passages."""
    from conftest import write_profile

    from edge_slm.builder.pipeline import build
    from edge_slm.core.targets import load_profile

    root = tmp_path_factory.mktemp("long-decoder")
    profile = write_profile(
        root / "p.toml", "x86-laptop", "tiny-512", export={"context_length": 512}, quantize={"precision": "fp32"}
    )
    build(str(tiny_llama), load_profile(str(profile)), root / "bundle", echo=lambda m: None)
    return root / "bundle"


@pytest.fixture(scope="module")
def decoder_server(long_decoder, embedder_bundles, home_index):
    proc, base = start_server(long_decoder, "--index", home_index, "--embedder", embedder_bundles[0])
    yield base
    proc.terminate()
    proc.wait(timeout=10)


def test_a_served_decoder_writes_the_answer_from_the_passages(decoder_server):
    question = {"question": "set an alarm for seven in the morning.", "k": 3}
    response = httpx.post(decoder_server + "/v1/answers", json=question, timeout=120)
    body = response.json()
    assert response.status_code == 200, body
    assert body["mode"] == "generated" and body["found"] is True and body["answer"]  # random words, but words
    assert 1 <= len(body["sources"]) <= 3 and body["sources"][0]["text"].endswith(question["question"])
    metrics = httpx.get(decoder_server + "/metrics", timeout=10).text
    assert 'route="answers",status="200"' in metrics


QUESTION = "turn on the lights in the kitchen."


def _chat(base: str, max_tokens: int = 4, **extra):
    from openai import OpenAI

    client = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": QUESTION}]
    model = client.models.list().data[0].id
    return client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0, **extra)


def test_a_chat_completion_quotes_the_passages_it_asks_for(decoder_server):
    plain = _chat(decoder_server)
    one = _chat(decoder_server, extra_body={"retrieval": {"k": 1}})
    two = _chat(decoder_server, extra_body={"retrieval": {"k": 2}})
    assert "sources" not in (plain.model_extra or {})
    assert [s["file"] for s in one.sources] == ["home.md"] and one.sources[0]["text"].endswith(QUESTION)
    assert [s["file"] for s in two.sources] == ["home.md", "home.md"] and two.sources[0] == one.sources[0]
    assert set(two.sources[0]) == {"file", "lines", "text", "score"} and two.sources[0]["score"] >= 0.31
    # The prompt quotes the passages: each one more makes it longer.
    assert plain.usage.prompt_tokens < one.usage.prompt_tokens < two.usage.prompt_tokens
    assert one.choices[0].message.content and one.usage.completion_tokens <= 4


def test_a_streamed_chat_completion_carries_the_sources_in_its_first_chunk(decoder_server):
    chunks = list(_chat(decoder_server, stream=True, extra_body={"retrieval": True}))
    assert [s["file"] for s in chunks[0].sources] == ["home.md"] * 3
    assert all("sources" not in (c.model_extra or {}) for c in chunks[1:])
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("value", [{"k": 0}, {"k": 51}, {"k": "3"}, {"top": 3}, "yes", 3, 0, 0.0])
def test_a_bad_retrieval_value_is_a_400_naming_it(decoder_server, value):
    import openai

    with pytest.raises(openai.BadRequestError) as error:
        _chat(decoder_server, extra_body={"retrieval": value})
    assert error.value.body["param"] == "retrieval"
    assert error.value.body["message"].startswith("'retrieval' is ") and 'send true or {"k": 1 to 50}' in str(
        error.value
    )


def test_retrieval_without_an_index_is_a_400_naming_it(tiny_bundle):
    import openai

    proc, base = start_server(tiny_bundle)
    try:
        with pytest.raises(openai.BadRequestError) as error:
            _chat(base, extra_body={"retrieval": True})
        assert error.value.body["param"] == "retrieval"
        assert "'retrieval' needs documents: start the server with --index INDEX" in error.value.body["message"]
        assert _chat(base, extra_body={"retrieval": False}).choices[0].message.content is not None
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_a_decoder_whose_context_cannot_hold_a_passage_is_a_400(tiny_bundle, embedder_bundles, home_index):
    proc, base = start_server(tiny_bundle, "--index", home_index, "--embedder", embedder_bundles[0])
    try:
        response = httpx.post(base + "/v1/answers", json={"question": "set an alarm for seven."}, timeout=60)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "context_length_exceeded" and "the decoder's context is 128" in error["message"]
        chat = {"messages": [{"role": "user", "content": "set an alarm for seven."}], "retrieval": {"k": 3}}
        response = httpx.post(base + "/v1/chat/completions", json=chat, timeout=60)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "context_length_exceeded" and error["param"] == "retrieval"
        assert "the messages with the best passage take" in error["message"]
        assert "the decoder's context is 128" in error["message"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_serve_refuses_a_damaged_index_before_it_starts(embedder_bundles, home_index, tmp_path, capsys):
    import shutil

    from edge_slm.cli import main

    damaged = tmp_path / "damaged.index"
    shutil.copytree(home_index, damaged)
    (damaged / "passages.json").write_text("[]")
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", str(embedder_bundles[0]), "--index", str(damaged), "--port", "1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "checksum mismatch" in err and len(err.strip().splitlines()) == 1


def test_the_least_relevant_passages_give_way_to_the_reply(long_decoder, embedder_bundles, home_index):
    """Quoting 3 passages, the prompt has 274 tokens (36 without): in a context of 300, a reply of 4
    tokens leaves room for all 3, one of 30 for 2."""
    proc, base = start_server(
        long_decoder, "--index", home_index, "--embedder", embedder_bundles[0], "--context", "300"
    )
    try:
        three = _chat(base, extra_body={"retrieval": {"k": 3}})
        two = _chat(base, max_tokens=30, extra_body={"retrieval": {"k": 3}})
        assert len(three.sources) == 3 and three.usage.prompt_tokens == 274
        assert len(two.sources) == 2 and two.sources == three.sources[:2] and two.usage.prompt_tokens + 30 <= 300
    finally:
        proc.terminate()
        proc.wait(timeout=10)
