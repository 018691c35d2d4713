"""Chat templates of real families, rendered by edge-slm's sandbox to the ids transformers'
`apply_chat_template` gives, and template variables (Qwen3's `enable_thinking`) passed through
`Model.chat`, `edge-slm generate --chat --chat-template-kwargs` and the server's
`chat_template_kwargs`.

The installed transformers ships neither template and they cannot be downloaded here, so
`QWEN3_TEMPLATE` and `GEMMA3_TEMPLATE` are faithful equivalents of the models' published
tokenizer_config.json templates, written out by hand and not checked byte for byte against them:
Gemma 3's whole (no system role: the system text opens the first user turn), Qwen3's without its
tool-calling branches (tools are not part of a chat request here)."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest
from conftest import start_server
from test_architectures import make_family_model
from transformers import AutoTokenizer

from edge_slm import runtime
from edge_slm.builder.pipeline import build
from edge_slm.core.targets import load_profile

QWEN3_TEMPLATE = """{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""

GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""

SYSTEM_USER = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
]
MULTI_TURN = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
]


def family_bundle(directory, family: str, template: str, added: list[str], bos: str | None = None):
    """A tiny `family` model whose tokenizer has the family's turn tokens (`added`, special) and
    chat template, built into an fp32 bundle with the short-context profile; returns (bundle,
    transformers tokenizer)."""
    source = directory / "model"
    make_family_model(source, family, vocab_size=320)  # room for the added tokens
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.add_special_tokens({"additional_special_tokens": added})
    if bos:
        tokenizer.bos_token = bos
    assert len(tokenizer) <= 320
    tokenizer.chat_template = template
    tokenizer.save_pretrained(source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    return source, tokenizer


@pytest.fixture(scope="module")
def profile(tiny_profile):
    return load_profile(str(tiny_profile))


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory, profile):
    directory = tmp_path_factory.mktemp("qwen3")
    source, tokenizer = family_bundle(directory, "qwen3", QWEN3_TEMPLATE, ["<think>", "</think>"])
    build(str(source), profile, directory / "bundle", echo=lambda m: None)
    return directory / "bundle", tokenizer


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory, profile):
    directory = tmp_path_factory.mktemp("gemma3")
    added = ["<bos>", "<start_of_turn>", "<end_of_turn>"]
    source, tokenizer = family_bundle(directory, "gemma3_text", GEMMA3_TEMPLATE, added, bos="<bos>")
    build(str(source), profile, directory / "bundle", echo=lambda m: None)
    return directory / "bundle", tokenizer


def _theirs(tokenizer, messages, **kwargs) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **kwargs)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


@pytest.mark.parametrize("messages", [SYSTEM_USER, MULTI_TURN], ids=["system+user", "multi-turn"])
def test_gemma3_template_renders_to_transformers_ids(gemma3, messages):
    bundle, tokenizer = gemma3
    model = runtime.load(bundle, threads=1)
    ours = model.encode_chat(messages)
    assert ours == _theirs(tokenizer, messages)
    text = model.render_chat(messages)
    assert text.startswith("<bos><start_of_turn>user\nYou are terse.\n\nWhat is the capital of France?<end_of_turn>\n")
    assert text.endswith("<start_of_turn>model\n") and "system" not in text
    assert ours[0] == tokenizer.convert_tokens_to_ids("<bos>")


@pytest.mark.parametrize("messages", [SYSTEM_USER, MULTI_TURN], ids=["system+user", "multi-turn"])
@pytest.mark.parametrize("thinking", [None, True, False])
def test_qwen3_template_renders_to_transformers_ids(qwen3, messages, thinking):
    bundle, tokenizer = qwen3
    model = runtime.load(bundle, threads=1)
    extra = {} if thinking is None else {"enable_thinking": thinking}
    ours = model.encode_chat(messages, chat_template_kwargs=extra)
    assert ours == _theirs(tokenizer, messages, **extra)
    closed = model.render_chat(messages, chat_template_kwargs=extra).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert closed == (thinking is False)


