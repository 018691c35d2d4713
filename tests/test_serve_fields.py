"""Every chat-completions field honoured or refused (issue #24): a real `edge-slm serve` on a
loopback port, both engines (`--parallel 1`: one request at a time; `--parallel 2`: batched),
driven by the `openai` client and httpx; logprobs checked against numpy's log-softmax of the
graph's own logits (plain onnxruntime, no KV cache), sampling fields against the runtime's
greedy decode, refusals by status and the field they name. Also the home-network options
(--api-key, --cors-origin, --alias), /tokenize and /detokenize, cache_prompt, and a bundle's
sampling defaults from its generation_config.json."""

import json
import shutil
import subprocess
import sys

import httpx
import numpy as np
import pytest
from conftest import prompt_logits, start_server
from openai import APIStatusError, AuthenticationError, OpenAI

from edge_slm import runtime
from edge_slm.core.errors import EdgeSlmError

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def _stop(proc) -> None:
    proc.terminate()
    proc.wait(timeout=20)


@pytest.fixture(scope="module", params=["1", "2"], ids=["engine", "batch"])
def server(request, tiny_bundle):
    proc, base = start_server(tiny_bundle, "--parallel", request.param)
    yield base
    _stop(proc)


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(tiny_bundle):
    return runtime.load(tiny_bundle, threads=1)


def _numpy_logprobs(bundle, ids: list[int]) -> np.ndarray:
    """log softmax of the graph's logits at every position, in float64 numpy: row t is the
    distribution of token t+1."""
    logits = prompt_logits(bundle / "model.onnx", ids).astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _greedy(model, messages=MESSAGES, max_tokens=8, **sampling):
    return model.chat(messages, max_new_tokens=max_tokens, keep_cache=False, temperature=0.0, **sampling)


def _raw(server, body: dict, route: str = "/v1/chat/completions", **kwargs) -> httpx.Response:
    return httpx.post(server + route, json=body, timeout=60, **kwargs)


# -- logprobs ------------------------------------------------------------------------------------
def test_logprobs_equal_numpy_log_softmax_of_the_models_logits(client, model, tiny_bundle):
    want = _greedy(model)
    reply = client.chat.completions.create(
        model="tiny-laptop", messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True, top_logprobs=5
    )
    content = reply.choices[0].logprobs.content
    assert reply.choices[0].message.content == want.text
    assert len(content) == len(want.token_ids) > 0
    prompt = model.encode_chat(MESSAGES)
    table = _numpy_logprobs(tiny_bundle, prompt + want.token_ids)
    pieces = [bytes(entry.bytes) for entry in content]
    assert b"".join(pieces).decode("utf-8", "replace") == want.text
    for i, (entry, token) in enumerate(zip(content, want.token_ids)):
        row = table[len(prompt) - 1 + i]
        assert entry.logprob == pytest.approx(row[token], abs=1e-4)
        best = np.argsort(-row)[:5]
        assert [alt.logprob for alt in entry.top_logprobs] == pytest.approx(row[best].tolist(), abs=1e-4)
        assert bytes(entry.top_logprobs[0].bytes) == bytes(entry.bytes)  # greedy: the likeliest token
        assert entry.token == bytes(entry.bytes).decode("utf-8", "replace")


def test_streamed_logprobs_are_the_same_per_token(client):
    kwargs = dict(model="tiny-laptop", messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**kwargs).choices[0].logprobs.content
    streamed = []
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed.extend(chunk.choices[0].logprobs.content)
    assert [(e.bytes, e.logprob) for e in streamed] == [(e.bytes, e.logprob) for e in whole]
    assert [len(e.top_logprobs) for e in streamed] == [2] * len(whole)


def test_no_logprobs_unless_asked(client):
    reply = client.chat.completions.create(model="tiny-laptop", messages=MESSAGES, max_tokens=4, temperature=0)
    assert reply.choices[0].logprobs is None


