"""`edge-slm serve` under hostile clients, on a real uvicorn server on loopback: each attack that
once broke it, reproduced, with the refusal it now gets (status, OpenAI's error shape, the field
named), the time bound, and the server healthy afterwards. docs/security.md lists the limits.

A "slow" bundle (8 layers, 2,048-token context: ~7 ms a token on one thread) makes generation
last long enough for hang-ups, time limits and SIGTERM to matter."""

import json
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from conftest import make_model, start_server, write_profile

CHAT = "/v1/chat/completions"
ERROR_KEYS = {"message", "type", "param", "code"}


def _stop(proc):
    proc.terminate()
    proc.wait(timeout=20)


def _refused(response, status: int, fragment: str, param: str | None = "skip") -> dict:
    assert response.status_code == status, (response.status_code, response.text[:300])
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == ERROR_KEYS and fragment in error["message"], error
    assert "\n" not in error["message"]
    if param != "skip":
        assert error["param"] == param, error
    return error


@pytest.fixture(scope="module")
def slow_bundle(tmp_path_factory):
    from edge_slm.builder.pipeline import build
    from edge_slm.core.targets import load_profile

    root = tmp_path_factory.mktemp("slow")
    model = make_model(
        root / "model", hidden_size=256, intermediate_size=1024, num_hidden_layers=8, max_position_embeddings=2048
    )
    profile = write_profile(
        root / "slow-laptop.toml",
        "x86-laptop",
        "slow-laptop",
        export={"context_length": 2048},
        quantize={"precision": "fp32"},
    )
    out = root / "bundle"
    build(str(model), load_profile(str(profile)), out, echo=lambda m: None)
    return out


@pytest.fixture(scope="module")
def server(tiny_bundle):
    proc, base = start_server(tiny_bundle, "--keep-alive-seconds", "1")
    yield base
    _stop(proc)


# -- 1. a client that hangs up no longer holds the model ------------------------------------------
def test_abandoned_requests_free_the_model_at_once(slow_bundle):
    """9 non-streamed requests each abandoned after 0.3 s (`curl -m 0.3`): each would generate
    1,024 tokens (~7 s); the next request is served within seconds, not after a minute."""
    proc, base = start_server(slow_bundle)
    try:
        body = {"prompt": "1, 2, 3,", "temperature": 0}
        for _ in range(9):
            with pytest.raises(httpx.TimeoutException):
                httpx.post(base + "/v1/completions", json=body, timeout=0.3)
        started = time.monotonic()
        answer = httpx.post(base + "/v1/completions", json={**body, "max_tokens": 5}, timeout=60)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 5
        assert time.monotonic() - started < 4
        generated = _metric(base, "edge_slm_generated_tokens_total")
        assert generated < 9 * 200, generated  # the abandoned ones stopped early (uncancelled: 9 x 1,024)
    finally:
        _stop(proc)


def test_a_client_that_hangs_up_while_queued_frees_its_place_at_once(slow_bundle):
    """One stream holds the model; five requests queued behind it are abandoned: two more requests
    still find places in a queue of 2 (not 429), and are answered once the stream ends."""
    import threading

    # One running, two waiting; the stream's 2,000 tokens outlast the test's few seconds on any CPU here.
    proc, base = start_server(slow_bundle, "--max-queue", "2", "--parallel", "1", "--max-tokens", "2000")
    try:
        long = {"prompt": "1, 2, 3,", "temperature": 0, "max_tokens": 2000}
        with httpx.stream("POST", base + "/v1/completions", json={**long, "stream": True}, timeout=60) as held:
            lines = held.iter_lines()
            next(line for line in lines if line.startswith("data: {"))  # the model is busy with it
            for _ in range(5):
                with pytest.raises(httpx.TimeoutException):
                    httpx.post(base + "/v1/completions", json=long, timeout=0.3)
            answers = []
            short = {"prompt": "1, 2,", "temperature": 0, "max_tokens": 3}
            threads = [
                threading.Thread(
                    target=lambda: answers.append(httpx.post(base + "/v1/completions", json=short, timeout=60))
                )
                for _ in range(2)
            ]
            for thread in threads:
                thread.start()
            time.sleep(0.5)
            assert _metric(base, "edge_slm_queue_depth") == 2
        for thread in threads:  # leaving the stream cancels it
            thread.join(timeout=30)
        assert [a.status_code for a in answers] == [200, 200]
    finally:
        _stop(proc)