def test_model_chat_passes_enable_thinking(qwen3):
    bundle, tokenizer = qwen3
    model = runtime.load(bundle, threads=1)
    off = model.chat(SYSTEM_USER, max_new_tokens=4, keep_cache=False, chat_template_kwargs={"enable_thinking": False})
    on = model.chat(SYSTEM_USER, max_new_tokens=4, keep_cache=False)
    assert off.prompt_token_ids == _theirs(tokenizer, SYSTEM_USER, enable_thinking=False)
    think = tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
    n = len(on.prompt_token_ids)
    assert off.prompt_token_ids[:n] == on.prompt_token_ids and off.prompt_token_ids[n] == think[0]
    assert think[1] in off.prompt_token_ids[n:]


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ([True], "chat_template_kwargs must be an object of names to JSON scalars"),
        ({"enable_thinking": {"deep": True}}, "chat_template_kwargs must be an object of names to JSON scalars"),
        ({"add_generation_prompt": False}, "chat_template_kwargs cannot set add_generation_prompt"),
    ],
)
def test_model_refuses_bad_template_kwargs(qwen3, kwargs, fragment):
    model = runtime.load(qwen3[0], threads=1)
    with pytest.raises(Exception, match=fragment):
        model.encode_chat(SYSTEM_USER, chat_template_kwargs=kwargs)


def _cli(*args):
    command = [sys.executable, "-m", "edge_slm.cli", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_generate_chat_template_kwargs(qwen3):
    bundle, tokenizer = qwen3
    model = runtime.load(bundle, threads=1)
    prompt = "What is the capital of France?"
    proc = _cli(
        "generate",
        bundle,
        prompt,
        "--chat",
        "-n",
        "3",
        "--json",
        "--chat-template-kwargs",
        '{"enable_thinking": false}',
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    messages = [{"role": "user", "content": prompt}]
    assert got["prompt_token_ids"] == _theirs(tokenizer, messages, enable_thinking=False)
    want = model.chat(messages, max_new_tokens=3, keep_cache=False, chat_template_kwargs={"enable_thinking": False})
    assert got["token_ids"] == want.token_ids
    for bad, said in [
        ("{enable_thinking: false}", "--chat-template-kwargs is not JSON"),
        ('["enable_thinking"]', "--chat-template-kwargs must be an object of names to JSON scalars"),
    ]:
        proc = _cli("generate", bundle, prompt, "--chat", "--chat-template-kwargs", bad)
        assert proc.returncode == 2 and said in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = _cli("generate", bundle, prompt, "--chat-template-kwargs", "{}")
    assert proc.returncode == 2 and "--chat-template-kwargs applies to the chat template: add --chat" in proc.stderr


def test_server_chat_template_kwargs(qwen3):
    bundle, tokenizer = qwen3
    model = runtime.load(bundle, threads=1)
    proc, base = start_server(bundle)
    try:
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        body = {"messages": messages, "max_tokens": 3, "temperature": 0}
        off = httpx.post(
            base + "/v1/chat/completions", json={**body, "chat_template_kwargs": {"enable_thinking": False}}
        )
        assert off.status_code == 200, off.text
        prompt_ids = _theirs(tokenizer, messages, enable_thinking=False)
        assert off.json()["usage"]["prompt_tokens"] == len(prompt_ids)
        want = model.chat(messages, max_new_tokens=3, keep_cache=False, chat_template_kwargs={"enable_thinking": False})
        assert off.json()["choices"][0]["message"]["content"] == want.text
        on = httpx.post(base + "/v1/chat/completions", json=body)
        assert on.json()["usage"]["prompt_tokens"] == len(_theirs(tokenizer, messages)) < len(prompt_ids)
        for bad in ("no thinking", {"enable_thinking": [False]}):
            refused = httpx.post(base + "/v1/chat/completions", json={**body, "chat_template_kwargs": bad})
            error = refused.json()["error"]
            assert refused.status_code == 400 and error["param"] == "chat_template_kwargs"
            assert "'chat_template_kwargs' must be an object of names to JSON scalars" in error["message"]
    finally:
        proc.terminate()
        proc.wait(timeout=20)
