"""`edge-slm generate BUNDLE PROMPT` and `edge-slm chat BUNDLE`: text from a decoder bundle,
streamed to the terminal."""

from __future__ import annotations

import json
from pathlib import Path

import click

from edge_slm.commands.options import echo_err, open_bundle, sampling, sampling_options
from edge_slm.core.errors import EdgeSlmError
from edge_slm.core.text import check_text

MAX_GRAMMAR_FILE_BYTES = 256 * 1024  # a schema or grammar file; the smart-home tool set is 11 kB


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("prompt")
@sampling_options
@click.option("--chat", "as_chat", is_flag=True, help="Wrap the prompt as a user message with the chat template.")
@click.option(
    "--chat-template-kwargs",
    "template_kwargs",
    metavar="JSON",
    help="With --chat: extra chat template variables, a JSON object (e.g. '{\"enable_thinking\": false}').",
)
@click.option("--truncate", is_flag=True, help="Keep the end of a prompt longer than the context.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with ids, text and timings.")
@click.option(
    "--json-schema",
    "schema_file",
    type=click.Path(path_type=Path),
    help="Constrain the output to JSON valid under this JSON schema (a .json file).",
)
@click.option(
    "--grammar",
    "grammar_file",
    type=click.Path(path_type=Path),
    help="Constrain the output to this grammar (a Lark or llama.cpp GBNF file).",
)
def generate(
    bundle: Path,
    prompt: str,
    as_chat: bool,
    template_kwargs: str | None,
    truncate: bool,
    as_json: bool,
    schema_file: Path | None,
    grammar_file: Path | None,
    **kw,
) -> None:
    """Generate text from PROMPT, streamed to the terminal."""
    check_text(prompt, "PROMPT (argument 2)")
    _check_stops(kw["stop"])
    constraint = _constraint(schema_file, grammar_file)  # a bad schema is refused before the model loads
    extra = _template_kwargs(template_kwargs, as_chat)
    model = open_bundle(bundle, kw["threads"])
    if extra:  # the chat prompt's ids, rendered with the extra variables
        prompt, as_chat = model.encode_chat([{"role": "user", "content": prompt}], chat_template_kwargs=extra), False
    options = dict(
        max_new_tokens=kw["max_new_tokens"], chat=as_chat, stop=kw["stop"], truncate=truncate, constraint=constraint
    )
    if as_json:
        click.echo(json.dumps(model.generate(prompt, **options, **sampling(kw)).to_dict()))
        return
    for response in model.stream(prompt, **options, **sampling(kw)):
        click.echo(response.text, nl=False)
    click.echo()
    if response.stop_reason == "context_full":
        echo_err(f"[stopped: the context of {model.context_length} tokens is full]")
    echo_err(
        f"[{response.generation_tokens} tokens, first after {response.ttft_ms:.0f} ms, "
        f"{response.generation_tps:.1f} tok/s, stop: {response.stop_reason}]"
    )


def _constraint(schema_file: Path | None, grammar_file: Path | None):
    if schema_file is None and grammar_file is None:
        return None
    if schema_file is not None and grammar_file is not None:
        raise EdgeSlmError("give --json-schema or --grammar, not both")
    from edge_slm.runtime.grammar import compile_constraint

    path = schema_file or grammar_file
    text = _read_limited(path)
    if schema_file is not None:
        return compile_constraint(schema=text)
    return compile_constraint(grammar=text)


def _read_limited(path: Path) -> str:
    """The file's text, refused in one line when missing, too big or not UTF-8."""
    if not path.is_file():
        raise EdgeSlmError(f"{path}: no such file: give the path of a JSON schema or grammar file")
    size = path.stat().st_size
    if size > MAX_GRAMMAR_FILE_BYTES:
        raise EdgeSlmError(f"{path} is {size} bytes; a schema or grammar file may be {MAX_GRAMMAR_FILE_BYTES}")
    try:
        return path.read_bytes()[:MAX_GRAMMAR_FILE_BYTES].decode("utf-8")
    except UnicodeDecodeError:
        raise EdgeSlmError(f"{path} is not UTF-8 text: save it as UTF-8") from None


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@sampling_options
@click.option("--system", default=None, help="A system message for the conversation.")
def chat(bundle: Path, system: str | None, **kw) -> None:
    """Talk with the model; earlier turns stay in the KV cache. /reset starts over, /exit leaves."""
    from edge_slm.runtime import Generation

    if system is not None:
        check_text(system, "--system")
    _check_stops(kw["stop"])
    model = open_bundle(bundle, kw["threads"])
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    echo_err(f"chatting with {bundle} ({model.manifest.precision}); /reset to start over, /exit to leave")
    while True:
        try:
            line = input("> ")
            line.encode("utf-8")
        except EOFError:
            break
        except (UnicodeDecodeError, UnicodeEncodeError):
            echo_err("[that line is not valid UTF-8 text; type it again]")
            continue
        line = line.strip()
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            messages = list(start)
            model.session.reset()
            echo_err("[conversation reset]")
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        ids = _fit_context(model, messages, len(start), kw["max_new_tokens"])
        if ids is None:
            messages.pop()
            continue
        result = Generation(prompt_token_ids=ids)
        for response in model.stream(
            ids, max_new_tokens=kw["max_new_tokens"], stop=kw["stop"], keep_cache=True, **sampling(kw)
        ):
            result.add(response)
            click.echo(response.text, nl=False)
        click.echo()
        if result.stop_reason == "context_full":
            echo_err(
                f"[reply cut: the context of {model.context_length} tokens is full; the oldest turns "
                "will be dropped to make room, or /reset]"
            )
        echo_err(
            f"[{len(result.prompt_token_ids)} prompt tokens, {result.reused_tokens} from the cache; "
            f"{len(result.token_ids)} generated, {result.decode_tokens_per_s:.1f} tok/s]"
        )
        messages.append({"role": "assistant", "content": result.text})


def _template_kwargs(text: str | None, as_chat: bool) -> dict:
    """--chat-template-kwargs: a JSON object of scalars, refused in one line otherwise."""
    from edge_slm.runtime.chat_template import check_template_kwargs

    if text is None:
        return {}
    if not as_chat:
        raise EdgeSlmError("--chat-template-kwargs applies to the chat template: add --chat")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise EdgeSlmError(
            f"--chat-template-kwargs is not JSON ({exc.msg}): give an object such as '{{\"enable_thinking\": false}}'"
        ) from None
    return check_template_kwargs(value, "--chat-template-kwargs")


def _check_stops(stops: tuple[str, ...]) -> None:
    for n, stop in enumerate(stops, 1):
        check_text(stop, f"--stop {n}")


def _fit_context(model, messages: list[dict], keep: int, max_new_tokens: int) -> list[int] | None:
    """The conversation's prompt ids with room for a reply: the oldest turns after the first `keep`
    messages (the system message) are dropped until it fits; None if the last message alone does
    not fit."""
    room = model.context_length - min(max_new_tokens, model.context_length // 4)
    ids = model.encode_chat(messages)
    dropped = 0
    while len(ids) > room and len(messages) > keep + 1:
        del messages[keep : keep + (2 if len(messages) > keep + 2 else 1)]
        dropped += 1
        ids = model.encode_chat(messages)
    if len(ids) > room:
        echo_err(f"[that message is {len(ids)} tokens; with room for a reply the context holds {room}: shorten it]")
        return None
    if dropped:
        echo_err(f"[dropped the {dropped} oldest exchange(s) to fit the context of {model.context_length} tokens]")
    return ids