def _metric(base: str, name: str) -> float:
    for line in httpx.get(base + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not in /metrics")


def test_max_tokens_and_time_are_capped_by_the_server(slow_bundle):
    """Each cap on its own server, so that neither result depends on how fast this machine is."""
    proc, base = start_server(slow_bundle, "--max-tokens", "20", "--request-seconds", "600", "--parallel", "1")
    try:
        reply = httpx.post(base + "/v1/completions", json={"prompt": "1, 2, 3,", "temperature": 0, "max_tokens": 2000})
        assert reply.status_code == 200 and reply.json()["choices"][0]["finish_reason"] == "length"
        assert reply.json()["usage"]["completion_tokens"] == 20  # the server's cap, not the client's 2000
        short = httpx.post(base + "/v1/completions", json={"prompt": "1, 2,", "temperature": 0, "max_tokens": 7})
        assert short.json()["usage"]["completion_tokens"] == 7  # a smaller request is honoured
    finally:
        _stop(proc)
    # 1,900 tokens take this 8-layer bundle well over a second on any CPU this runs on.
    proc, base = start_server(slow_bundle, "--max-tokens", "1900", "--request-seconds", "1", "--parallel", "1")
    try:
        started = time.monotonic()
        reply = httpx.post(base + "/v1/completions", json={"prompt": "1, 2, 3,", "temperature": 0, "max_tokens": 1900})
        took = time.monotonic() - started
        assert reply.status_code == 200 and reply.json()["choices"][0]["finish_reason"] == "length"
        tokens = reply.json()["usage"]["completion_tokens"]
        assert 0 < tokens < 1900 and took < 10, (tokens, took)  # stopped by the 1 s limit, long before the cap
    finally:
        _stop(proc)


def test_the_caps_come_from_the_flags_then_the_profile_then_the_defaults():
    from edge_slm.core.targets import load_profile
    from edge_slm.serve.limits import Limits

    rpi4 = load_profile("rpi4").runtime
    assert (Limits().resolved(rpi4).max_tokens, Limits().resolved(rpi4).request_seconds) == (256, 300.0)
    flagged = Limits(max_tokens=9, request_seconds=2.5).resolved(rpi4)
    assert (flagged.max_tokens, flagged.request_seconds) == (9, 2.5)
    as_in_a_manifest = {"serve_max_tokens": 64, "serve_request_seconds": 30}
    assert Limits().resolved(as_in_a_manifest).max_tokens == 64
    older_bundle = {"threads": 2, "execution_providers": ["CPUExecutionProvider"]}  # built before the keys
    assert (Limits().resolved(older_bundle).max_tokens, Limits().resolved(older_bundle).request_seconds) == (512, 120.0)


# -- 2. no request freezes the event loop or exhausts memory ---------------------------------------
def test_ten_thousand_messages_are_refused_at_once(server):
    messages = [{"role": "user", "content": "hi " * 10} for _ in range(10_000)]
    started = time.monotonic()
    _refused(httpx.post(server + CHAT, json={"messages": messages}), 400, "'messages' has 10,000 messages", "messages")
    assert time.monotonic() - started < 2


def test_chat_encoding_is_linear_in_the_messages(tiny_bundle):
    """5,000 messages through the chat template and the tokenizer: well under 2 s (the encoding
    that once scanned every segment for every message's marker took ~20 s)."""
    from edge_slm import runtime

    model = runtime.load(tiny_bundle, threads=1)
    messages = [{"role": "user", "content": f"hello {i} there"} for i in range(5000)]
    started = time.monotonic()
    ids = model.encode_chat(messages)
    assert len(ids) > 50_000 and time.monotonic() - started < 2


def test_text_that_cannot_fit_the_context_is_refused_before_tokenization(server):
    """The tiny model: 128 tokens, none longer than 13 characters: 5,000 characters cannot fit."""
    messages = [{"role": "user", "content": "word " * 500}, {"role": "user", "content": "word " * 500}]
    error = _refused(httpx.post(server + CHAT, json={"messages": messages}), 400, "'messages' has 5,000 characters")
    assert (
        error["code"] == "context_length_exceeded"
        and "context is 128 tokens of at most 13 characters" in error["message"]
    )
    _refused(httpx.post(server + "/v1/completions", json={"prompt": "x" * 4000}), 400, "'prompt' has 4,000", "prompt")
    assert httpx.get(server + "/health").json()["status"] == "ok"


def test_a_large_body_is_413_before_it_is_read(server):
    """A 200 MB body is refused from its Content-Length; nothing of it needs to arrive."""
    port = int(server.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        head = f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 200000000\r\n\r\n"
        sock.sendall(head.encode() + b'{"messages": [')
        reply = _read_http(sock)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    error = json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]
    assert error["code"] == "request_too_large" and "200,000,000 bytes" in error["message"]


def test_a_chunked_body_over_the_limit_is_413(server):
    def chunks():
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(3):
            yield b"x" * 1_000_000

    _refused(
        httpx.post(server + CHAT, content=chunks(), headers={"content-type": "application/json"}),
        413,
        "this server takes at most 2,097,152",
    )


def test_a_message_over_the_text_limit_is_400_naming_it(server):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "x" * 1_000_000}]
    _refused(
        httpx.post(server + CHAT, json={"messages": messages}), 400, "is 1,000,000 characters", "messages[1].content"
    )


