"""Requests are untrusted input: hypothesis sends arbitrary JSON (and near-valid bodies) to every
POST route of a decoder and an encoder service, in process. Every answer is a success of the
route's shape or an OpenAI-shaped error with a 4xx status: never a 500, never a hang."""

import json

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from edge_slm.serve.app import create_app

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
TEXTS = st.text(max_size=60) | st.sampled_from(["turn off the lights", "", "   ", "\x00", "<|im_end|>", "word " * 200])
WORDS = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=40)
FIELDS = {  # each mostly well-formed, sometimes anything at all
    "model": st.sampled_from(["tiny-laptop", "tiny-encoder-laptop"]) | JSON,
    "input": WORDS | st.lists(WORDS, min_size=1, max_size=5) | st.lists(TEXTS, max_size=5) | JSON,
    "encoding_format": st.sampled_from(["float", "base64", "int8"]) | JSON,
    "prompt": WORDS | TEXTS | JSON,
    "messages": st.lists(
        st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "bot"]), "content": WORDS | TEXTS}),
        max_size=3,
    )
    | JSON,
    "max_tokens": st.integers(-5, 8) | JSON,
    "temperature": st.floats(-1, 3) | JSON,
    "top_p": st.floats(-1, 2) | JSON,
    "seed": st.integers(-5, 2**40) | JSON,
    "stop": TEXTS | st.lists(TEXTS, max_size=3) | JSON,
    "stream": st.just(False) | JSON,
}
BODIES = st.fixed_dictionaries({}, optional=FIELDS) | JSON
ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/classifications"]


def _check(client, route: str, body) -> int:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = client.post(route, content=raw, headers={"content-type": "application/json"})
    assert response.status_code in (200, 400, 404, 429), (route, body, response.status_code, response.text[:300])
    if response.status_code != 200:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], (route, body)
        assert "\n" not in error["message"]  # one line
    elif route in ("/v1/embeddings", "/v1/classifications"):
        data = response.json()["data"]
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        assert [d["index"] for d in data] == list(range(len(texts)))
    return response.status_code


_tokenizers = {}  # service index -> (the bundle's own tokenizer, its input limit in tokens)


@pytest.fixture(scope="module")
def services(tiny_bundle, embedder_bundles, classifier_bundle):
    from tokenizers import Tokenizer

    for index, bundle in ((1, embedder_bundles[1]), (2, classifier_bundle)):
        manifest = json.loads((bundle / "manifest.json").read_text())
        limit = manifest["model"]["max_sequence_length"]
        tokenizer = Tokenizer.from_file(str(bundle / "tokenizer.json"))
        tokenizer.no_truncation()  # the file truncates at the limit; the server refuses instead
        _tokenizers[index] = (tokenizer, limit)
    clients = [
        TestClient(create_app(bundle, threads=1, load_in_background=False))
        for bundle in (tiny_bundle, embedder_bundles[1], classifier_bundle)
    ]
    for client in clients:
        client.__enter__()
    yield clients
    for client in clients:
        client.__exit__(None, None, None)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(body=BODIES, route=st.sampled_from(ROUTES), which=st.integers(0, 2))
def test_any_body_to_any_route_is_answered_in_openai_shape(services, body, route, which):
    if isinstance(body, dict) and body.get("stream") is True:
        body = {**body, "stream": False}  # streams are checked by the serving tests; here, whole answers
    event(f"{route} -> {_check(services[which], route, body)}")


def test_bytes_that_are_not_json(services):
    for client in services:
        for route in ROUTES:
            _check(client, route, b"\xff\xfe not json {")


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=WORDS | st.lists(WORDS | TEXTS, min_size=1, max_size=6), form=st.sampled_from(["float", "base64"]))
def test_well_formed_encoder_requests_get_one_result_per_text_or_a_reason(services, texts, form):
    """Arbitrary Unicode texts to the encoders' own routes: a vector or a label for each, or 400
    naming the text that cannot be taken (empty, or longer than the bundle's 32 tokens)."""
    items = texts if isinstance(texts, list) else [texts]
    for client, route, bundle in ((services[1], "/v1/embeddings", 1), (services[2], "/v1/classifications", 2)):
        status = _check(client, route, {"input": texts, "encoding_format": form})
        tokenizer, longest = _tokenizers[bundle]
        refused = any(not t.strip() or len(tokenizer.encode(t).ids) > longest for t in items)
        assert status == (400 if refused else 200), (route, texts)
        event(f"{route} -> {status}")