def test_completions_logprobs_and_echo(server, model, tiny_bundle):
    prompt = "The capital of France is"
    body = {"prompt": prompt, "max_tokens": 6, "temperature": 0, "logprobs": 3}
    choice = _raw(server, body, "/v1/completions").json()["choices"][0]
    ids = model.encode(prompt)
    want = model.generate(ids, max_new_tokens=6, temperature=0.0)
    table = _numpy_logprobs(tiny_bundle, ids + want.token_ids)
    lp = choice["logprobs"]
    assert lp["token_logprobs"] == pytest.approx(
        [table[len(ids) - 1 + i, t] for i, t in enumerate(want.token_ids)], abs=1e-4
    )
    assert [len(alts) for alts in lp["top_logprobs"]] == [3] * len(want.token_ids)
    assert lp["text_offset"][0] == 0 and "".join(lp["tokens"]) == choice["text"] == want.text
    streamed = httpx.post(server + "/v1/completions", json={**body, "stream": True}, timeout=60).text
    chunks = [json.loads(line[6:]) for line in streamed.splitlines() if line.startswith("data: {")]
    offsets = [o for c in chunks if c["choices"][0]["logprobs"] for o in c["choices"][0]["logprobs"]["text_offset"]]
    assert offsets == lp["text_offset"]  # a stream's offsets run on from chunk to chunk
    echoed = _raw(server, {"prompt": prompt, "max_tokens": 6, "temperature": 0, "echo": True}, "/v1/completions")
    assert echoed.json()["choices"][0]["text"] == prompt + want.text


# -- sampling fields, against the runtime ----------------------------------------------------------
def test_logit_bias_minus_100_bans_the_greedy_first_token(client, model, tiny_bundle):
    first = _greedy(model, max_tokens=1).token_ids[0]
    prompt = model.encode_chat(MESSAGES)
    row = _numpy_logprobs(tiny_bundle, prompt)[-1]
    runner_up = int(np.argsort(-row)[1])
    reply = client.chat.completions.create(
        model="tiny-laptop",
        messages=MESSAGES,
        max_tokens=1,
        temperature=0,
        logit_bias={str(first): -100},
        logprobs=True,
    )
    got = reply.choices[0].logprobs.content[0]
    assert got.logprob == pytest.approx(row[runner_up], abs=1e-4)  # the second likeliest, not the first
    assert model.generate(prompt, max_new_tokens=1, logit_bias={first: -100}).token_ids == [runner_up]
    # +100 forces an unlikely token (the least likely one)
    least = int(np.argmin(row))
    forced = client.chat.completions.create(
        model="tiny-laptop", messages=MESSAGES, max_tokens=1, temperature=0, logit_bias={str(least): 100}, logprobs=True
    )
    assert forced.choices[0].logprobs.content[0].logprob == pytest.approx(row[least], abs=1e-4)


def test_top_k_1_at_temperature_1_5_equals_greedy(client, model):
    want = _greedy(model, max_tokens=10).text
    for seed in (1, 2, 3):
        reply = client.chat.completions.create(
            model="tiny-laptop",
            messages=MESSAGES,
            max_tokens=10,
            temperature=1.5,
            seed=seed,
            extra_body={"top_k": 1},
        )
        assert reply.choices[0].message.content == want
    sampled = {
        client.chat.completions.create(
            model="tiny-laptop", messages=MESSAGES, max_tokens=10, temperature=1.5, seed=seed
        )
        .choices[0]
        .message.content
        for seed in (1, 2, 3)
    }
    assert sampled != {want}  # without top_k the same requests sample


def test_top_p_0_is_greedy(client, model):
    want = _greedy(model, max_tokens=10).text
    for seed in (1, 2):
        reply = client.chat.completions.create(
            model="tiny-laptop", messages=MESSAGES, max_tokens=10, temperature=1.5, top_p=0, seed=seed
        )
        assert reply.choices[0].message.content == want


@pytest.mark.parametrize(
    "fields,runtime_names",
    [
        ({"presence_penalty": 2.0}, {"presence_penalty": 2.0}),
        ({"frequency_penalty": 1.5}, {"frequency_penalty": 1.5}),
        ({"repetition_penalty": 1.8}, {"repetition_penalty": 1.8}),
        ({"repeat_penalty": 1.8}, {"repetition_penalty": 1.8}),  # llama.cpp's name
    ],
)
def test_penalties_as_the_runtime_applies_them(client, model, fields, runtime_names):
    want = _greedy(model, max_tokens=24, **runtime_names)
    plain = _greedy(model, max_tokens=24)
    assert want.token_ids != plain.token_ids  # the penalty changes this reply: the test can fail
    reply = client.chat.completions.create(
        model="tiny-laptop", messages=MESSAGES, max_tokens=24, temperature=0, extra_body=fields
    )
    assert reply.choices[0].message.content == want.text


