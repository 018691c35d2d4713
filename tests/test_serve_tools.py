"""Structured output and tool calls through `edge-slm serve` (edge_slm/serve/tools.py): a real server
driven by the openai client and LangChain, with both engines (`--parallel 1`: one request at a time;
`--parallel 2`: continuous batching). On a tiny random model with a long context, replies valid by
construction (jsonschema over 30 sampled replies, calls of the given functions), streamed calls
reassembling to the whole reply's, tool turns through the chat template, 400s naming the field, and
the grammar state and KV cache consistent across a cancelled request and a reused prefix. On the
default model (e2e), `tool_choice: auto` writes a sensible call for a home command and text for a
question."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import httpx
import jsonschema
import pytest
from conftest import REPO, make_model, start_server, write_profile
from openai import OpenAI

from edge_slm import runtime
from edge_slm.core.data import DATA_DIR
from edge_slm.runtime import chat_template
from edge_slm.serve import tools as serve_tools

SCHEMA = {
    "type": "object",
    "properties": {
        "room": {"type": "string", "enum": ["kitchen", "bedroom", "living_room"]},
        "level": {"type": "integer", "minimum": 0, "maximum": 100},
        "on": {"type": "boolean"},
        "note": {"type": "string", "maxLength": 6},
    },
    "required": ["room", "level", "on"],
    "additionalProperties": False,
}
SMARTHOME = json.loads((DATA_DIR / "smarthome" / "tools.json").read_text())


def _tool(name: str, properties: dict) -> dict:
    parameters = {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }
    return {
        "type": "function",
        "function": {"name": name, "description": f"{name} in a room", "parameters": parameters},
    }


# Small argument spaces (enums, bounded integers, booleans): a random model's calls end soon.
TOOLS = [
    _tool("set_lights", {"room": SCHEMA["properties"]["room"], "on": {"type": "boolean"}}),
    _tool(
        "set_temperature",
        {"room": SCHEMA["properties"]["room"], "celsius": {"type": "integer", "minimum": 10, "maximum": 30}},
    ),
]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "Quantization stores weights in eight bits."}]


@pytest.fixture(scope="module")
def tool_bundle(tmp_path_factory):
    """The tiny Llama with 2048 positions, built with a 2048-token context: room for the tool
    descriptions the server writes into the system message."""
    from edge_slm.builder.pipeline import build
    from edge_slm.core.targets import load_profile

    root = tmp_path_factory.mktemp("tools")
    source = make_model(root / "model", "llama", max_position_embeddings=2048)
    profile = write_profile(
        root / "long.toml", "x86-laptop", "tiny-long", export={"context_length": 2048}, quantize={"precision": "fp32"}
    )
    build(str(source), load_profile(str(profile)), root / "bundle", echo=lambda m: None)
    return root / "bundle"


@pytest.fixture(scope="module")
def model(tool_bundle):
    return runtime.load(tool_bundle, threads=1)


@pytest.fixture(scope="module", params=[1, 2], ids=["one-at-a-time", "batched"])
def server(request, tool_bundle):
    proc, base = start_server(tool_bundle, "--parallel", str(request.param))
    yield base
    proc.terminate()
    proc.wait(timeout=20)


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def _chat(client, **params):
    return client.chat.completions.create(model="tiny-long", **params)


# -- response_format ----------------------------------------------------------------------------


def test_json_schema_replies_always_parse_and_validate(client):
    """30 prompts sampled at temperature 1.0: every reply parses and validates, and ends because
    the JSON is complete (finish_reason stop), never cut."""
    rng = random.Random(0)
    words = "the kitchen lights bedroom warm cold small models run on a pi quantize weights".split()
    form = {"type": "json_schema", "json_schema": {"name": "room", "schema": SCHEMA, "strict": True}}
    for n in range(30):
        prompt = " ".join(rng.choices(words, k=rng.randint(3, 12)))
        reply = _chat(
            client,
            messages=[{"role": "user", "content": prompt}],
            response_format=form,
            temperature=1.0,
            seed=n,
            max_tokens=100,
        )
        choice = reply.choices[0]
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
        assert choice.finish_reason == "stop", (prompt, choice.message.content)


def test_json_object_parses_and_text_is_unconstrained(client):
    """json_object: an object (a random model may write a long number: a reply cut by max_tokens
    is a prefix of one); text: the same as no response_format."""
    finished = 0
    for seed in range(6):
        reply = _chat(
            client, messages=ASK, response_format={"type": "json_object"}, temperature=1.0, seed=seed, max_tokens=60
        )
        content = reply.choices[0].message.content
        assert content.startswith("{")
        if reply.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(content), dict)
            finished += 1
    assert finished
    plain = _chat(client, messages=ASK, temperature=0, max_tokens=12).choices[0].message.content
    text = _chat(client, messages=ASK, response_format={"type": "text"}, temperature=0, max_tokens=12)
    assert text.choices[0].message.content == plain


def test_completions_take_response_format(server):
    body = {"prompt": "The capital of France", "max_tokens": 100, "temperature": 0}
    body["response_format"] = {"type": "json_schema", "json_schema": {"name": "room", "schema": SCHEMA}}
    reply = httpx.post(server + "/v1/completions", json=body, timeout=60).json()
    jsonschema.validate(json.loads(reply["choices"][0]["text"]), SCHEMA)


@pytest.mark.parametrize(
    "fields, param, fragment",
    [
        (
            {"response_format": {"type": "bogus"}},
            "response_format",
            "'bogus'; use 'text', 'json_object' or 'json_schema'",
        ),
        ({"response_format": "json"}, "response_format", "must be an object with a 'type'"),
        ({"response_format": {"type": "json_schema"}}, "response_format", "with a 'name' and a 'schema'"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
            "response_format",
            "cannot be used",
        ),
        ({"tools": [{"type": "function"}]}, "tools", "tools[0] must be {'type': 'function'"),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools", "letters, digits"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "fly"}}}, "tool_choice", "'fly'"),
        ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice", "'auto', 'required', 'none'"),
        ({"tool_choice": "required"}, "tool_choice", "has no 'tools'"),
        ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls", "true or false"),
        ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format", "cannot both constrain"),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "x", "arguments": "{"}}]},
                ]
            },
            "messages[1]",
            "'arguments' is not JSON",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {
                        "role": "assistant",
                        "tool_calls": [{"id": "c", "function": {"name": "x<|im_end|>", "arguments": "{}"}}],
                    },
                ]
            },
            "messages[1]",
            "spells the control token '<|im_end|>'",
        ),
    ],
)
def test_bad_fields_are_400_naming_them(server, fields, param, fragment):
    body = {"messages": ASK, "max_tokens": 4, **fields}
    answer = httpx.post(server + "/v1/chat/completions", json=body, timeout=30)
    error = answer.json()["error"]
    assert answer.status_code == 400 and error["param"] == param and error["type"] == "invalid_request_error"
    assert fragment in error["message"]


def test_a_tool_choice_function_that_is_not_an_object_is_400(server):
    body = {"messages": ASK, "max_tokens": 4, "tools": TOOLS}
    body["tool_choice"] = {"type": "function", "function": "set_lights"}
    answer = httpx.post(server + "/v1/chat/completions", json=body, timeout=30)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "tool_choice"


def test_completions_refuse_tools(server):
    body = {"prompt": "hi", "max_tokens": 4, "tools": TOOLS}
    answer = httpx.post(server + "/v1/completions", json=body, timeout=30)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "tools"


# -- tool calls ---------------------------------------------------------------------------------


def _valid_call(call) -> dict:
    assert call.type == "function" and call.id.startswith("call_") and len(call.id) > 10
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, PARAMETERS[call.function.name])
    return {"name": call.function.name, "arguments": arguments}


@pytest.mark.parametrize("seed", range(4))
def test_required_is_one_valid_call_of_a_given_function(client, seed):
    reply = _chat(
        client,
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=1.0,
        seed=seed,
        max_tokens=200,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert len(choice.message.tool_calls) == 1
    _valid_call(choice.message.tool_calls[0])


def test_a_named_function_is_called(client):
    choice = {"type": "function", "function": {"name": "set_temperature"}}
    reply = _chat(client, messages=ASK, tools=TOOLS, tool_choice=choice, temperature=1.0, seed=3, max_tokens=200)
    calls = reply.choices[0].message.tool_calls
    assert reply.choices[0].finish_reason == "tool_calls" and [c.function.name for c in calls] == ["set_temperature"]
    _valid_call(calls[0])


def test_parallel_calls_are_each_valid(client):
    """parallel_tool_calls left true: any number of calls, each valid (the last may be cut by max_tokens)."""
    reply = _chat(client, messages=ASK, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=160)
    calls = reply.choices[0].message.tool_calls
    complete = calls if reply.choices[0].finish_reason == "tool_calls" else calls[:-1]
    assert len(calls) >= 1 and all(_valid_call(c) for c in complete)


def test_none_and_auto_on_a_model_that_does_not_call(client):
    """tool_choice none: plain text, the tools not in the prompt; auto: the random model writes text
    (no <tool_call>), which comes back as content with no calls."""
    plain = _chat(client, messages=ASK, temperature=0, max_tokens=16)
    none = _chat(client, messages=ASK, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=16)
    assert none.choices[0].message.content == plain.choices[0].message.content
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens
    auto = _chat(client, messages=ASK, tools=TOOLS, temperature=0, max_tokens=16)
    assert auto.choices[0].message.tool_calls is None and auto.choices[0].message.content
    assert auto.usage.prompt_tokens > plain.usage.prompt_tokens + 100  # the tools are described


def _streamed(client, **params) -> tuple[list, list, str]:
    chunks = list(_chat(client, stream=True, **params))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls: dict[int, dict] = {}
    for delta in deltas:
        for piece in delta.tool_calls or []:
            if piece.index not in calls:  # the first delta of a call names it
                assert piece.id.startswith("call_") and piece.function.name and piece.function.arguments == ""
                calls[piece.index] = {"id": piece.id, "name": piece.function.name, "arguments": ""}
            else:
                assert piece.id is None and piece.function.name is None
                calls[piece.index]["arguments"] += piece.function.arguments
    return deltas, [calls[i] for i in sorted(calls)], chunks[-1].choices[0].finish_reason


def test_streamed_calls_reassemble_to_the_same_calls(client):
    params = dict(messages=ASK, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=160)
    whole = _chat(client, parallel_tool_calls=False, **params).choices[0]
    deltas, calls, finish = _streamed(client, parallel_tool_calls=False, **params)
    expected = whole.message.tool_calls[0]
    assert [(c["name"], c["arguments"]) for c in calls] == [(expected.function.name, expected.function.arguments)]
    assert finish == "tool_calls" and not any(d.content for d in deltas)
    assert sum(bool(d.tool_calls) for d in deltas) > 3  # the arguments come in pieces
    # Several calls: the same as the whole reply too.
    whole = _chat(client, **params).choices[0]
    _, calls, finish = _streamed(client, **params)
    assert [(c["name"], c["arguments"]) for c in calls] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls
    ]
    assert finish == whole.finish_reason


def test_tool_call_stream_splits_anywhere():
    """The stream reader gives the same content and calls whatever the pieces' boundaries."""
    text = (
        'Sure.<tool_call>\n{"name": "set_lights", "arguments": {"room": "kitchen", "on": true}}\n</tool_call>\n'
        '<tool_call>\n{"name": "set_temperature", "arguments": {"room": "bedroom", "celsius": 21}}\n</tool_call>'
    )
    content, calls = serve_tools.read_reply(text)
    assert content == "Sure." and [c["function"]["name"] for c in calls] == ["set_lights", "set_temperature"]
    assert json.loads(calls[1]["function"]["arguments"]) == {"room": "bedroom", "celsius": 21}
    rng = random.Random(1)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, 30)))
        stream, events = serve_tools.ToolCallStream(), []
        for a, b in zip([0, *cuts], [*cuts, len(text)]):
            events += stream.push(text[a:b])
        events += stream.finish()
        assert "".join(e[1] for e in events if e[0] == "content") == "Sure."
        arguments = ["", ""]
        for event in events:
            if event[0] == "arguments":
                arguments[event[1]] += event[2]
        assert arguments == [c["function"]["arguments"] for c in calls]
    assert serve_tools.read_reply("no calls here <tool") == ("no calls here <tool", [])