def test_a_body_sent_a_byte_at_a_time_is_408(tiny_bundle):
    """The body's time limit (30 s by default; 1 s here, on a uvicorn server in this process)."""
    import threading

    import uvicorn

    from edge_slm.serve.app import create_app
    from edge_slm.serve.limits import Limits
    from edge_slm.serve.server import Server, listen

    app = create_app(tiny_bundle, threads=1, load_in_background=False, limits=Limits(body_seconds=1.0))
    listener = listen("127.0.0.1", 0)
    port = listener.getsockname()[1]
    server = Server(uvicorn.Config(app, log_level="warning"), app.state.service)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(
                f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n".encode()
            )
            started = time.monotonic()
            sock.sendall(b'{"mess')  # and nothing more
            reply = _read_http(sock)
        assert reply.startswith(b"HTTP/1.1 408") and 1 <= time.monotonic() - started < 3, reply[:100]
        assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _read_http(sock) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
        part = sock.recv(65536)
        if not part:
            break
        data += part
    return data


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def test_large_embedding_inputs_are_refused_before_the_encoder(embedder_bundles):
    proc, base = start_server(embedder_bundles[0], "--keep-alive-seconds", "1")
    try:
        started = time.monotonic()
        big = ["word " * 200_000] * 20  # 20 x 1 MB
        _refused(httpx.post(base + "/v1/embeddings", json={"input": big}), 413, "bytes; this server takes at most")
        _refused(
            httpx.post(base + "/v1/embeddings", json={"input": ["hello", "x" * 100_000]}),
            400,
            "'input[1]' is 100,000 characters",
            "input[1]",
        )
        raw = b'{"input": ["hello", "bad \\ud800"]}'
        response = httpx.post(base + "/v1/embeddings", content=raw, headers={"content-type": "application/json"})
        _refused(response, 400, "lone surrogate", "input[1]")
        assert time.monotonic() - started < 3
        assert httpx.post(base + "/v1/embeddings", json={"input": ["hello"]}).status_code == 200
    finally:
        _stop(proc)


# -- 3. no 500s, and nothing a web page may send cross-site ----------------------------------------
def test_deep_nesting_is_400(server):
    deep = b'{"messages": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    _refused(httpx.post(server + CHAT, content=deep, headers={"content-type": "application/json"}), 400, "nests deeper")
    value = "x"
    for _ in range(62):
        value = [value]
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "client_data": {"a": value}}
    assert httpx.post(server + CHAT, json=body).status_code == 200  # 64 levels: taken
    body["client_data"]["a"] = [value]
    _refused(httpx.post(server + CHAT, json=body), 400, "'client_data.a" + "[0]" * 62 + "' nests deeper than 64 levels")


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', "messages[0].content"),
        (b'{"prompt": "\\udfff"}', "prompt"),
        (b'{"messages": [{"role": "user", "content": "hi", "\\ud800": 1}]}', "messages[0].\\ud800"),
    ],
)
def test_lone_surrogates_are_400_naming_the_field(server, raw, param):
    route = "/v1/completions" if b"prompt" in raw else CHAT
    response = httpx.post(server + route, content=raw, headers={"content-type": "application/json"})
    _refused(response, 400, "lone surrogate", param)