def test_stop_string_or_list_and_max_completion_tokens(client, model):
    prompt = "The capital of France is"
    full = model.generate(prompt, max_new_tokens=12, temperature=0.0).text
    cut = full[len(full) // 2 : len(full) // 2 + 2]
    assert cut.strip() and "\ufffd" not in full
    for stop in (cut, [cut, "\u2603"]):
        reply = client.completions.create(model="tiny-laptop", prompt=prompt, max_tokens=12, temperature=0, stop=stop)
        assert reply.choices[0].text == full[: full.index(cut)]
    reply = client.chat.completions.create(
        model="tiny-laptop", messages=MESSAGES, max_completion_tokens=3, temperature=0
    )
    assert reply.usage.completion_tokens == 3 and reply.choices[0].finish_reason == "length"


# -- refusals --------------------------------------------------------------------------------------
OUT_OF_RANGE = [
    ("temperature", 2.5),
    ("temperature", -0.1),
    ("top_p", 1.5),
    ("top_p", -0.1),
    ("presence_penalty", 2.5),
    ("frequency_penalty", -3),
    ("top_logprobs", 21),
    ("logprobs", "yes"),
    ("n", 2),
    ("min_p", 1.5),
    ("top_k", -5),
    ("repetition_penalty", 0),
    ("repeat_penalty", 3),
    ("max_completion_tokens", 0),
    ("max_tokens", -1),
    ("seed", "x"),
    ("stop", ["a", "b", "c", "d", "e"]),
    ("logit_bias", {"abc": 5}),
    ("logit_bias", {"1": 101}),
    ("logit_bias", {"99999999": 1}),
    ("logit_bias", [1, 2]),
    ("cache_prompt", "no"),
]


@pytest.mark.parametrize("field,value", OUT_OF_RANGE, ids=[f"{f}={v!r}" for f, v in OUT_OF_RANGE])
def test_out_of_range_is_400_naming_the_field(server, field, value):
    body = {"messages": MESSAGES, "max_tokens": 2, field: value}
    if field == "top_logprobs":
        body["logprobs"] = True
    answer = _raw(server, body)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == field and error["type"] == "invalid_request_error"
    assert field in error["message"]


UNIMPLEMENTED = [
    ("audio", {"voice": "alloy", "format": "wav"}),
    ("modalities", ["text", "audio"]),
    ("prediction", {"type": "content", "content": "x"}),
    ("web_search_options", {"search_context_size": "low"}),
    ("service_tier", "flex"),
    ("store", True),
    ("metadata", {"a": "b"}),
    ("reasoning_effort", "low"),
    ("functions", [{"name": "f", "parameters": {}}]),
    ("function_call", "auto"),
]


@pytest.mark.parametrize("field,value", UNIMPLEMENTED, ids=[f for f, _ in UNIMPLEMENTED])
def test_an_unimplemented_openai_field_is_400_naming_it(server, field, value):
    answer = _raw(server, {"messages": MESSAGES, "max_tokens": 2, field: value})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == field and error["code"] == "unsupported_parameter"
    assert f"'{field}' is not supported" in error["message"]


def test_fields_that_ask_for_nothing_and_foreign_fields_are_accepted(server):
    for extra in ({"store": False}, {"service_tier": "auto"}, {"modalities": ["text"]}, {"user": "u1"}, {"foo": 1}):
        answer = _raw(server, {"messages": MESSAGES, "max_tokens": 2, **extra})
        assert answer.status_code == 200, (extra, answer.text)


@pytest.mark.parametrize("field,value", [("logprobs", 6), ("best_of", 2), ("suffix", "end"), ("n", 3), ("echo", "yes")])
def test_completions_refusals(server, field, value):
    answer = _raw(server, {"prompt": "Hello", "max_tokens": 2, field: value}, "/v1/completions")
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == field
    both = _raw(server, {"prompt": "Hello", "echo": True, "logprobs": 1}, "/v1/completions")
    assert both.status_code == 400 and both.json()["error"]["param"] == "echo"


# -- prefix reuse per request ----------------------------------------------------------------------
def test_cache_prompt_false_reuses_nothing(server):
    body = {"messages": MESSAGES, "max_tokens": 2, "temperature": 0}
    _raw(server, body)
    reused = _raw(server, body).json()["timings"]["prompt_reused"]
    assert reused > 0
    fresh = _raw(server, {**body, "cache_prompt": False}).json()
    assert fresh["timings"]["prompt_reused"] == 0


# -- /tokenize, /detokenize ------------------------------------------------------------------------
def test_tokenize_round_trip(server, model):
    text = "The capital of France is Paris."
    tokens = _raw(server, {"content": text}, "/tokenize").json()["tokens"]
    assert tokens == model.tokenizer.encode(text, add_special_tokens=False).ids and len(tokens) > 3
    assert _raw(server, {"tokens": tokens}, "/detokenize").json() == {"content": text}
    pieces = _raw(server, {"content": text, "with_pieces": True}, "/tokenize").json()["tokens"]
    assert [p["id"] for p in pieces] == tokens and "".join(p["piece"] for p in pieces) == text
    bad = _raw(server, {"tokens": [1, -1]}, "/detokenize")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert _raw(server, {"content": 5}, "/tokenize").json()["error"]["param"] == "content"


# -- the Python API --------------------------------------------------------------------------------
def test_python_api_takes_the_same_names(model):
    full = model.generate("The capital of France is", max_new_tokens=12).text
    cut = full[4:6]
    assert model.generate("The capital of France is", max_new_tokens=12, stop=cut).text == full[: full.index(cut)]
    plain = model.generate("The capital", max_new_tokens=20)
    penalised = model.generate("The capital", max_new_tokens=20, frequency_penalty=2.0, presence_penalty=1.0)
    assert penalised.token_ids != plain.token_ids
    same = model.generate("The capital", max_new_tokens=8, temperature=1.5, top_k=1, min_p=0.5, seed=4)
    assert same.token_ids == plain.token_ids[:8]
    streamed = list(model.stream(model.encode("The capital"), max_new_tokens=3, top_logprobs=4))
    assert all(len(r.top_logprobs) == 4 and r.top_logprobs[0][0] == r.token for r in streamed)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"presence_penalty": 3}, "--presence-penalty is 3; it must be in [-2, 2]"),
        ({"min_p": -1}, "--min-p is -1; it must be in [0, 1] (0: off)"),
        ({"logit_bias": {"5": 1}}, "logit_bias key '5' is not a token id; use 0 or a positive integer"),
        ({"logit_bias": {5: 200}}, "logit_bias[5] is 200; it must be a number in [-100, 100]"),
        ({"logit_bias": {10**9: 1}}, "logit_bias names token 1000000000; the model's vocabulary has ids 0 to"),
        ({"temprature": 1}, "unknown sampling option 'temprature'; use temperature, top_k"),
        ({"top_k": 1.5}, "--top-k is 1.5; give an integer"),
        ({"stop": 5}, "stop is 5; give a string or a list of strings"),
        ({"top_logprobs": 30}, "top_logprobs is 30; give an integer from 0 to 20"),
    ],
)
def test_python_api_bad_values_are_one_line(model, kwargs, message):
    with pytest.raises(EdgeSlmError) as caught:
        model.generate("The capital", max_new_tokens=2, **kwargs)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_sampler_applies_openai_penalty_formula():
    """mu[j] - c[j] * frequency_penalty - (c[j] > 0) * presence_penalty, on the reply's tokens."""
    from edge_slm.runtime.sampling import Sampler, SamplingConfig

    logits = np.array([5.0, 4.5, 4.2, 0.0], dtype=np.float32)
    frequency = Sampler(SamplingConfig.of(frequency_penalty=1.0))
    # each pick costs 1: 5 -> 4 (4.5 wins), 4.5 -> 3.5 (4.2 wins), 4.2 -> 3.2 (4 wins), 4 -> 3 (3.5 wins)
    assert [frequency(logits, []) for _ in range(5)] == [0, 1, 2, 0, 1]
    presence = Sampler(SamplingConfig.of(presence_penalty=0.9))
    # once only: 5 -> 4.1, 4.5 -> 3.6, 4.2 -> 3.3, and then 4.1 stays the best
    assert [presence(logits, []) for _ in range(6)] == [0, 1, 2, 0, 0, 0]
    narrow = [Sampler(SamplingConfig.of(temperature=1.5, min_p=0.9, seed=s))(logits, []) for s in range(40)]
    assert set(narrow) == {0}  # only the likeliest token has >= 0.9 of its probability
    wide = [Sampler(SamplingConfig.of(temperature=1.5, seed=s))(logits, []) for s in range(40)]
    assert len(set(wide)) > 1


