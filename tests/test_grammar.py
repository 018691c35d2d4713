"""Constrained decoding on the tiny bundle (a random model, a 300-token byte-level BPE): sampled
output always valid under the schema or in the grammar's language, greedy the argmax of the masked
logits, the tool-call schema, stop strings, and one-line refusals of bad schemas and grammars."""

import json
import re
import subprocess
import sys

import jsonschema
import numpy as np
import pytest

from edge_slm import runtime
from edge_slm.core.data import DATA_DIR
from edge_slm.core.errors import EdgeSlmError
from edge_slm.runtime.grammar import GrammarError, GrammarState, compile_constraint, tool_call_schema

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
TOOLS = json.loads((DATA_DIR / "smarthome" / "tools.json").read_text())


@pytest.fixture(scope="module")
def model(tiny_bundle):
    return runtime.load(tiny_bundle, threads=1)


def test_sampled_output_always_validates(model):
    """30 generations at temperature 1.0 with random seeds: each parses and validates, and each
    ends because the grammar is complete (or the model chose to end where it may), never cut."""
    seeds = np.random.default_rng().integers(0, 2**31, size=30)
    reasons = set()
    for seed in seeds:
        result = model.generate("Set", max_new_tokens=100, schema=SCHEMA, temperature=1.0, seed=int(seed))
        jsonschema.validate(json.loads(result.text), SCHEMA)
        assert result.finish_reason == "stop", (int(seed), result.text)
        reasons.add(result.stop_reason)
    assert reasons <= {"grammar", "eos"} and "grammar" in reasons


def test_unconstrained_output_is_not_json(model):
    """What the mask is for: the same random model unconstrained does not write this JSON."""
    texts = [model.generate("Set", max_new_tokens=40, temperature=1.0, seed=s).text for s in range(5)]
    for text in texts:
        with pytest.raises(ValueError):
            json.loads(text)


def test_lark_and_gbnf_grammars_constrain_to_their_language(model):
    lark = r"start: /[0-9]{3}-[a-z]{2,4}/"
    for seed in range(15):
        text = model.generate("Code", max_new_tokens=30, grammar=lark, temperature=1.0, seed=seed).text
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", text), text
    gbnf = 'root ::= answer "."\nanswer ::= "yes" | "no" | "maybe"'
    texts = {model.generate("Q", max_new_tokens=10, grammar=gbnf, temperature=1.0, seed=s).text for s in range(15)}
    assert texts <= {"yes.", "no.", "maybe."} and len(texts) >= 2


def test_constrained_greedy_is_the_argmax_of_the_masked_logits(model):
    """Replayed against an independent uncached scoring pass: at every step the chosen token has
    the highest score among the tokens the grammar allows (and the mask did change some choice)."""
    prompt = model.encode("The room")
    result = model.generate(prompt, max_new_tokens=100, schema=SCHEMA)
    plain = model.generate(prompt, max_new_tokens=len(result.token_ids))
    assert result.stop_reason == "grammar" and result.token_ids != plain.token_ids
    scored = model.logprobs(prompt + result.token_ids)
    state = GrammarState(compile_constraint(schema=SCHEMA), model.grammar_tokenizer(), model.session.vocab_size)
    for step, token in enumerate(result.token_ids):
        allowed = state.allowed()
        row = scored[len(prompt) - 1 + step]
        assert allowed[token]
        assert row[token] == pytest.approx(row[allowed].max(), abs=1e-4)
        state.advance(token)
    assert state.complete


def test_a_cancelled_generation_leaves_no_grammar_state(model):
    """A stream closed halfway (a client that left) and a kept cache: the next constrained
    generation starts its own parser and gives what a fresh one gives."""
    want = model.generate("The room", max_new_tokens=100, schema=SCHEMA)
    stream = model.stream("The room", max_new_tokens=100, schema=SCHEMA, keep_cache=True)
    first = [next(stream) for _ in range(5)]
    stream.close()
    assert [r.token for r in first] == want.token_ids[:5]
    again = model.generate("The room", max_new_tokens=100, schema=SCHEMA, keep_cache=True)
    assert again.token_ids == want.token_ids and again.reused_tokens > 0
    jsonschema.validate(json.loads(again.text), SCHEMA)


def test_greedy_unchanged_when_already_in_the_language(model):
    """A grammar that allows the unconstrained greedy text (and more) leaves greedy as it is."""
    lark = "start: /[A-Za-z:]{12,60}/"
    model.eos_ids = set()
    try:
        for prompt in ("The room", "Numbers like 1234"):  # the tiny model's greedy text is ASCII letters there
            plain = model.generate(prompt, max_new_tokens=12)
            assert re.fullmatch("[A-Za-z:]{12}", plain.text), plain.text
            constrained = model.generate(prompt, max_new_tokens=12, grammar=lark)
            assert constrained.token_ids == plain.token_ids and constrained.text == plain.text
    finally:
        model.eos_ids = set(model.generation["eos_token_ids"])


def test_tool_call_schema_accepts_a_call_and_refuses_others(model):
    constraint = compile_constraint(schema=tool_call_schema(TOOLS))
    vocab = model.session.vocab_size

    def consumed(text: str) -> tuple[bool, bool]:
        state = GrammarState(constraint, model.grammar_tokenizer(), vocab)
        for token in model.encode(text):
            if not state.allowed()[token]:
                return False, False
            state.advance(token)
        return True, state.complete

    assert consumed('{"name": "set_lights", "arguments": {"room": "kitchen", "on": true}}') == (True, True)
    assert consumed('{"name": "set_volume", "arguments": {"room": "office", "level": 35}}') == (True, True)
    assert consumed('{"name": "set_lights", "arguments": {"room": "attic", "on": true}}')[0] is False
    assert consumed('{"name": "set_volume", "arguments": {"room": "office", "level": 350}}')[0] is False
    assert consumed('{"name": "open_window", "arguments": {}}')[0] is False
    for seed in range(5):
        result = model.generate("Do", max_new_tokens=100, constraint=constraint, temperature=1.0, seed=seed)
        if result.finish_reason == "stop":  # a free-text "query" may run past 100 tokens
            jsonschema.validate(json.loads(result.text), tool_call_schema(TOOLS))