def test_surrogate_pairs_and_invalid_utf8(server):
    pair = b'{"prompt": "smile \\ud83d\\ude00", "max_tokens": 2}'
    assert (
        httpx.post(server + "/v1/completions", content=pair, headers={"content-type": "application/json"}).status_code
        == 200
    )
    bad = b'{"prompt": "caf\xe9"}'
    response = httpx.post(server + "/v1/completions", content=bad, headers={"content-type": "application/json"})
    _refused(response, 400, "not valid UTF-8 (byte 15)")


@pytest.mark.parametrize(
    "headers", [{"content-type": "text/plain"}, {"content-type": "application/x-www-form-urlencoded"}, {}]
)
def test_only_json_bodies_are_taken(server, headers):
    body = json.dumps({"prompt": "hi", "max_tokens": 2}).encode()
    response = httpx.post(server + "/v1/completions", content=body, headers=headers)
    _refused(response, 415, "send 'application/json'")


def test_unknown_routes_and_wrong_methods_in_openai_shape(server):
    assert (
        _refused(httpx.get(server + "/v1/nothing"), 404, "there is no route '/v1/nothing'")["code"] == "unknown_route"
    )
    wrong = httpx.get(server + CHAT)
    assert _refused(wrong, 405, "GET is not allowed on /v1/chat/completions; use POST")["code"] == "method_not_allowed"
    _refused(httpx.post(server + "/health"), 405, "POST is not allowed on /health")


# -- connections: idle ones are closed, and their number is capped ---------------------------------
def test_silent_and_idle_connections_are_closed(server):
    port = int(server.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as silent:
        started = time.monotonic()
        assert silent.recv(1) == b""  # closed by the server, having sent nothing
        assert time.monotonic() - started < 3
    with socket.create_connection(("127.0.0.1", port), timeout=5) as idle:
        idle.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"200 OK" in _read_http(idle)
        started = time.monotonic()
        assert idle.recv(1) == b"" and time.monotonic() - started < 3


def test_connections_beyond_the_cap_get_503(tiny_bundle):
    proc, base = start_server(tiny_bundle, "--max-connections", "2", "--keep-alive-seconds", "5")
    port = int(base.rsplit(":", 1)[1])
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
    try:
        time.sleep(0.2)
        busy = httpx.get(base + "/health")
        assert busy.status_code == 503 and busy.json()["error"]["code"] == "too_many_connections"
        assert "2 connections open (--max-connections)" in busy.json()["error"]["message"]
        for sock in held:
            sock.close()
        time.sleep(0.2)
        assert httpx.get(base + "/health").status_code == 200
    finally:
        _stop(proc)


# -- 4. SIGTERM, a busy port, a bundle changed on disk --------------------------------------------
def test_sigterm_exits_within_5_s_with_jobs_running_and_queued(slow_bundle):
    # One running, the others queued; 2,000 tokens each outlast the test's seconds on any CPU here.
    proc, base = start_server(slow_bundle, "--parallel", "1", "--max-tokens", "2000")
    body = {"prompt": "1, 2, 3,", "temperature": 0, "max_tokens": 2000}
    bodies = [
        body,
        {**body, "stream": True},
        body,
        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 900},
    ]
    clients = [
        subprocess.Popen(
            ["curl", "-s", "-m", "60", "-H", "content-type: application/json", "-d", json.dumps(b), base + path],
            stdout=subprocess.DEVNULL,
        )
        for b, path in zip(bodies, ["/v1/completions"] * 3 + [CHAT])
    ]
    try:
        time.sleep(1.0)  # one running, three waiting
        assert _metric(base, "edge_slm_queue_depth") >= 2
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=10)
        assert time.monotonic() - started < 5
        assert code == 130 and proc.stderr.read().decode().splitlines()[-1] == "interrupted"  # the CLI's convention
    finally:
        for client in clients:
            client.kill()
            client.wait()
        if proc.poll() is None:
            proc.kill()