# -- home-network options ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def guarded(tiny_bundle):
    proc, base = start_server(
        tiny_bundle,
        "--parallel",
        "1",
        "--api-key",
        "s3cret",
        "--cors-origin",
        "http://home.example:3000",
        "--alias",
        "home-model",
    )
    yield base
    _stop(proc)


def test_api_key_401_without_it_200_with_it(guarded):
    assert httpx.get(guarded + "/health").status_code == 200  # probes need no key
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        answer = _raw(guarded, {"messages": MESSAGES, "max_tokens": 2}, headers=headers)
        assert answer.status_code == 401
        assert answer.json()["error"]["code"] == "invalid_api_key"
        assert answer.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=guarded + "/v1", api_key="wrong", max_retries=0).models.list()
    good = OpenAI(base_url=guarded + "/v1", api_key="s3cret", max_retries=0)
    reply = good.chat.completions.create(model="home-model", messages=MESSAGES, max_tokens=2)
    assert reply.choices[0].message.content is not None
    assert httpx.get(guarded + "/metrics").status_code == 401


def test_api_key_from_the_environment(tiny_bundle, monkeypatch):
    monkeypatch.setenv("EDGE_SLM_API_KEY", "from-env")
    proc, base = start_server(tiny_bundle, "--parallel", "1")
    try:
        assert httpx.get(base + "/v1/models").status_code == 401
        ok = httpx.get(base + "/v1/models", headers={"Authorization": "Bearer from-env"})
        assert ok.status_code == 200
    finally:
        _stop(proc)