def test_stop_as_a_string_is_one_stop_string(model):
    sampled = {"temperature": 1.0, "seed": 1}
    full = model.generate("The capital", max_new_tokens=30, **sampled).text
    # Two characters whose first occurrence as a pair comes after one of them alone: split into
    # characters, the stop would cut earlier.
    stop = next(
        full[i : i + 2]
        for i in range(1, len(full) - 1)
        if full.index(full[i : i + 2]) == i and min(full.index(full[i]), full.index(full[i + 1])) < i
    )
    result = model.generate("The capital", max_new_tokens=30, stop=stop, **sampled)
    assert result.text == full[: full.index(stop)] and result.stop_reason == "stop_string"
    assert model.generate("The capital", max_new_tokens=30, stop=[stop], **sampled).text == result.text
    with pytest.raises(EdgeSlmError, match=r"^stop is 5; give a string or a list of strings$"):
        model.generate("The capital", stop=5)
    with pytest.raises(EdgeSlmError, match=r"^stop is \['a', 3\]; give a string or a list of strings$"):
        next(model.stream("The capital", stop=["a", 3]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"schema": '{"type": '}, r"^the JSON schema is not valid JSON \(.*\): fix its syntax$"),
        ({"schema": {"type": "objekt"}}, r"^the JSON schema is not supported: .*objekt"),
        ({"schema": [1, 2]}, r"^a JSON schema is a JSON object, not list$"),
        ({"grammar": "start: ("}, r"^the grammar (cannot be read|is not supported): "),
        ({"grammar": "root ::= [unclosed"}, r"^the grammar (cannot be read|is not supported): "),
        ({"grammar": "  "}, r"^the grammar is empty"),
        ({"schema": SCHEMA, "grammar": "start: /a/"}, r"^give either a JSON schema or a grammar"),
        ({"schema": "x" * 300_000}, r"^the JSON schema is 300000 characters; the limit is 262144"),
    ],
)
def test_bad_schema_or_grammar_is_one_typed_line(model, kwargs, message):
    with pytest.raises(GrammarError, match=message) as caught:
        model.generate("x", max_new_tokens=4, **kwargs)
    assert "\n" not in str(caught.value) and len(str(caught.value)) <= 400


def cli(*args):
    return subprocess.run([sys.executable, "-m", "edge_slm.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_json_schema_and_grammar(tiny_bundle, tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    proc = cli("generate", str(tiny_bundle), "Set", "--json-schema", str(schema), "--temperature", "1", "--seed", "4")
    assert proc.returncode == 0, proc.stderr
    jsonschema.validate(json.loads(proc.stdout), SCHEMA)
    assert "stop: grammar" in proc.stderr
    grammar = tmp_path / "code.lark"
    grammar.write_text(r"start: /[0-9]{3}-[a-z]{2,4}/")
    proc = cli("generate", str(tiny_bundle), "Code", "--grammar", str(grammar), "--json", "--temperature", "1")
    assert proc.returncode == 0, proc.stderr
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", json.loads(proc.stdout)["text"])


def test_cli_refuses_bad_files_in_one_line(tiny_bundle, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "objekt"}')
    big = tmp_path / "big.json"
    big.write_text(" " * 300_000)
    for args, message in [
        (["--json-schema", str(bad)], "error: the JSON schema is not supported: "),
        (["--json-schema", str(big)], f"error: {big} is 300000 bytes; a schema or grammar file may be 262144"),
        (["--json-schema", str(tmp_path / "none.json")], "error: "),
        (["--json-schema", str(bad), "--grammar", str(bad)], "error: give --json-schema or --grammar, not both"),
    ]:
        proc = cli("generate", str(tiny_bundle), "x", *args)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert proc.stderr.startswith(message), proc.stderr


def test_token_bytes_spell_the_text(model):
    """The bridge hands llguidance each token's bytes: joined along an encoding they are the
    text's UTF-8 (multi-byte characters split across tokens included)."""
    from edge_slm.runtime.grammar import token_bytes

    pieces, special = token_bytes(model.tokenizer, model.session.vocab_size)
    assert len(pieces) == model.session.vocab_size and set(special) >= set(model.generation["eos_token_ids"])
    for text in ("one two 東京 three", ' {"room": "kitchen", "on": true}', "naïve\ncafé\t42"):
        assert b"".join(pieces[i] for i in model.encode(text)) == text.encode("utf-8")


def test_smarthome_commands_are_calls_of_the_tool_set():
    """The shipped dialogue data: every expected call is valid under the tool-call schema, the
    prompt-tuning set is small and apart from the held-out set, and every tool is evaluated."""
    schema = tool_call_schema(TOOLS)
    prompt = [json.loads(line) for line in (DATA_DIR / "smarthome" / "prompt.jsonl").read_text().splitlines()]
    held_out = [json.loads(line) for line in (DATA_DIR / "smarthome" / "eval.jsonl").read_text().splitlines()]
    for item in prompt + held_out:
        jsonschema.validate(item["call"], schema)
    assert len(prompt) <= 20 and len(held_out) >= 200
    assert not {i["text"] for i in prompt} & {i["text"] for i in held_out}
    assert {i["call"]["name"] for i in held_out} == {t["function"]["name"] for t in TOOLS}