def test_a_busy_port_is_one_line_and_exit_2(tiny_bundle):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "edge_slm.cli", "serve", str(tiny_bundle), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 2 and "serving" not in done.stderr
    assert done.stderr.strip() == (
        f"error: cannot listen on 127.0.0.1:{port}: Address already in use: stop what is using it or pick another --port"
    ), done.stderr


def test_a_bundle_changed_after_start_up_stops_the_server(tiny_bundle, tmp_path):
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    proc, base = start_server(bundle)
    try:
        data = bundle / "model.onnx.data"
        raw = bytearray(data.read_bytes())
        raw[100] ^= 0xFF  # the same size, another byte: only the sha256 tells
        data.write_bytes(bytes(raw))
        code = proc.wait(timeout=10)
        lines = [line for line in proc.stderr.read().decode().splitlines() if not line.startswith("serving")]
        assert code == 1 and len(lines) == 1, lines
        assert (
            "the bundle changed on disk after start-up and fails its checks" in lines[0]
            and "model.onnx.data" in lines[0]
        )
    finally:
        if proc.poll() is None:
            proc.kill()


def test_weights_truncated_under_a_running_completion_leave_a_log_line(slow_bundle, tmp_path):
    """onnxruntime memory-maps the weights: a file truncated under it is a bus error (the
    kernel's, not catchable). The process still ends non-zero (systemd restarts it) and says why."""
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(slow_bundle, bundle)
    proc, base = start_server(bundle, "--max-tokens", "2000")
    body = json.dumps({"prompt": "1, 2, 3,", "max_tokens": 2000})
    client = subprocess.Popen(
        ["curl", "-s", "-m", "30", "-H", "content-type: application/json", "-d", body, base + "/v1/completions"],
        stdout=subprocess.DEVNULL,
    )
    try:
        time.sleep(1.0)
        (bundle / "model.onnx.data").write_bytes(b"")
        code = proc.wait(timeout=10)
        log = proc.stderr.read().decode()
        assert code != 0
        assert "Fatal Python error: Bus error" in log or "the bundle changed on disk after start-up" in log, log
    finally:
        client.kill()
        client.wait()
        if proc.poll() is None:
            proc.kill()


def test_a_bundle_that_fails_to_load_is_logged_and_exits_1(tiny_bundle, tmp_path):
    """`serve` checks sizes before it starts; the sha256s are checked as the model loads, in the
    background: a bundle that fails there once stayed up with /health 500 and nothing logged."""
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    data = bundle / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[7] ^= 0xFF
    data.write_bytes(bytes(raw))
    proc, base = start_server(bundle, expect_healthy=False)
    code = proc.wait(timeout=30)
    lines = [line for line in proc.stderr.read().decode().splitlines() if not line.startswith("serving")]
    assert (
        code == 1
        and len(lines) == 1
        and lines[0].endswith("model.onnx.data: checksum mismatch (the file is corrupt): copy it again or rebuild")
    ), lines


# -- 8. the KV cache tells no client about another's prompt ----------------------------------------
def test_prompt_reuse_stays_within_one_api_key(server):
    secret = [{"role": "system", "content": "The password is swordfish. Never say it."}]
    question = [{"role": "user", "content": "Hi"}]

    def reused(key: str) -> int:
        headers = {"authorization": f"Bearer {key}"}
        reply = httpx.post(server + CHAT, json={"messages": secret + question, "max_tokens": 1}, headers=headers)
        return reply.json()["timings"]["prompt_reused"]

    reused("victim")
    assert reused("attacker") == 0  # the same prompt, another key: computed afresh, nothing reported
    assert reused("attacker") > 10  # its own earlier request: reused
    assert reused("victim") == 0


def test_a_shared_prefix_cache_is_an_opt_in(tiny_bundle):
    proc, base = start_server(tiny_bundle, "--share-prefix-cache")
    try:
        body = {"prompt": "The capital of France is Paris. The capital of Italy is", "max_tokens": 1}
        httpx.post(base + "/v1/completions", json=body, headers={"authorization": "Bearer a"})
        reply = httpx.post(base + "/v1/completions", json=body, headers={"authorization": "Bearer b"})
        assert reply.json()["timings"]["prompt_reused"] > 5
    finally:
        _stop(proc)


def test_the_server_is_healthy_after_all_this(server):
    assert httpx.get(server + "/health").json()["status"] == "ok"
    reply = httpx.post(server + CHAT, json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] <= 3
