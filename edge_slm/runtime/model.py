"""A loaded decoder bundle: its session, tokenizer and chat template, and generation on top of them
(streaming, stop strings, prompt-prefix reuse across chat turns, scoring)."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from edge_slm.core.bundle import verify_bundle
from edge_slm.core.errors import BundleError, EdgeSlmError
from edge_slm.core.manifest import DecoderManifest, EncoderManifest, Manifest, Seq2SeqManifest
from edge_slm.core.system import current_rss_mb, peak_rss_mb
from edge_slm.core.text import check_text
from edge_slm.runtime import chat_template
from edge_slm.runtime.cpu import warn_if_mismatched
from edge_slm.runtime.encoder import Encoder
from edge_slm.runtime.grammar import Constraint, GrammarState, build_grammar_tokenizer, compile_constraint
from edge_slm.runtime.sampling import Sampler, SamplingConfig, token_logprobs
from edge_slm.runtime.seq2seq import Translator
from edge_slm.runtime.session import DecoderSession, check_onnxruntime, pick_providers
from edge_slm.runtime.textstream import TextStream, stop_strings

log = logging.getLogger("edge_slm.runtime")


# How each way of ending maps onto OpenAI's finish_reason.
# A server stops a generation at its time limit: like a length cut, the reply is incomplete.
FINISH_REASON = {
    "eos": "stop",
    "stop_string": "stop",
    "max_new_tokens": "length",
    "context_full": "length",
    "time_limit": "length",
    "grammar": "stop",
}


@dataclass(frozen=True)
class GenerationResponse:
    """One generated token as `Model.stream` yields it, with the running counters (mlx-lm's
    `GenerationResponse`). Every sampled token gives one, so `text` may be "" (a multi-byte
    character not complete yet, or text held back because it may start a stop string).

    When the model ends the text, the last response carries the end-of-sequence token: its `text`
    is whatever was held back, and it is not counted in `generation_tokens` nor part of
    `Generation.token_ids` (`stop_reason` "eos" tells it apart)."""

    text: str  # the new text this token makes safe to show
    token: int
    logprob: float  # log softmax of the raw logits at `token`, before penalty/temperature/top-k/top-p
    finish_reason: str | None  # None until the last response: "stop" or "length" (OpenAI's)
    stop_reason: str | None  # on the last: "eos", "stop_string", "grammar", "max_new_tokens", "context_full"
    prompt_tokens: int  # the prompt's length, after truncation
    reused_tokens: int  # prompt tokens whose keys/values were already cached
    generation_tokens: int  # tokens generated so far, this one included (an end-of-sequence one not)
    ttft_ms: float  # prompt in -> first new token out
    prompt_tps: float  # prompt tokens run (the reused ones not) over the time to the first token
    generation_tps: float  # tokens after the first, over their time; 0 until there are two
    # With `top_logprobs=N`: the N likeliest tokens of the raw distribution and their logprobs.
    top_logprobs: tuple[tuple[int, float], ...] = ()


@dataclass
class Generation:
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    reused_tokens: int = 0  # prompt tokens whose keys/values were already cached
    stop_reason: str = ""  # "eos", "stop_string", "grammar" (complete), "max_new_tokens" or "context_full"
    ttft_ms: float = 0.0  # prompt in -> first new token out
    decode_tokens_per_s: float = 0.0  # tokens after the first, over their time

    def add(self, response: GenerationResponse) -> None:
        """Fold in one response of `Model.stream`."""
        if response.stop_reason != "eos":
            self.token_ids.append(response.token)
        self.text += response.text
        self.reused_tokens, self.ttft_ms = response.reused_tokens, response.ttft_ms
        self.decode_tokens_per_s = response.generation_tps
        self.stop_reason = response.stop_reason or ""

    @property
    def finish_reason(self) -> str:
        return FINISH_REASON.get(self.stop_reason, "stop")

    def to_dict(self) -> dict:
        return {**self.__dict__, "peak_rss_mb": round(peak_rss_mb(), 1)}


def load(
    bundle: str | Path,
    threads: int | None = None,
    providers: list[str] | None = None,
    verify: bool = True,
    context: int | None = None,
    memory: dict | None = None,
) -> Model | Encoder:
    """Open a bundle: check schema and checksums, then start an onnxruntime session. The
    manifest's type picks the family's runtime class (`RUNTIMES`): a decoder bundle gives a
    `Model` (generate, chat), an encoder bundle an `Encoder` (classify, embed)."""
    bundle = Path(bundle)
    manifest = verify_bundle(bundle, checksums=verify)
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise EdgeSlmError(f"threads is {threads}; use 1 or more (or leave it to the profile)")
    threads = capped_threads(threads or manifest.profile.runtime.threads)
    runtime_class = RUNTIMES[type(manifest)]
    return runtime_class.open(bundle, manifest, threads, providers, context=context, memory=memory)


def _open_decoder(
    bundle: Path,
    manifest: DecoderManifest,
    threads: int,
    providers: list[str] | None,
    context: int | None = None,
    memory: dict | None = None,
) -> Model:
    """The Model of a verified decoder bundle (`Model.open`)."""
    limit = manifest.model.context_length
    if context is not None and (not isinstance(context, int) or not 2 <= context <= limit):
        raise EdgeSlmError(f"context is {context}; use 2 to {limit} tokens (the bundle's context length)")
    graph = manifest.graph
    for name in (
        "tokenizer.json",
        "generation.json",
        graph.file,
        *([graph.prefill_file] if graph.prefill_file else []),
    ):
        if not (bundle / name).is_file():
            raise BundleError(f"{bundle / name}: missing from the bundle: copy the whole directory again or rebuild")
    check_onnxruntime(bundle, manifest.min_onnxruntime)
    warn_if_mismatched(manifest.profile)
    chosen = pick_providers(providers or list(manifest.profile.runtime.execution_providers))
    # The tokenizer first: parsing tokenizer.json leaves freed memory behind that the session's
    # allocations then reuse; in the other order it stays on top of the session (25 MB of peak
    # for the default model's 3.5 MB tokenizer.json).
    try:
        tokenizer = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    except Exception as exc:
        raise BundleError(f"{bundle / 'tokenizer.json'}: cannot be read ({exc})") from None
    generation = json.loads((bundle / "generation.json").read_text())
    if memory is not None:  # what `edge-slm bench` breaks peak memory into
        memory["tokenizer"] = current_rss_mb()
    session = DecoderSession.for_bundle(bundle / graph.file, manifest, threads, chosen, context)
    switch = generation.get("rope_switch")
    session.rope_switch = switch if isinstance(switch, int) and not isinstance(switch, bool) and switch > 0 else None
    if memory is not None:
        memory["session"] = current_rss_mb()
    return Model(bundle, manifest, session, tokenizer, generation)


MAX_TOP_LOGPROBS = 20  # OpenAI's bound


def check_top_logprobs(n) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_TOP_LOGPROBS:
        raise EdgeSlmError(f"top_logprobs is {n!r}; give an integer from 0 to {MAX_TOP_LOGPROBS}")


def capped_threads(threads: int) -> int:
    """More threads than this machine has cores only slows onnxruntime down (and thousands of them
    stall the process): cap at the core count, with a warning."""
    cores = os.cpu_count() or 1
    if threads > cores:
        log.warning("%d threads asked for, this machine has %d cores: using %d", threads, cores, cores)
        return cores
    return threads


class Model:
    """A decoder bundle: generate, chat, score."""

    open = staticmethod(_open_decoder)

    def __init__(
        self, path: Path, manifest: DecoderManifest, session: DecoderSession, tokenizer: Tokenizer, generation: dict
    ):
        self.path, self.manifest, self.session = path, manifest, session
        self.tokenizer, self.generation = tokenizer, generation
        self.eos_ids = set(generation["eos_token_ids"])
        self.context_length = session.context_length
        # Every control token: those the tokenizer marks special, and those generation.json names.
        added = tokenizer.get_added_tokens_decoder() if hasattr(tokenizer, "get_added_tokens_decoder") else {}
        self._special_ids = {int(i) for i, token in added.items() if token.special}
        self._special_ids |= {int(i) for i in generation.get("special_tokens", {}).values()}
        self._cached_ids: list[int] = []  # the tokens whose keys/values are in the cache
        self._grammar_tokenizer = None  # llguidance's view of the tokenizer, built on first use

    # -- text <-> ids ---------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        check_text(text, "the text")
        return self._checked_ids(self.tokenizer.encode(text).ids)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def render_chat(
        self, messages: list[dict], add_generation_prompt: bool = True, chat_template_kwargs: dict | None = None
    ) -> str:
        """The conversation as the bundle's chat template writes it (bounded, sandboxed);
        `chat_template_kwargs` are extra template variables, as transformers' apply_chat_template takes."""
        return chat_template.render(
            self._chat_template(),
            chat_template.check_messages(messages),
            **self._template_variables(add_generation_prompt, chat_template_kwargs),
        )

    def encode_chat(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict | None = None,
        tools: list[dict] | None = None,
    ) -> list[int]:
        """Token ids of the conversation; message text never becomes control tokens. `tools`
        (OpenAI's function list) go to a template that takes them, as transformers passes them."""
        variables = self._template_variables(add_generation_prompt, chat_template_kwargs)
        if tools:
            variables["tools"] = tools
        ids = chat_template.encode_chat(self.tokenizer, self._chat_template(), messages, self._special_ids, **variables)
        return self._checked_ids(ids)

    def _chat_template(self) -> str:
        template = self.generation.get("chat_template")
        if not template:
            raise EdgeSlmError(f"{self.path}: this bundle has no chat template; use plain generation")
        return template

    def _template_variables(self, add_generation_prompt: bool, chat_template_kwargs: dict | None = None) -> dict:
        specials = self.generation.get("special_tokens", {})
        bos = next((t for t, i in specials.items() if i == self.generation.get("bos_token_id")), "")
        eos_ids = self.generation.get("eos_token_ids") or []
        eos = next((t for t, i in specials.items() if eos_ids and i == eos_ids[0]), "")
        # As transformers passes them: templates that write the BOS or EOS text themselves need them.
        extra = chat_template.check_template_kwargs(chat_template_kwargs)
        return {**extra, "add_generation_prompt": add_generation_prompt, "bos_token": bos, "eos_token": eos}

    def _checked_ids(self, ids: list[int]) -> list[int]:
        vocab = self.session.vocab_size
        bad = next((i for i in ids if not 0 <= i < vocab), None)
        if bad is not None:
            raise EdgeSlmError(
                f"token id {bad} is outside the model's vocabulary of {vocab}: "
                "pass ids from this bundle's tokenizer (a tokenizer that makes it is broken: rebuild)"
            )
        return ids

    def _prompt_ids(self, prompt: str | list[int], chat: bool) -> list[int]:
        if isinstance(prompt, str):
            if not prompt.strip():
                raise EdgeSlmError("the prompt is empty: give some text to continue")
            ids = self.encode_chat([{"role": "user", "content": prompt}]) if chat else self.encode(prompt)
        else:
            try:
                ids = [int(i) for i in prompt]
            except (TypeError, ValueError):
                raise EdgeSlmError("a prompt is text or a list of token ids") from None
            self._checked_ids(ids)
        if not ids:
            raise EdgeSlmError("the prompt is empty: give some text to continue")
        return ids

    # -- generation -----------------------------------------------------------------------------
    def stream(
        self,
        prompt: str | list[int],
        max_new_tokens: int = 128,
        chat: bool = False,
        stop: str | list[str] | tuple[str, ...] = (),
        truncate: bool = False,
        keep_cache: bool = False,
        schema: dict | str | None = None,
        grammar: str | None = None,
        constraint: Constraint | None = None,
        top_logprobs: int = 0,
        **sampling,
    ) -> Iterator[GenerationResponse]:
        """Yield one `GenerationResponse` per sampled token; the last has `finish_reason` set.

        `stop`: a string or a list of strings that end the text (not shown). `schema` (a JSON
        schema, dict or text), `grammar` (Lark or GBNF) or `constraint` (from `compile_constraint`)
        restrict the output to their language; it ends, with finish reason "stop", when the grammar
        is complete. `top_logprobs`: each response also carries the N likeliest tokens (0-20).
        `sampling`: SamplingConfig's names (temperature, top_k, top_p, min_p, repetition_penalty,
        presence_penalty, frequency_penalty, logit_bias, seed); a bad one is one line."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise EdgeSlmError(f"max_new_tokens is {max_new_tokens}; generate 1 token or more")
        check_top_logprobs(top_logprobs)
        stop = stop_strings(stop)
        config = SamplingConfig.of(**sampling)
        config.check_vocab(self.session.vocab_size)
        parser = self._grammar_state(schema, grammar, constraint)
        ids = self._fitted_prompt(prompt, chat, truncate)
        sampler = Sampler(config)
        text = TextStream(self.tokenizer, stop)
        history = list(ids)

        start = time.perf_counter()
        new = self._prefill(ids, keep_cache)
        reused = len(ids) - len(new)
        logits = self.session.forward(new)
        first_at = ttft_ms = prompt_tps = 0.0
        for step in range(max_new_tokens):
            token = sampler(logits, history, parser.allowed() if parser else None)
            now = time.perf_counter()
            if step == 0:
                first_at, ttft_ms = now, (now - start) * 1e3
                prompt_tps = len(new) / (now - start)
            if token in self.eos_ids:
                reason, piece, count = "eos", "", step
            else:
                history.append(token)
                piece, count = text.push(token), step + 1
                if parser:
                    parser.advance(token)
                if text.stopped:
                    reason = "stop_string"
                elif parser and parser.complete:
                    reason = "grammar"
                elif count == max_new_tokens:
                    reason = "max_new_tokens"
                elif self.session.length >= self.context_length:
                    reason = "context_full"
                else:
                    reason = None
            if reason is not None:
                piece += text.flush()
            logprob, likeliest = token_logprobs(logits, token, top_logprobs)
            yield GenerationResponse(
                text=piece,
                token=token,
                logprob=logprob,
                finish_reason=FINISH_REASON.get(reason),
                stop_reason=reason,
                prompt_tokens=len(ids),
                reused_tokens=reused,
                generation_tokens=count,
                ttft_ms=ttft_ms,
                prompt_tps=prompt_tps,
                generation_tps=(count - 1) / (now - first_at) if count > 1 else 0.0,
                top_logprobs=likeliest,
            )
            if reason is not None:
                return
            logits = self.session.forward([token])
            self._cached_ids.append(token)

    def _grammar_state(
        self, schema: dict | str | None, grammar: str | None, constraint: Constraint | None
    ) -> GrammarState | None:
        """A fresh parser for this generation, or None without a constraint."""
        if constraint is None and schema is None and grammar is None:
            return None
        if constraint is not None and (schema is not None or grammar is not None):
            raise EdgeSlmError("give a constraint, or a schema or grammar to compile one, not both")
        if constraint is None:
            constraint = compile_constraint(schema=schema, grammar=grammar)
        return GrammarState(constraint, self.grammar_tokenizer(), self.session.vocab_size)

    def grammar_tokenizer(self):
        """llguidance's view of this model's tokenizer, built on first use (about 1 s for a 49k
        vocabulary; a server may call it at start-up) and kept."""
        if self._grammar_tokenizer is None:
            eos = sorted(self.generation["eos_token_ids"])  # the bundle's, whatever eos_ids is set to now
            self._grammar_tokenizer = build_grammar_tokenizer(self.tokenizer, self.session.vocab_size, eos)
        return self._grammar_tokenizer

    def _fitted_prompt(self, prompt: str | list[int], chat: bool, truncate: bool) -> list[int]:
        """The prompt's ids, shortened to the last half of the context with `truncate`."""
        ids = self._prompt_ids(prompt, chat)
        if len(ids) >= self.context_length:
            if not truncate:
                raise EdgeSlmError(
                    f"the prompt has {len(ids)} tokens; the bundle's context is {self.context_length}: "
                    "shorten it or pass truncate=True (--truncate) to keep its end"
                )
            ids = ids[-(self.context_length // 2) :]
        return ids

    def _prefill(self, ids: list[int], keep_cache: bool) -> list[int]:
        """The tokens still to run: with `keep_cache`, the cache keeps its longest common prefix
        with `ids` (a chat's earlier turns) and only the rest is processed."""
        cached = self._cached_ids if keep_cache else []
        common = 0
        for a, b in zip(cached, ids[:-1]):  # always run at least the last prompt token
            if a != b:
                break
            common += 1
        self.session.rollback(min(common, self.session.length))
        self._cached_ids = list(ids)
        return ids[self.session.length :]

    def generate(
        self,
        prompt: str | list[int],
        max_new_tokens: int = 128,
        chat: bool = False,
        truncate: bool = False,
        **kwargs,
    ) -> Generation:
        """The whole reply at once: `stream`'s responses collected."""
        result = Generation(prompt_token_ids=self._fitted_prompt(prompt, chat, truncate))
        for response in self.stream(result.prompt_token_ids, max_new_tokens=max_new_tokens, **kwargs):
            result.add(response)
        return result

    def chat(
        self,
        messages: list[dict],
        max_new_tokens: int = 256,
        keep_cache: bool = True,
        chat_template_kwargs: dict | None = None,
        **kwargs,
    ) -> Generation:
        """Answer the last user message; earlier turns already in the cache are not run again.
        `chat_template_kwargs` are extra template variables (Qwen3's `{"enable_thinking": False}`)."""
        ids = self.encode_chat(messages, chat_template_kwargs=chat_template_kwargs)
        return self.generate(ids, max_new_tokens=max_new_tokens, keep_cache=keep_cache, **kwargs)

    # -- evaluation -----------------------------------------------------------------------------
    def logprobs(self, token_ids: list[int]) -> np.ndarray:
        """log p(token[t+1] | tokens[..t]) over the whole vocabulary: [len-1, V], one pass."""
        if len(token_ids) > self.context_length:
            raise EdgeSlmError(f"{len(token_ids)} tokens exceed the context of {self.context_length}")
        self._cached_ids = []
        return self.session.logprobs(token_ids)


# The manifest's type -> the runtime class that opens it (`Cls.open(bundle, manifest, threads,
# providers, context=, memory=)`); a new family adds its entry.
RUNTIMES: dict[type[Manifest], type[Model] | type[Encoder] | type[Translator]] = {
    DecoderManifest: Model,
    EncoderManifest: Encoder,
    Seq2SeqManifest: Translator,
}