def test_cors_preflight_answered(guarded):
    preflight = {
        "Origin": "http://home.example:3000",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    answer = httpx.options(guarded + "/v1/chat/completions", headers=preflight)
    assert answer.status_code == 200  # answered before the key is asked for
    assert answer.headers["access-control-allow-origin"] == "http://home.example:3000"
    assert "POST" in answer.headers["access-control-allow-methods"]
    other = httpx.options(guarded + "/v1/chat/completions", headers={**preflight, "Origin": "http://evil.example"})
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    real = _raw(
        guarded,
        {"messages": MESSAGES, "max_tokens": 1},
        headers={"Origin": "http://home.example:3000", "Authorization": "Bearer s3cret"},
    )
    assert real.status_code == 200 and real.headers["access-control-allow-origin"] == "http://home.example:3000"


def test_alias_is_the_model_name(guarded):
    headers = {"Authorization": "Bearer s3cret"}
    listed = httpx.get(guarded + "/v1/models", headers=headers).json()["data"]
    assert [m["id"] for m in listed] == ["home-model"]
    wrong = _raw(guarded, {"model": "tiny-laptop", "messages": MESSAGES, "max_tokens": 1}, headers=headers)
    assert wrong.status_code == 404 and wrong.json()["error"]["code"] == "model_not_found"
    right = _raw(guarded, {"model": "home-model", "messages": MESSAGES, "max_tokens": 1}, headers=headers)
    assert right.status_code == 200 and right.json()["model"] == "home-model"


def test_accept_any_model(tiny_bundle):
    proc, base = start_server(tiny_bundle, "--parallel", "1", "--accept-any-model")
    try:
        for name in ("gpt-4o-mini", "tiny-laptop"):
            answer = _raw(base, {"model": name, "messages": MESSAGES, "max_tokens": 1})
            assert answer.status_code == 200, answer.text
    finally:
        _stop(proc)


# -- a bundle's sampling defaults -------------------------------------------------------------------
GENERATION_CONFIG = {"do_sample": True, "temperature": 1.3, "top_k": 1, "top_p": 0.9, "repetition_penalty": 1.8}


@pytest.fixture(scope="module")
def defaults_bundle(tiny_llama, tiny_profile, tmp_path_factory):
    from edge_slm.builder.pipeline import build
    from edge_slm.core.targets import load_profile

    source = tmp_path_factory.mktemp("with-generation-config") / "model"
    shutil.copytree(tiny_llama, source)
    config_file = source / "generation_config.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    config_file.write_text(json.dumps({**config, **GENERATION_CONFIG}))
    out = tmp_path_factory.mktemp("bundles") / "defaults"
    build(str(source), load_profile(str(tiny_profile)), out, echo=lambda m: None)
    return out


def test_the_manifest_records_the_models_sampling_settings(defaults_bundle, tiny_bundle):
    manifest = json.loads((defaults_bundle / "manifest.json").read_text())
    assert manifest["generation"]["sampling"] == {
        "temperature": 1.3,
        "top_p": 0.9,
        "top_k": 1,
        "repetition_penalty": 1.8,
    }
    assert "sampling" not in json.loads((tiny_bundle / "manifest.json").read_text())["generation"]
    shown = subprocess.run(
        [sys.executable, "-m", "edge_slm.cli", "inspect", str(defaults_bundle), "--no-checksums"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "sampling     temperature 1.3, top_p 0.9, top_k 1, repetition_penalty 1.8" in shown


def test_the_server_applies_the_bundles_defaults(defaults_bundle):
    model = runtime.load(defaults_bundle, threads=1)
    # The bundle's top_k 1 makes its temperature greedy; its repetition penalty 1.8 applies.
    want = _greedy(model, max_tokens=24, repetition_penalty=1.8)
    plain = _greedy(model, max_tokens=24)
    assert want.token_ids != plain.token_ids
    proc, base = start_server(defaults_bundle, "--parallel", "1")
    try:
        client = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        for seed in (1, 2):  # left out: the bundle's settings
            reply = client.chat.completions.create(model="tiny-laptop", messages=MESSAGES, max_tokens=24, seed=seed)
            assert reply.choices[0].message.content == want.text
        # given: the request's own (greedy, no penalty)
        reply = client.chat.completions.create(
            model="tiny-laptop", messages=MESSAGES, max_tokens=24, temperature=0, extra_body={"repetition_penalty": 1}
        )
        assert reply.choices[0].message.content == plain.text
    finally:
        _stop(proc)


def test_older_manifests_load_and_bad_defaults_are_refused(tiny_bundle):
    from edge_slm.core.errors import BundleError
    from edge_slm.core.manifest_schema import parse_manifest

    raw = json.loads((tiny_bundle / "manifest.json").read_text())
    assert dict(parse_manifest(raw, "m").sampling_defaults) == {}  # "generation" without "sampling"
    del raw["generation"]
    assert dict(parse_manifest(raw, "m").sampling_defaults) == {}  # no "generation" at all
    raw["generation"] = {"sampling": {"temperature": 7}}
    with pytest.raises(
        BundleError, match="manifest key 'generation.sampling.temperature' must be a number from 0 to 2"
    ):
        parse_manifest(raw, "m")


def test_status_errors_reach_the_openai_client(client):
    with pytest.raises(APIStatusError) as caught:
        client.chat.completions.create(model="tiny-laptop", messages=MESSAGES, max_tokens=2, presence_penalty=5)
    assert caught.value.status_code == 400 and caught.value.body["param"] == "presence_penalty"


def test_sampling_defaults_from_gguf_metadata_and_generation_config(tmp_path):
    """A GGUF's llama.cpp `general.sampling.*` keys and an HF folder's generation_config.json give
    the same names; values outside the server's ranges are left out; an unreadable file is one line."""
    import gguf

    from edge_slm.builder.decoder.load import GGUF_SAMPLING, LoadedModel, _checked_sampling, _gguf_metadata
    from edge_slm.builder.decoder.load import sampling_defaults as read_defaults
    from edge_slm.core.errors import ModelError

    path = tmp_path / "meta.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_float32("general.sampling.temp", 0.6)
    writer.add_float32("general.sampling.top_p", 0.95)
    writer.add_int32("general.sampling.top_k", 20)
    writer.add_float32("general.sampling.penalty_repeat", 5e9)  # out of range: left out
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    meta = _gguf_metadata(path)
    from_gguf = _checked_sampling({name: meta[key] for key, name in GGUF_SAMPLING.items() if key in meta})
    assert from_gguf == {"temperature": 0.6, "top_p": 0.95, "top_k": 20}
    assert read_defaults(LoadedModel(tmp_path, {"kind": "gguf", "sampling": from_gguf}, False)) == from_gguf
    assert read_defaults(LoadedModel(tmp_path, {"kind": "gguf"}, False)) == {}

    folder = tmp_path / "hf"
    folder.mkdir()
    loaded = LoadedModel(folder, {"kind": "hf-dir"}, False)
    assert read_defaults(loaded) == {}  # no generation_config.json
    (folder / "generation_config.json").write_text(json.dumps({"temperature": True, "top_p": 0.8, "top_k": -1}))
    assert read_defaults(loaded) == {"top_p": 0.8}
    (folder / "generation_config.json").write_text("{not json")
    with pytest.raises(ModelError, match="generation_config.json: cannot be read"):
        read_defaults(loaded)
