"""Structured output and tool calls in OpenAI's chat-completions API: `response_format`, `tools`,
`tool_choice` and `parallel_tool_calls` checked and turned into a grammar for the runtime's
constrained decoding; the conversation's tool turns written for the chat template; the model's
`<tool_call>` blocks read back as OpenAI's `tool_calls`, whole or streamed.

The call format is the one SmolLM2's, Qwen's and Hermes' templates use:

    <tool_call>
    {"name": "set_lights", "arguments": {"room": "kitchen", "on": true}}
    </tool_call>

A template that takes `tools` (Qwen2.5, Qwen3) gets them, and the earlier calls and results, as
transformers passes them; for one that does not (SmolLM2-135M's), the tools are described in the
system message and the earlier calls and results are written as text in the same format.

What each `tool_choice` constrains (llguidance's Lark, the call's JSON as an inline `%json` schema):
- "required" or a named function: the reply is one call (or several, unless `parallel_tool_calls`
  is false) of the given functions, its arguments valid under the function's parameters;
- "auto" (the default with tools): free text, and once the text `<tool_call>` is written, a call
  as above (llguidance's lazy lexeme: the text ends at the first `<tool_call>`);
- "none": no constraint, and the tools are left out of the prompt.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from functools import lru_cache

from edge_slm.runtime.grammar import Constraint, GrammarError, compile_constraint, tool_call_schema
from edge_slm.serve.requests import ApiError

OPEN, CLOSE = "<tool_call>", "</tool_call>"
# Compact JSON, as json.dumps writes it: the model spends no tokens on free whitespace.
COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_TOOLS = 128  # OpenAI's own limit on functions per request


@dataclass(frozen=True)
class Structure:
    """What a request asks of the reply's form: a constraint (or None), and whether its text is
    read back as tool calls."""

    constraint: Constraint | None = None
    tools: list[dict] = field(default_factory=list)  # checked, OpenAI's shape; empty without tools
    prompt_tools: list[dict] = field(default_factory=list)  # the tools the prompt shows the model
    calls: bool = False  # read <tool_call> blocks out of the reply


# -- the request's fields -------------------------------------------------------------------------


def structure(body: dict, chat: bool = True) -> Structure:
    """`response_format`, `tools`, `tool_choice` and `parallel_tool_calls` of a request, checked;
    a bad one is a 400 naming it."""
    response_format = _response_format(body.get("response_format"))
    tools = _tools(body.get("tools")) if chat else _no_tools(body)
    choice = _tool_choice(body.get("tool_choice"), tools)
    parallel = body.get("parallel_tool_calls", True)
    if parallel is None:
        parallel = True
    if not isinstance(parallel, bool):
        raise ApiError(400, f"'parallel_tool_calls' must be true or false, got {parallel!r}", "parallel_tool_calls")
    if tools and choice != "none":
        if response_format is not None:
            raise ApiError(
                400,
                "'response_format' and 'tools' cannot both constrain one reply: drop one, or set tool_choice to 'none'",
                "response_format",
            )
        named = choice not in ("auto", "required")  # one call of that function, as OpenAI forces it
        chosen = [t for t in tools if t["function"]["name"] == choice] if named else tools
        try:
            constraint = _tool_grammar(json.dumps(chosen), choice == "auto", parallel and not named)
        except GrammarError as exc:
            raise ApiError(400, f"'tools' cannot constrain the reply: {exc}", "tools") from None
        return Structure(constraint, tools, tools, calls=True)
    if response_format is None:
        return Structure(tools=tools)
    try:
        constraint = _schema_constraint(json.dumps(response_format))
    except GrammarError as exc:
        raise ApiError(400, f"'response_format' has a schema that cannot be used: {exc}", "response_format") from None
    return Structure(constraint, tools)


def _response_format(value) -> dict | None:
    """The JSON schema the reply must follow, or None for free text."""
    if value is None:
        return None
    kinds = "'text', 'json_object' or 'json_schema'"
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise ApiError(400, f"'response_format' must be an object with a 'type': {kinds}", "response_format")
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind != "json_schema":
        raise ApiError(400, f"'response_format.type' is {kind!r}; use {kinds}", "response_format")
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ApiError(
            400,
            "'response_format.json_schema' must be an object with a 'name' and a 'schema' (a JSON schema object)",
            "response_format",
        )
    schema = spec.get("schema", {"type": "object"})
    if not isinstance(schema, dict):
        raise ApiError(400, "'response_format.json_schema.schema' must be a JSON schema object", "response_format")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise ApiError(
            400, f"'response_format.json_schema.strict' must be true or false, got {strict!r}", "response_format"
        )
    return schema  # strict or not, the schema is enforced: the grammar makes every reply valid


def _no_tools(body: dict) -> list:
    for name in ("tools", "tool_choice"):
        if body.get(name) is not None:
            raise ApiError(400, f"'{name}' belongs to /v1/chat/completions; /v1/completions takes none", name)
    return []


def _tools(value) -> list[dict]:
    if value is None:
        return []
    shape = "[{'type': 'function', 'function': {'name': ..., 'parameters': {...}}}]"
    if not isinstance(value, list) or not value:
        raise ApiError(400, f"'tools' must be a non-empty list: {shape}", "tools")
    if len(value) > MAX_TOOLS:
        raise ApiError(400, f"'tools' has {len(value)} functions; send at most {MAX_TOOLS}", "tools")
    names = set()
    for i, tool in enumerate(value):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise ApiError(400, f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}", "tools")
        name = function.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
            raise ApiError(400, f"tools[{i}].function.name is {name!r}; use 1 to 64 letters, digits, _ or -", "tools")
        if name in names:
            raise ApiError(400, f"tools[{i}]: the function {name!r} is given twice", "tools")
        names.add(name)
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise ApiError(400, f"tools[{i}].function.parameters must be a JSON schema object", "tools")
        if not isinstance(function.get("description", ""), str):
            raise ApiError(400, f"tools[{i}].function.description must be text", "tools")
    return value


def _tool_choice(value, tools: list[dict]) -> str:
    """ "auto", "required", "none" or the name of the one function the reply must call."""
    if value is None:
        return "auto" if tools else "none"
    if value in ("auto", "required", "none"):
        if value != "none" and not tools:
            raise ApiError(400, f"'tool_choice' is {value!r} but the request has no 'tools'", "tool_choice")
        return value
    function = value.get("function") if isinstance(value, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(value, dict) or value.get("type") != "function" or not isinstance(name, str):
        raise ApiError(
            400,
            "'tool_choice' must be 'auto', 'required', 'none' or {'type': 'function', 'function': {'name': ...}}",
            "tool_choice",
        )
    known = [t["function"]["name"] for t in tools]
    if name not in known:
        raise ApiError(
            400, f"'tool_choice' names {name!r}, which is not in 'tools' ({', '.join(known) or 'none'})", "tool_choice"
        )
    return name


# -- grammars (compiled once per distinct schema or tool set) -------------------------------------


@lru_cache(maxsize=64)
def _schema_constraint(schema_json: str) -> Constraint:
    return compile_constraint(schema=schema_json)


@lru_cache(maxsize=64)
def _tool_grammar(tools_json: str, auto: bool, parallel: bool) -> Constraint:
    schema = {"x-guidance": COMPACT, **tool_call_schema(json.loads(tools_json))}
    calls = 'call ("\\n" call)*' if parallel else "call"
    if auto:  # any text; from the first <tool_call> on, calls (llguidance's lazy lexeme ends the text there)
        rules = [
            f"start: {'call*' if parallel else 'call?'} TEXT",
            f'head[lazy]: TEXT_BEFORE "{OPEN}"',
            f'call: head "\\n" body "\\n{CLOSE}"',
        ]
    else:
        rules = [f"start: {calls}", f'call: "{OPEN}\\n" body "\\n{CLOSE}"']
    terminals = ["TEXT: /(?s:.*)/", "TEXT_BEFORE: /(?s:.*)/"] if auto else []
    grammar = "\n".join([*rules, f"body: %json {json.dumps(schema)}", *terminals])
    return compile_constraint(grammar=grammar)


# -- the conversation, for the chat template ------------------------------------------------------


def prompt_messages(messages: list[dict], structure: Structure, template: str, specials: list[str]) -> tuple:
    """The messages and extra template variables for the chat template: OpenAI's assistant
    `tool_calls` and `tool` results as the template takes them (its own `tools` support), or as
    text in the <tool_call> format with the tools described in the system message (a template
    without it). Names and arguments of earlier calls may not spell control tokens."""
    native = "tools" in template
    out = []
    for n, message in enumerate(messages):
        calls = message.get("tool_calls") or []
        if not isinstance(calls, list):
            raise ApiError(400, f"messages[{n}].tool_calls must be a list", f"messages[{n}]")
        checked = [_earlier_call(n, c, specials) for c in calls]
        if native:
            entry = {**message}
            if checked:
                entry["tool_calls"] = [
                    {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                    for c in checked
                ]
            out.append(entry)
        elif checked:
            text = "\n".join(
                f"{OPEN}\n{json.dumps({'name': c['name'], 'arguments': c['arguments']})}\n{CLOSE}" for c in checked
            )
            out.append({"role": "assistant", "content": "\n".join(p for p in (message["content"], text) if p)})
        elif message["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{message['content']}\n</tool_response>"})
        else:
            out.append({k: v for k, v in message.items() if k in ("role", "content")})
    if native:
        return out, {"tools": structure.prompt_tools} if structure.prompt_tools else {}
    if structure.prompt_tools:
        described = tool_instructions(structure.prompt_tools)
        if out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + described}
        else:
            out.insert(0, {"role": "system", "content": described})
    return out, {}


def tool_instructions(tools: list[dict]) -> str:
    """The tools and the call format, in the words of the Hermes / Qwen2.5 system prompt. The
    tools' JSON is compact: the default model's 2,048-token context holds the 13 smart-home
    functions in 1,541 tokens so, 1,835 with spaces after the separators."""
    listed = "\n".join(json.dumps(t, ensure_ascii=False, separators=(",", ":")) for t in tools)
    return (
        "You may call one or more functions to assist with the user query.\n\n"
        f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{listed}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        f"{OPEN}{CLOSE} XML tags:\n{OPEN}\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n'
        f"{CLOSE}"
    )


def _earlier_call(n: int, call, specials: list[str]) -> dict:
    where = f"messages[{n}]"
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ApiError(400, f"{where}.tool_calls: each needs {{'function': {{'name', 'arguments'}}}}", where)
    arguments = function.get("arguments", "{}")
    if isinstance(arguments, str):  # OpenAI's form: a JSON string; templates take the object (as vLLM passes it)
        try:
            arguments = json.loads(arguments or "{}")
        except json.JSONDecodeError:
            raise ApiError(400, f"{where}.tool_calls: 'arguments' is not JSON: {arguments[:60]!r}", where) from None
    text = json.dumps([function["name"], arguments, call.get("id", "")])
    spelled = next((s for s in specials if s and s in text), None)
    if spelled:
        raise ApiError(400, f"{where}.tool_calls spells the control token {spelled!r}: remove it", where)
    return {"id": str(call.get("id") or new_call_id()), "name": function["name"], "arguments": arguments}


# -- the reply, read back -------------------------------------------------------------------------


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*(?=\S)', re.S)
# What may follow the arguments object: the call's closing brace, whitespace and the closing tag.
_HOLD = len("}\n" + CLOSE) + 2


class ToolCallStream:
    """Reads a reply's text as it comes: content outside <tool_call> blocks, and each call as it is
    written (its id and name once the name is complete, then its arguments in pieces), as OpenAI
    streams them. `push` and `finish` return events: ("content", text), ("call", index, id, name)
    and ("arguments", index, text). The whole reply read at once gives the same calls."""

    def __init__(self):
        self.state, self.buffer, self.index = "text", "", -1
        self.sent = ""  # the current call's arguments already returned
        self.after_call = False  # the newline between two calls is neither content nor a call

    def push(self, text: str) -> list[tuple]:
        self.buffer += text
        events = []
        while True:
            before = (self.state, len(self.buffer))
            events += getattr(self, "_" + self.state)(final=False)
            if (self.state, len(self.buffer)) == before:
                return events

    def finish(self) -> list[tuple]:
        events = self.push("")
        events += getattr(self, "_" + self.state)(final=True)
        self.buffer = ""
        return events

    def _text(self, final: bool) -> list[tuple]:
        if self.after_call:
            self.buffer = self.buffer.lstrip("\n")
            self.after_call = not self.buffer
        at = self.buffer.find(OPEN)
        if at >= 0:
            content, self.buffer, self.state = self.buffer[:at], self.buffer[at + len(OPEN) :], "head"
            return [("content", content)] if content else []
        keep = next((k for k in range(len(OPEN) - 1, 0, -1) if self.buffer.endswith(OPEN[:k])), 0)
        if final and not (self.index >= 0 and keep):  # after calls, a tag cut by max_tokens is dropped
            keep = 0
        content, self.buffer = self.buffer[: len(self.buffer) - keep], self.buffer[len(self.buffer) - keep :]
        return [("content", content)] if content else []

    def _head(self, final: bool) -> list[tuple]:
        match = _HEAD.match(self.buffer)
        if match:
            self.index += 1
            self.buffer, self.state = self.buffer[match.end() :], "arguments"
            return [("call", self.index, new_call_id(), json.loads(f'"{match.group(1)}"'))]
        if final:  # a call cut before its name was complete (max_tokens): neither a call nor content
            self.buffer, self.state = "", "text"
        return []

    def _arguments(self, final: bool) -> list[tuple]:
        at = self.buffer.find(CLOSE)
        if at >= 0 or final:
            body = self.buffer[:at] if at >= 0 else self.buffer
            if at < 0:  # cut by max_tokens: a partial closing tag, and the call's own "}", are not arguments
                keep = next((k for k in range(len(CLOSE), 0, -1) if body.endswith(CLOSE[:k])), 0)
                body = body[: len(body) - keep]
            body = body.rstrip()
            closed = body.endswith("}") and (at >= 0 or _is_json(self.sent + body[:-1]))
            pieces = body[:-1].rstrip() if closed else body
            self.buffer = self.buffer[at + len(CLOSE) :] if at >= 0 else ""
            self.state, self.after_call, self.sent = "text", True, ""
            return [("arguments", self.index, pieces)] if pieces else []
        ready = len(self.buffer) - _HOLD
        if ready <= 0:
            return []
        piece, self.buffer = self.buffer[:ready], self.buffer[ready:]
        self.sent += piece
        return [("arguments", self.index, piece)]


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def read_reply(text: str) -> tuple[str | None, list[dict]]:
    """The content (None when the reply is only calls) and the OpenAI `tool_calls` of a whole reply."""
    content, calls = "", []
    stream = ToolCallStream()
    for event in stream.push(text) + stream.finish():
        if event[0] == "content":
            content += event[1]
        elif event[0] == "call":
            calls.append({"id": event[2], "type": "function", "function": {"name": event[3], "arguments": ""}})
        else:
            calls[event[1]]["function"]["arguments"] += event[2]
    if not calls:
        return text, []
    return content.strip() or None, calls