@pytest.mark.parametrize("cut", ["", "\n", "\n</", "\n</tool_", "\n</tool_call"])
def test_a_call_cut_before_its_closing_tag_keeps_json_arguments(cut):
    """max_tokens can end a reply inside `</tool_call>`: the partial tag and the call's own closing
    brace are not arguments, whole or streamed."""
    text = '<tool_call>\n{"name": "set_lights", "arguments": {"room": "k", "on": true}}' + cut
    _, [call] = serve_tools.read_reply(text)
    assert json.loads(call["function"]["arguments"]) == {"room": "k", "on": True}
    stream = serve_tools.ToolCallStream()
    events = [e for piece in text for e in stream.push(piece)] + stream.finish()
    assert "".join(e[2] for e in events if e[0] == "arguments") == call["function"]["arguments"]


# -- the conversation's tool turns ----------------------------------------------------------------

HISTORY = [
    {"role": "user", "content": "lights on in the kitchen"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "set_lights", "arguments": '{"room": "kitchen", "on": true}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "the kitchen lights are on"},
]


def test_tool_turns_render_through_a_template_without_tools(client, model):
    """SmolLM2's kind of template: the call written back in the <tool_call> format, the result as a
    <tool_response>, the tools described in the system message; the server's prompt is exactly it."""
    structure = serve_tools.structure({"tools": TOOLS})
    messages, variables = serve_tools.prompt_messages(
        serve_tools_messages(HISTORY), structure, model.generation["chat_template"], []
    )
    text = model.render_chat(messages)
    assert (
        variables == {}
        and '<tool_call>\n{"name": "set_lights", "arguments": {"room": "kitchen", "on": true}}\n</tool_call>' in text
    )
    assert "<|im_start|>user\n<tool_response>\nthe kitchen lights are on\n</tool_response>" in text
    listed = (
        text.index("<tools>\n"),
        text.index('"set_temperature"'),
        text.index("\n</tools>"),
        text.index("lights on in the kitchen"),
    )
    assert sorted(listed) == list(listed)
    reply = _chat(client, messages=HISTORY, tools=TOOLS, temperature=0, max_tokens=4)
    assert reply.usage.prompt_tokens == len(model.encode_chat(messages))


def serve_tools_messages(history):
    from edge_slm.serve.requests import messages

    return messages({"messages": history})


QWEN_LIKE = (
    "{% if tools %}<|im_start|>system\n{% for tool in tools %}{{ tool.function.name }};{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }} {{ c.function.arguments | tojson }}</tool_call>{% endfor %}"
    "<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
)


def test_tool_turns_go_to_a_template_that_takes_tools():
    """A template that reads `tools` (Qwen2.5's kind) gets them and the earlier calls with their
    arguments as objects, as transformers passes them; tool results keep their role."""
    structure = serve_tools.structure({"tools": TOOLS})
    messages, variables = serve_tools.prompt_messages(serve_tools_messages(HISTORY), structure, QWEN_LIKE, [])
    text = chat_template.render(QWEN_LIKE, messages, **variables)
    assert text.startswith("<|im_start|>system\nset_lights;set_temperature;<|im_end|>")
    assert '<tool_call>set_lights {"room": "kitchen", "on": true}</tool_call>' in text
    assert "<|im_start|>tool\nthe kitchen lights are on<|im_end|>" in text


# -- grammar state and KV cache across a cancel and a reused prefix -----------------------------


def test_a_cancelled_constrained_stream_leaves_nothing_behind(server, model):
    """A constrained stream dropped after a few chunks, then the same request whole, twice (its
    prompt's prefix reused from the cache): each equal to the runtime's own constrained greedy
    reply from an empty cache, so neither the grammar's state nor the cache kept anything of it."""
    form = {"type": "json_schema", "json_schema": {"name": "room", "schema": SCHEMA}}
    body = {"messages": ASK, "response_format": form, "temperature": 0, "max_tokens": 100}
    constraint = serve_tools.structure(body).constraint
    expected = model.generate(model.encode_chat(ASK), max_new_tokens=100, constraint=constraint).text
    with httpx.Client(base_url=server, timeout=60) as http:
        with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as stream:
            for n, _ in enumerate(stream.iter_lines()):
                if n == 6:
                    break
        replies = [http.post("/v1/chat/completions", json=body).json() for _ in range(2)]
    assert [r["choices"][0]["message"]["content"] for r in replies] == [expected, expected]
    assert replies[1]["timings"]["prompt_reused"] > 0


def test_batched_sequences_each_follow_their_own_grammar(model):
    """Four sequences decoding together in one BatchDecoder, each with another constraint (a JSON
    schema, required calls, auto, none): each reply token for token its solo constrained reply."""
    from edge_slm.runtime.batch import BatchDecoder, Sequence

    bodies = [
        {"response_format": {"type": "json_schema", "json_schema": {"name": "room", "schema": SCHEMA}}},
        {"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False},
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "set_temperature"}}},
        {},
    ]
    constraints = [serve_tools.structure(b).constraint for b in bodies]
    ids = model.encode_chat(ASK)
    decoder = BatchDecoder(model, slots=4)
    seqs = [Sequence(ids, 80, constraint=c) for c in constraints]
    out = {id(seq): [] for seq in seqs}
    for seq in seqs:
        first = decoder.admit(seq)
        out[id(seq)] += [first] if first else []
    while decoder.active:
        for seq, response in decoder.step():
            out[id(seq)].append(response)
    for seq, constraint in zip(seqs, constraints):
        solo = model.generate(ids, max_new_tokens=80, constraint=constraint)
        assert [r.token for r in out[id(seq)] if r.stop_reason != "eos"] == solo.token_ids
        assert "".join(r.text for r in out[id(seq)]) == solo.text
    assert json.loads(model.generate(ids, max_new_tokens=80, constraint=constraints[0]).text)


