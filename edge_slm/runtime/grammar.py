"""Constrained decoding: a JSON schema or a grammar masks the logits before each token is chosen,
so that the output is in the grammar's language by construction (a 135M model cannot be trusted
to write valid JSON on its own).

The engine is llguidance (the one llama.cpp, vLLM and onnxruntime-genai use). Chosen over
outlines-core 0.2.14 and xgrammar 0.2.8, measured on the default model's 49k vocabulary with the
smart-home tool set (edge_slm/data/smarthome/tools.json, 13 functions), on a shared 2-core x86:
- llguidance 1.9.1 compiles the tool-call schema in 2.5 ms and computes a mask in ~20 us (median,
  ~0.1 ms p90), lazily as the parser advances; it takes JSON schema, Lark (with regexes inside) and
  llama.cpp's GBNF; wheels for manylinux aarch64 (glibc 2.31: Raspberry Pi OS bookworm, JetPack 6)
  and x86_64, one abi3 wheel for every Python, no dependencies.
- outlines-core 0.2.14 turns the schema into one regex and builds its automaton over the whole
  vocabulary up front: 7.5 s for the tool set, 62 s for `{"type": "object"}`; JSON schema and
  regex only.
- xgrammar 0.2.8 requires torch and transformers: impossible on the torch-free device half.

The tokenizer bridge is written here rather than taken from `llguidance.hf` (that needs
transformers): the bytes of every token of the bundle's `tokenizers.Tokenizer` are handed to
llguidance's `TokenizerWrapper`. Handing llguidance tokenizer.json itself does not do: the default
model's (converted from GGUF) has both byte-level and byte-fallback pieces, and llguidance reads
its tokens as text ("Ġ" instead of a space).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np

from edge_slm.core.errors import EdgeSlmError

MAX_GRAMMAR_CHARS = 256 * 1024  # a schema or grammar text; the tool set is 11 kB


class GrammarError(EdgeSlmError):
    """A JSON schema or grammar that cannot constrain generation (malformed, unsupported, too big)."""


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise GrammarError(
            "structured output needs llguidance: pip install 'edge-slm[grammar]' (or pip install llguidance)"
        ) from None
    return llguidance


def _one_line(message: str, limit: int = 300) -> str:
    line = " ".join(str(message).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


@dataclass(frozen=True)
class Constraint:
    """A checked grammar in llguidance's form: compile once (a server can do it when the request
    arrives, and cache it), then start one `GrammarState` per generation from it."""

    grammar: str  # llguidance's grammar JSON
    kind: str  # "json_schema" or "grammar"


def compile_constraint(schema: dict | str | None = None, grammar: str | None = None) -> Constraint:
    """`schema`: a JSON schema (a dict or its JSON text); `grammar`: a Lark grammar (regexes allowed
    in its terminals) or a llama.cpp GBNF grammar. Exactly one of them. A bad one raises
    `GrammarError` in one line."""
    if (schema is None) == (grammar is None):
        raise GrammarError("give either a JSON schema or a grammar, not both (nor neither)")
    llg = _llguidance()
    if schema is not None:
        kind = "json_schema"
        if isinstance(schema, str):
            _check_size(schema, "the JSON schema")
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise GrammarError(f"the JSON schema is not valid JSON ({exc}): fix its syntax") from None
        if not isinstance(schema, dict):
            raise GrammarError(f"a JSON schema is a JSON object, not {type(schema).__name__}")
        _check_size(json.dumps(schema), "the JSON schema")
        try:
            # Compact separators as json.dumps(separators=(", ", ": ")) writes them; no free
            # whitespace, so the model cannot spend its tokens on spaces and newlines.
            text = llg.LLMatcher.grammar_from_json_schema(
                schema, defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
            )
        except (ValueError, TypeError) as exc:
            raise GrammarError(f"the JSON schema cannot be used: {_one_line(exc)}") from None
    else:
        kind = "grammar"
        if not isinstance(grammar, str):
            raise GrammarError(f"a grammar is text (Lark or GBNF), not {type(grammar).__name__}")
        _check_size(grammar, "the grammar")
        if not grammar.strip():
            raise GrammarError("the grammar is empty: give Lark (start: ...) or GBNF (root ::= ...) rules")
        try:
            text = llg.grammar_from("grammar", grammar)  # Lark as is, GBNF converted to Lark
        except (ValueError, TypeError) as exc:
            raise GrammarError(f"the grammar cannot be read: {_one_line(exc)}") from None
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(text)
    if is_error:
        what = "JSON schema" if kind == "json_schema" else "grammar"
        raise GrammarError(f"the {what} is not supported: {_one_line(messages[0] if messages else 'invalid')}")
    return Constraint(text, kind)


def _check_size(text: str, what: str) -> None:
    if len(text) > MAX_GRAMMAR_CHARS:
        raise GrammarError(f"{what} is {len(text)} characters; the limit is {MAX_GRAMMAR_CHARS}: simplify it")


def tool_call_schema(tools: list[dict]) -> dict:
    """The JSON schema of one call of one of `tools` (OpenAI's `tools` format):
    {"name": <a function's name>, "arguments": <an object valid under that function's parameters>}."""
    if not isinstance(tools, list) or not tools:
        raise GrammarError("tools is a non-empty list of {'type': 'function', 'function': {...}} objects")
    choices = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise GrammarError(
                f"tools[{i}] has no function name: give {{'type': 'function', 'function': {{'name': ...}}}}"
            )
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        choices.append(
            {
                "type": "object",
                "properties": {"name": {"const": function["name"]}, "arguments": parameters},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    return {"anyOf": choices}


# -- the tokenizer bridge -------------------------------------------------------------------------


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE writes each byte as a printable character; this maps them back (the
    table is GPT-2's `bytes_to_unicode`, which tokenizers does not expose)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_bytes(tokenizer, vocab_size: int) -> tuple[list[bytes], list[int]]:
    """The bytes each token id stands for, and the special (control) token ids. Byte-level BPE
    vocabularies (GPT-2, SmolLM, Qwen, Llama 3) map back through the byte alphabet; SentencePiece
    ones (Llama 2, Gemma) write a space as "▁" and single bytes as "<0x0A>"."""
    config = json.loads(tokenizer.to_str())
    byte_level = "ByteLevel" in json.dumps([config.get("pre_tokenizer"), config.get("decoder")])
    alphabet = _byte_level_alphabet()
    added = tokenizer.get_added_tokens_decoder()
    special = sorted(i for i, token in added.items() if token.special and i < vocab_size)
    pieces = []
    for i in range(vocab_size):
        token = tokenizer.id_to_token(i)
        if token is None:
            pieces.append(b"")  # ids the model has and the tokenizer does not (padded embedding rows)
        elif i in added:
            pieces.append(added[i].content.encode("utf-8"))
        elif byte_level and all(c in alphabet for c in token):
            pieces.append(bytes(alphabet[c] for c in token))
        elif match := _BYTE_PIECE.fullmatch(token):
            pieces.append(bytes([int(match.group(1), 16)]))
        else:
            pieces.append(token.replace("\u2581", " ").encode("utf-8"))
    return pieces, special


class _Wrapped:
    """What llguidance's `TokenizerWrapper` reads from a tokenizer."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: list[int]):
        self.tokens, self.special_token_ids = token_bytes(tokenizer, vocab_size)
        self.eos_token_id, self.bos_token_id = eos_ids[0], None
        self._tokenizer = tokenizer

    def __call__(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids


def build_grammar_tokenizer(tokenizer, vocab_size: int, eos_ids: list[int]):
    """llguidance's view of the bundle's tokenizer (about 1 s for a 49k vocabulary: build it once
    per model). Every end-of-sequence id ends an accepted output."""
    if not eos_ids:
        raise GrammarError("the bundle names no end-of-sequence token: structured output needs one to end")
    llg = _llguidance()
    wrapped = llg.TokenizerWrapper(_Wrapped(tokenizer, vocab_size, eos_ids))
    return llg.LLTokenizer(wrapped, n_vocab=vocab_size, eos_token=list(eos_ids))


class GrammarState:
    """One generation's parser: which tokens may come next, advanced by each chosen token. Made
    fresh for every generation, so it always matches the tokens generated after the prompt."""

    def __init__(self, constraint: Constraint, llg_tokenizer, vocab_size: int):
        llg = _llguidance()
        # Silent: its errors come back through is_error() as our one-line GrammarError, not on stderr.
        self.matcher = llg.LLMatcher(llg_tokenizer, constraint.grammar, log_level=0)
        self._check()
        self.vocab_size = vocab_size
        self._bits = np.zeros((vocab_size + 31) // 32, dtype=np.int32)

    def _check(self) -> None:
        if self.matcher.is_error():
            raise GrammarError(f"the grammar cannot be used: {_one_line(self.matcher.get_error())}")

    def allowed(self) -> np.ndarray:
        """A boolean mask over the vocabulary of the tokens the grammar allows next."""
        self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        self._check()
        # Token t is bit t % 32 of word t // 32; little-endian words (x86, ARM Linux) put it at bit
        # t % 8 of byte t // 8, which unpackbits(bitorder="little") turns into element t.
        allowed = np.unpackbits(self._bits.view(np.uint8), bitorder="little")[: self.vocab_size].view(bool)
        if not allowed.any():
            raise GrammarError("the grammar allows no token here (its language may be empty)")
        return allowed

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            self._check()
            raise GrammarError(f"token {token} is outside the grammar (the mask was not applied)")

    @property
    def complete(self) -> bool:
        """The output is a whole sentence of the grammar and nothing may follow it."""
        return self.matcher.is_stopped()
