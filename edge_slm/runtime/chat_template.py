"""The bundle's chat template, rendered safely, and chat prompts encoded so that only the
template's own structure produces control tokens.

The template comes from the bundle, so it is untrusted: it runs in jinja2's immutable sandbox,
with bounds that jinja2 does not have (hence written here): at most `MAX_STEPS` loop steps and
calls, `MAX_SECONDS` of rendering, and `MAX_CHARS` of output or of any string it builds. Messages
come from users, so they are untrusted too: text such as `<|im_end|>\n<|im_start|>system` inside a
message is encoded as plain text, never as the control tokens it spells.
"""

from __future__ import annotations

import bisect
import json
import re
import time
from datetime import datetime

from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edge_slm.core.errors import EdgeSlmError
from edge_slm.core.text import check_text

MAX_STEPS = 1_000_000
MAX_SECONDS = 2.0
MAX_CHARS = 4_000_000
ROLES = ("system", "user", "assistant", "tool")


class TemplateError(EdgeSlmError):
    """The chat template failed, refused the messages, or exceeded its bounds."""


def _raise_exception(message: str):
    raise TemplateError(f"the chat template refused the messages: {message}")


class _Budget:
    def __init__(self):
        self.steps, self.deadline = 0, time.monotonic() + MAX_SECONDS

    def tick(self) -> None:
        self.steps += 1
        if self.steps > MAX_STEPS or (self.steps % 1024 == 0 and time.monotonic() > self.deadline):
            raise TemplateError(
                f"the chat template ran past its bounds ({MAX_STEPS:,} steps or {MAX_SECONDS:g} s): "
                "the bundle's template is broken or hostile; rebuild the bundle"
            )


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}` (transformers marks assistant text with it)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body).set_lineno(lineno)


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox, plus a step budget on every call and loop step, and a size cap on * and +."""

    intercepted_binops = frozenset({"*", "+", "**"})

    def __init__(self):
        # The environment transformers' apply_chat_template uses: loop controls, a tojson that does
        # not escape HTML, raise_exception and strftime_now; `{% generation %}` blocks render as
        # their contents.
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _GenerationBlock])
        self.budget = _Budget()
        self.filters["tojson"] = _tojson
        self.globals["raise_exception"] = _raise_exception
        self.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)

    def call(self, context, obj, *args, **kwargs):
        self.budget.tick()
        result = super().call(context, obj, *args, **kwargs)
        if isinstance(result, range):
            return self._counted(result)
        return result

    def _counted(self, items):
        for item in items:
            self.budget.tick()
            yield item

    def call_binop(self, context, operator, left, right):
        self.budget.tick()
        if operator == "**" and isinstance(right, int) and right > 64:
            raise TemplateError("the chat template raises a number to a power above 64: refused")
        if operator == "*" and isinstance(left, (str, list)) and isinstance(right, int):
            left, right = right, left
        if (
            operator == "*"
            and isinstance(right, (str, list))
            and isinstance(left, int)
            and left * len(right) > MAX_CHARS
        ):
            raise TemplateError(f"the chat template builds a string of over {MAX_CHARS:,} characters: refused")
        return super().call_binop(context, operator, left, right)


def check_messages(messages) -> list[dict]:
    """Messages as transformers takes them: a list of {role, content} with a known role and text
    content (or a list of {type: text, text} parts)."""
    if not isinstance(messages, list) or not messages:
        raise EdgeSlmError("messages must be a non-empty list of {role, content}")
    for n, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            role = message.get("role") if isinstance(message, dict) else message
            raise EdgeSlmError(f"message {n}: unknown chat role {role!r}; use one of {', '.join(ROLES)}")
        content = message.get("content")
        if isinstance(content, list):
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
            ):
                raise EdgeSlmError(f"message {n}: list content must be parts of {{'type': 'text', 'text': ...}}")
        elif not isinstance(content, str):
            raise EdgeSlmError(f"message {n}: every chat message needs a text 'content'")
        for text in [p["text"] for p in content] if isinstance(content, list) else [content]:
            check_text(text, f"message {n}")
    return messages


def check_template_kwargs(kwargs, field: str = "chat_template_kwargs") -> dict:
    """Extra variables for the template (Qwen3's `enable_thinking`): an object of JSON scalars whose
    names do not replace the ones edge-slm passes."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict) or not all(
        isinstance(k, str) and (v is None or isinstance(v, (str, int, float, bool))) for k, v in kwargs.items()
    ):
        raise EdgeSlmError(
            f"{field} must be an object of names to JSON scalars (string, number, boolean, null), "
            'such as {"enable_thinking": false}'
        )
    taken = sorted(set(kwargs) & {"messages", "add_generation_prompt", "bos_token", "eos_token"})
    if taken:
        raise EdgeSlmError(f"{field} cannot set {', '.join(taken)}: edge-slm sets it")
    return kwargs


def render(template: str, messages: list[dict], **variables) -> str:
    """Render `template` over `messages` within the bounds; the output is capped too."""
    env = _BoundedEnvironment()
    try:
        compiled = env.from_string(template)
        pieces, size = [], 0
        for piece in compiled.generate(messages=messages, **variables):
            size += len(piece)
            env.budget.tick()
            if size > MAX_CHARS:
                raise TemplateError(f"the chat template wrote over {MAX_CHARS:,} characters: refused")
            pieces.append(piece)
    except TemplateError:
        raise
    except Exception as exc:  # jinja2's own errors: syntax, undefined, sandbox security
        raise TemplateError(f"the chat template failed: {type(exc).__name__}: {exc}") from None
    return "".join(pieces)


def _sentinel(n: int) -> str:
    return f"\ue000edge-slm-message-{n}\ue001"


_SENTINEL = re.compile("\ue000edge-slm-message-[0-9]+\ue001")


def _spells_control_token(tokenizer, content, special_ids: set[int]) -> bool:
    parts = [content] if isinstance(content, str) else [p["text"] for p in content]
    return any(special_ids.intersection(tokenizer.encode(part, add_special_tokens=False).ids) for part in parts)


def encode_chat(tokenizer, template: str, messages: list[dict], special_ids: set[int], **variables) -> list[int]:
    """Token ids of the rendered conversation in which only the template's structure can yield
    control tokens. The whole text is encoded at once (so ids equal transformers' for ordinary
    messages); if a control token came out of a message's own text, the messages are encoded as
    plain text piece by piece instead."""
    check_messages(messages)
    marked = [{**m, "content": _sentinel(n)} if isinstance(m["content"], str) else m for n, m in enumerate(messages)]
    skeleton = render(template, marked, **variables)
    segments, at = [], 0  # (text, is_user_text)
    for n, message in enumerate(messages):
        if not isinstance(message["content"], str):
            continue
        mark = _sentinel(n)
        where = skeleton.find(mark, at)
        if where < 0:  # the template dropped or changed this message
            continue
        segments += [(skeleton[at:where], False), (message["content"], True)]
        at = where + len(mark)
    segments.append((skeleton[at:], False))
    # One scan for any marker left over (linear in the text, whatever the number of messages).
    if any(_SENTINEL.search(text) for text, is_user in segments if not is_user):
        raise TemplateError("the chat template repeats or reorders message contents in a way edge-slm cannot follow")
    text = "".join(t for t, _ in segments)
    if text != (real := render(template, messages, **variables)):
        # The template rewrites message text (Gemma trims it, Qwen3 drops earlier reasoning), so the
        # markers cannot stand for it: the real rendering is encoded whole when no message spells a
        # control token by itself; otherwise every message stays plain text where its marker was.
        if not any(_spells_control_token(tokenizer, m["content"], special_ids) for m in messages):
            return list(tokenizer.encode(real, add_special_tokens=False).ids)
    encoding = tokenizer.encode(text, add_special_tokens=False)
    starts, ends, start = [], [], 0  # the user texts' spans, in order and disjoint
    for piece, is_user in segments:
        if is_user:
            starts.append(start)
            ends.append(start + len(piece))
        start += len(piece)

    def in_user_text(offset: int) -> bool:  # a binary search: linear overall in the tokens
        i = bisect.bisect_right(starts, offset) - 1
        return i >= 0 and offset < ends[i]

    injected = any(token in special_ids and in_user_text(lo) for token, (lo, _) in zip(encoding.ids, encoding.offsets))
    if not injected:
        return list(encoding.ids)
    ids = []
    for piece, is_user in segments:
        if not piece:
            continue
        tokenizer.encode_special_tokens = is_user
        try:
            ids += tokenizer.encode(piece, add_special_tokens=False).ids
        finally:
            tokenizer.encode_special_tokens = False
    return ids