# -- LangChain ------------------------------------------------------------------------------------


def test_langchain_bind_tools_and_structured_output(server):
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class Room(BaseModel):
        room: str = Field(json_schema_extra={"enum": ["kitchen", "bedroom"]})
        on: bool

    chat = ChatOpenAI(base_url=server + "/v1", api_key="x", model="tiny-long", temperature=0, max_tokens=200)
    bound = chat.bind_tools(TOOLS, tool_choice="required", parallel_tool_calls=False)
    message = bound.invoke("Quantization stores weights in eight bits.")
    assert len(message.tool_calls) == 1 and message.tool_calls[0]["name"] in PARAMETERS
    jsonschema.validate(message.tool_calls[0]["args"], PARAMETERS[message.tool_calls[0]["name"]])
    room = chat.with_structured_output(Room).invoke("Quantization stores weights in eight bits.")
    assert isinstance(room, Room) and room.room in ("kitchen", "bedroom")
    as_dict = chat.with_structured_output({"title": "room", **SCHEMA}).invoke("lights")
    jsonschema.validate(as_dict, SCHEMA)


# -- the default model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    """The default int8 bundle, served: built here (about a minute with the cache warm), or the one
    EDGE_SLM_DEFAULT_BUNDLE names (only read)."""
    bundle = os.environ.get("EDGE_SLM_DEFAULT_BUNDLE")
    if not bundle:
        from edge_slm.builder.pipeline import build
        from edge_slm.core.targets import load_profile

        bundle = tmp_path_factory.mktemp("default") / "x86-laptop"
        build(None, load_profile("x86-laptop"), bundle, echo=print)
    proc, base = start_server(Path(bundle), "--parallel", "2")
    yield base
    proc.terminate()
    proc.wait(timeout=20)


def _shots() -> list[dict]:
    """Three earlier turns of the dialogue: a command, the call, its result, a short answer."""
    shots = [
        ("turn on the lights in the bedroom", "set_lights", {"room": "bedroom", "on": True}),
        ("switch off the office lights", "set_lights", {"room": "office", "on": False}),
        ("dim the living room to 30 percent", "set_brightness", {"room": "living_room", "level": 30}),
    ]
    messages = []
    for n, (text, name, arguments) in enumerate(shots):
        call = {"id": f"call_{n}", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}
        messages += [
            {"role": "user", "content": text},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": f"call_{n}", "content": "ok"},
            {"role": "assistant", "content": "Done."},
        ]
    return messages


@pytest.mark.e2e
def test_default_model_calls_for_a_command_and_answers_a_question(default_server):
    client = OpenAI(base_url=default_server + "/v1", api_key="x", max_retries=0)
    model_id = client.models.list().data[0].id
    tools = SMARTHOME[:2]  # set_lights, set_brightness
    ask = dict(model=model_id, tools=tools, temperature=0, max_tokens=60)
    reply = client.chat.completions.create(
        messages=[*_shots(), {"role": "user", "content": "lights on in the garden"}], **ask
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("set_lights", {"room": "garden", "on": True})
    question = [*_shots(), {"role": "user", "content": "what is the capital of France?"}]
    answer = client.chat.completions.create(messages=question, **ask).choices[0]
    assert answer.message.tool_calls is None and "Paris" in answer.message.content
    streamed = client.chat.completions.create(
        messages=[*_shots(), {"role": "user", "content": "lights on in the garden"}], stream=True, **ask
    )
    pieces = [c.choices[0].delta.tool_calls for c in streamed if c.choices and c.choices[0].delta.tool_calls]
    assert pieces[0][0].function.name == "set_lights"
    assert "".join(p[0].function.arguments or "" for p in pieces) == call.function.arguments


@pytest.mark.e2e
def test_langchain_agent_turns_on_the_default_model(default_server):
    """LangChain's own messages (AIMessage with tool_calls, ToolMessage) go through the server's
    template path, and `bind_tools` with tool_choice auto gets the model's call back as tool_calls."""
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(base_url=default_server + "/v1", api_key="x", model="x86-laptop", temperature=0, max_tokens=60)
    history = []
    for message in _shots():
        if message["role"] == "user":
            history.append(HumanMessage(message["content"]))
        elif message["role"] == "tool":
            history.append(ToolMessage(message["content"], tool_call_id=message["tool_call_id"]))
        elif message.get("tool_calls"):
            call = message["tool_calls"][0]
            args = json.loads(call["function"]["arguments"])
            history.append(
                AIMessage("", tool_calls=[{"id": call["id"], "name": call["function"]["name"], "args": args}])
            )
        else:
            history.append(AIMessage(message["content"]))
    reply = chat.bind_tools(SMARTHOME[:2]).invoke([*history, HumanMessage("lights on in the garden")])
    assert [(c["name"], c["args"]) for c in reply.tool_calls] == [("set_lights", {"room": "garden", "on": True})]
    assert reply.response_metadata["finish_reason"] == "tool_calls"


EXAMPLE = REPO / "docs" / "examples" / "smarthome_client.py"


def _doc_block(marker: str) -> str:
    text = (REPO / "docs" / "structured-output.md").read_text()
    return text.split(f"<!-- {marker} -->\n```", 1)[1].split("\n", 1)[1].split("\n```\n", 1)[0]


def test_the_doc_shows_the_example_script():
    assert _doc_block("smarthome_client.py") == EXAMPLE.read_text().rstrip("\n"), (
        "docs/structured-output.md shows another script than docs/examples/smarthome_client.py: paste the file in"
    )


@pytest.mark.e2e
def test_the_example_script_prints_what_the_doc_shows(default_server):
    out = subprocess.run(
        [sys.executable, str(EXAMPLE), default_server + "/v1"], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.rstrip("\n") == _doc_block("smarthome_client.out"), (
        "the example's output changed: paste it into docs/structured-output.md"
    )
