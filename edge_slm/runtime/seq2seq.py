"""A loaded seq2seq bundle (Marian / OPUS-MT, T5): texts in, translations out, with onnxruntime,
numpy and tokenizers only.

    translator = runtime.load("export/opus-mt-en-de")          # a Translator
    translator.translate(["Good morning."], beams=4)            # -> ["Guten Morgen."]
    for piece in translator.stream("Good morning."): ...        # greedy, as it is written

The bundle holds optimum's layout: an encoder graph, run once per batch, and a merged decoder graph
whose first step computes every layer's cross-attention keys and values from the encoder's output
and whose later steps take them back unchanged, with the self-attention cache growing by one
position per step. Greedy and beam search follow transformers' `generate` (num_beams, length
penalty, early stopping, forced EOS at the length limit, suppressed tokens) so that a bundle gives
the torch model's tokens; the search is written here in numpy because the device has no torch and
onnxruntime has no beam search for these graphs outside its contrib BeamSearch operator, which
needs a differently exported graph.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from edge_slm.core.errors import BundleError, EdgeSlmError
from edge_slm.core.manifest import SearchSettings, Seq2SeqGeneration, Seq2SeqManifest, Seq2SeqTokenizer
from edge_slm.runtime.session import check_onnxruntime, pick_providers

MAX_BEAMS = 16  # wider beams cost memory (beams x cache) and rarely help translation
MAX_BATCH = 32  # sentences searched together: a long document's cache grows with them
NEG = np.float32(-1.0e9)  # transformers' "impossible" score, kept the same so that ties break alike


class TranslationError(EdgeSlmError):
    """A request the translator cannot take: empty text, too long, a bad beam count or language."""


class Seq2SeqGraphs:
    """The encoder and merged decoder sessions, and the search over them: token ids in, token ids
    out. The build's validation and gate use it on their own graphs; `Translator` wraps it."""

    def __init__(self, encoder: Path, decoder: Path, settings: SearchSettings, threads: int, providers: list[str]):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.encoder = ort.InferenceSession(str(encoder), options, providers=providers)
        self.decoder = ort.InferenceSession(str(decoder), options, providers=providers)
        self.settings = settings
        inputs = {i.name: i for i in self.decoder.get_inputs()}
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        self.present_names = [o.name for o in self.decoder.get_outputs() if o.name.startswith("present.")]
        self.heads, self.head_dim = inputs[self.past_names[0]].shape[1], inputs[self.past_names[0]].shape[3]
        self.float_type = np.float16 if "float16" in inputs[self.past_names[0]].type else np.float32

    def encode(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self.encoder.run(None, {"input_ids": ids, "attention_mask": mask})[0]

    def step(self, tokens: np.ndarray, hidden: np.ndarray, mask: np.ndarray, past: dict | None):
        """One decoder step for rows of `tokens` [rows, 1]: logits [rows, vocab] and the new cache
        (self-attention grown by one; cross-attention computed on the first step, then reused)."""
        rows = tokens.shape[0]
        first = past is None
        if first:  # the merged graph's no-cache branch ignores these; they only need the right rank
            empty = np.zeros((rows, self.heads, 0, self.head_dim), self.float_type)
            past = {name: empty for name in self.past_names}
        feeds = {
            "input_ids": tokens,
            "encoder_attention_mask": mask,
            "encoder_hidden_states": hidden,
            "use_cache_branch": np.array([not first]),
            **past,
        }
        outputs = self.decoder.run(None, feeds)
        cache = {}
        for name, value in zip(self.present_names, outputs[1:]):
            key = name.replace("present.", "past_key_values.")
            # Cross-attention keys/values come out of the first step only; later steps pass them on.
            cache[key] = value if (first or ".decoder." in name) else past[key]
        for key in self.past_names:
            cache.setdefault(key, past[key])
        return outputs[0][:, -1, :].astype(np.float32), cache

    def _process(self, scores: np.ndarray, length: int, max_length: int, forced_bos: int | None) -> np.ndarray:
        """transformers' logits processors in its order: min length, forced BOS (the target
        language of M2M100 / NLLB, first step only), suppressed tokens, forced EOS. `length` counts
        the decoder tokens so far (the start token included)."""
        s = self.settings
        if length < s.min_length:
            scores[:, s.eos_token_id] = -np.inf
        if forced_bos is not None and length == 1:
            scores[:, :] = -np.inf
            scores[:, forced_bos] = 0.0
        if s.suppress_token_ids:
            scores[:, list(s.suppress_token_ids)] = -np.inf
        if s.forced_eos and length == max_length - 1:
            scores[:, :] = -np.inf
            scores[:, s.eos_token_id] = 0.0
        return scores

    def greedy(self, ids: np.ndarray, mask: np.ndarray, max_new_tokens: int, forced_bos=None) -> list[list[int]]:
        out: list[list[int]] = []
        for out, _ in self.greedy_steps(ids, mask, max_new_tokens, forced_bos):
            pass
        return out

    def greedy_steps(self, ids: np.ndarray, mask: np.ndarray, max_new_tokens: int, forced_bos=None):
        """Greedy search one step at a time: yields (tokens of each row so far, rows still running)
        after every step; the lists grow in place (streaming reads them)."""
        s = self.settings
        hidden = self.encode(ids, mask)
        rows = ids.shape[0]
        tokens = np.full((rows, 1), s.decoder_start_token_id, np.int64)
        out: list[list[int]] = [[] for _ in range(rows)]
        running = np.ones(rows, bool)
        past = None
        for step in range(max_new_tokens):
            logits, past = self.step(tokens, hidden, mask, past)
            chosen = self._process(logits, step + 1, max_new_tokens + 1, forced_bos).argmax(axis=1)
            chosen = np.where(running, chosen, s.pad_token_id)
            for row in np.flatnonzero(running):
                if chosen[row] != s.eos_token_id:
                    out[row].append(int(chosen[row]))
            running &= chosen != s.eos_token_id
            yield out, running.copy() if step + 1 < max_new_tokens else np.zeros(rows, bool)
            if not running.any():
                break
            tokens = chosen[:, None].astype(np.int64)

    def beam_search(
        self, ids: np.ndarray, mask: np.ndarray, max_new_tokens: int, beams: int, forced_bos=None
    ) -> list[list[int]]:
        """transformers' vectorised beam search (generation/utils.py `_beam_search`), per sentence:
        2 x beams candidates a step; an EOS among the top `beams` finishes a hypothesis scored
        sum(log p) / length ** length_penalty; a sentence stops when no running beam can beat its
        worst kept hypothesis (or, with early_stopping, once `beams` hypotheses are kept)."""
        s = self.settings
        batch, keep = ids.shape[0], 2 * beams
        max_length = max_new_tokens + 1
        hidden = np.repeat(self.encode(ids, mask), beams, axis=0)
        mask = np.repeat(mask, beams, axis=0)
        running = np.full((batch, beams, max_length), s.pad_token_id, np.int64)
        running[:, :, 0] = s.decoder_start_token_id
        running_scores = np.zeros((batch, beams), np.float32)
        running_scores[:, 1:] = NEG
        done = running.copy()
        done_scores = np.full((batch, beams), NEG, np.float32)
        done_finished = np.zeros((batch, beams), bool)
        improvable = np.ones(batch, bool)
        past = None
        cur = 1
        rows = np.arange(batch)[:, None]
        while True:
            logits, past = self.step(running[:, :, cur - 1].reshape(-1, 1), hidden, mask, past)
            logp = _log_softmax(logits)
            logp = self._process(logp, cur, max_length, forced_bos).reshape(batch, beams, -1)
            logp = logp + running_scores[:, :, None]
            vocab = logp.shape[-1]
            flat = logp.reshape(batch, -1)
            top = _topk(flat, keep)
            top_scores = np.take_along_axis(flat, top, axis=1)
            source_beam, token = top // vocab, top % vocab
            candidates = running[rows, source_beam].copy()
            candidates[:, :, cur] = token
            stops = (token == s.eos_token_id) | (cur + 1 >= max_length)
            # Running beams for the next step: the best `beams` candidates that did not stop.
            alive_scores = top_scores + stops.astype(np.float32) * NEG
            nxt = _topk(alive_scores, beams)
            next_running = np.take_along_axis(candidates, nxt[:, :, None], axis=1)
            next_scores = np.take_along_axis(alive_scores, nxt, axis=1)
            next_source = np.take_along_axis(source_beam, nxt, axis=1)
            # Finished hypotheses: stopped candidates among the top `beams`, length-normalised.
            just_finished = stops & (np.arange(keep) < beams)[None, :]
            normed = top_scores / np.float32(cur**s.length_penalty)
            full = done_finished.all(axis=1) & (s.early_stopping is True)
            normed = normed + (full | ~improvable)[:, None].astype(np.float32) * NEG
            normed = normed + (~just_finished).astype(np.float32) * NEG
            merged_scores = np.concatenate([done_scores, normed], axis=1)
            best = _topk(merged_scores, beams)
            done = np.take_along_axis(np.concatenate([done, candidates], axis=1), best[:, :, None], axis=1)
            done_scores = np.take_along_axis(merged_scores, best, axis=1)
            done_finished = np.take_along_axis(np.concatenate([done_finished, just_finished], axis=1), best, axis=1)
            running, running_scores = next_running, next_scores
            # The cache follows the beams: self-attention rows gathered; cross-attention rows are
            # the same for every beam of a sentence, so they stay.
            order = (next_source + np.arange(batch)[:, None] * beams).reshape(-1)
            past = {k: (v[order] if ".decoder." in k else v) for k, v in past.items()}
            cur += 1
            # "never": a positive length penalty may still reward the longest possible hypothesis.
            hoped = max_length - 1 if s.early_stopping == "never" and s.length_penalty > 0 else cur - 1
            best_running = running_scores[:, 0] / np.float32(hoped**s.length_penalty)
            worst_done = np.where(done_finished, done_scores.min(axis=1, keepdims=True), NEG)
            improvable &= (best_running[:, None] > worst_done).any(axis=1)
            open_beam = not (done_finished.all() and s.early_stopping is True)
            if not (improvable.any() and open_beam and not stops.all()):
                break
        results = []
        for sequence in done[:, 0, 1:]:
            ends = np.flatnonzero(sequence == s.eos_token_id)
            results.append([int(t) for t in sequence[: ends[0] if len(ends) else len(sequence)]])
        return results


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _topk(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest per row, largest first (a stable sort: the lower index wins a tie)."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


class Translator:
    """A seq2seq bundle: `translate(texts)` -> one translation per text."""

    def __init__(
        self,
        graphs: Seq2SeqGraphs,
        source: Tokenizer,
        target: Tokenizer,
        tokenizer: Seq2SeqTokenizer,
        generation: Seq2SeqGeneration,
        max_source_tokens: int,
        manifest: Seq2SeqManifest | None = None,
        path: Path | None = None,
    ):
        self.graphs, self.source, self.target = graphs, source, target
        self.tokenizer, self.generation, self.max_source_tokens = tokenizer, generation, max_source_tokens
        self.manifest, self.path = manifest, path
        self.task = "translation"
        self.languages = dict(generation.target_languages)

    @classmethod
    def open(cls, bundle, manifest: Seq2SeqManifest, threads: int, providers, context=None, memory=None):
        if context is not None:
            raise EdgeSlmError(f"{bundle} is a seq2seq bundle: it has no context (KV cache) to size")
        graph, tok = manifest.graph, manifest.tokenizer
        for name in {graph.file, graph.decoder_file, tok.source_file, tok.target_file}:
            if not (Path(bundle) / name).is_file():
                raise BundleError(f"{Path(bundle) / name}: missing from the bundle: copy the whole directory again")
        check_onnxruntime(bundle, manifest.min_onnxruntime)
        chosen = pick_providers(providers or list(manifest.profile.runtime.execution_providers))
        graphs = Seq2SeqGraphs(
            Path(bundle) / graph.file, Path(bundle) / graph.decoder_file, manifest.generation.search, threads, chosen
        )
        try:
            source = Tokenizer.from_file(str(Path(bundle) / tok.source_file))
            target = Tokenizer.from_file(str(Path(bundle) / tok.target_file))
        except Exception as exc:
            raise BundleError(f"{bundle}: a tokenizer cannot be read ({exc})") from None
        source.no_padding()
        source.no_truncation()
        return cls(
            graphs, source, target, tok, manifest.generation, manifest.model.max_source_tokens, manifest, Path(bundle)
        )

    def tokenize(self, texts: list[str], target_lang: str | None = None) -> list[list[int]]:
        """Source token ids per text (with the target language's prefix), checked against the limit."""
        rows = []
        for i, ids in enumerate(self._source_ids(texts, target_lang)):
            if len(ids) > self.max_source_tokens:
                raise TranslationError(
                    f"text {i} is {len(ids)} tokens; this model takes at most {self.max_source_tokens}: "
                    "split it into sentences"
                )
            rows.append(ids)
        return rows

    def _source_ids(self, texts: list[str], target_lang: str | None) -> list[list[int]]:
        if isinstance(texts, str) or not texts:
            raise TranslationError("give a list of one or more texts to translate")
        prefix, _ = self._target(target_lang)
        rows = []
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise TranslationError(f"text {i} is empty: give some text to translate")
            ids = self.source.encode(prefix + text).ids
            unknown = self.tokenizer.unk_above  # source pieces the shared vocabulary lacks
            if unknown is not None:
                ids = [t if t < unknown else self.tokenizer.unk_token_id for t in ids]
            rows.append(ids)
        return rows

    def _target(self, target_lang: str | None) -> tuple[str, int | None]:
        """The source prefix text (Marian's >>deu<<, T5's task) and the decoder's forced first
        token (M2M100 / NLLB) for `target_lang`, or the model's default."""
        forced = self.generation.forced_bos
        if target_lang is None:
            if forced and "" not in forced:
                raise TranslationError(f"this model translates into several languages: name one ({self._known()})")
            return self.languages.get("", ""), forced.get("")
        if target_lang not in self.languages or target_lang == "":
            raise TranslationError(f"target language {target_lang!r} is not one this model knows ({self._known()})")
        return self.languages[target_lang], forced.get(target_lang)

    def _known(self) -> str:
        return ", ".join(sorted(k for k in self.languages if k)) or "none: it translates into one language"

    def _checked(self, max_new_tokens: int | None, beams: int) -> int:
        limit = self.generation.max_new_tokens
        max_new_tokens = limit if max_new_tokens is None else max_new_tokens
        if not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= limit:
            raise TranslationError(f"max new tokens is {max_new_tokens}; use 1 to {limit}")
        if not isinstance(beams, int) or isinstance(beams, bool) or not 1 <= beams <= MAX_BEAMS:
            raise TranslationError(f"beams is {beams}; use 1 (greedy) to {MAX_BEAMS}")
        return max_new_tokens

    def _padded(self, rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        pad = self.graphs.settings.pad_token_id
        width = max(map(len, rows))
        ids = np.full((len(rows), width), pad, np.int64)
        mask = np.zeros((len(rows), width), np.int64)
        for r, row in enumerate(rows):
            ids[r, : len(row)], mask[r, : len(row)] = row, 1
        return ids, mask

    def _search(self, rows, max_new_tokens: int, beams: int, forced_bos: int | None) -> list[list[int]]:
        ids, mask = self._padded(rows)
        if beams == 1:
            return self.graphs.greedy(ids, mask, max_new_tokens, forced_bos)
        return self.graphs.beam_search(ids, mask, max_new_tokens, beams, forced_bos)

    def translate_ids(
        self, texts: list[str], max_new_tokens: int | None = None, beams: int = 1, target_lang: str | None = None
    ) -> list[list[int]]:
        """The generated token ids of each text (no start token, no EOS), each text whole: a text
        longer than the model's positions is refused (`translations` splits it)."""
        max_new_tokens = self._checked(max_new_tokens, beams)
        rows = self.tokenize(texts, target_lang)
        return self._search(rows, max_new_tokens, beams, self._target(target_lang)[1])

    def decode(self, ids: list[int]) -> str:
        special = set(self.tokenizer.special_token_ids)
        return self.target.decode([t for t in ids if t not in special], skip_special_tokens=True)

    def _pieces(self, texts: list[str], target_lang: str | None) -> list[list[list[int]]]:
        """Each text's source ids: the whole text when it fits the model's positions, else its
        sentences (one row each), each of which must fit."""
        prefix, _ = self._target(target_lang)
        out = []
        for i, (text, ids) in enumerate(zip(texts, self._source_ids(texts, target_lang))):
            if len(ids) <= self.max_source_tokens:
                out.append([ids])
                continue
            sentences = split_sentences(text)
            rows = self._source_ids(sentences, target_lang) if len(sentences) > 1 else [ids]
            longest = max(map(len, rows))
            if longest > self.max_source_tokens:
                where = (
                    f"text {i} is {len(ids)} tokens" if len(rows) == 1 else f"text {i} has a {longest}-token sentence"
                )
                raise TranslationError(
                    f"{where}; this model takes at most {self.max_source_tokens}: split it into "
                    + ("sentences" if len(rows) == 1 else "shorter sentences")
                )
            out.append(rows)
        return out

    def translations(
        self, texts: list[str], max_new_tokens: int | None = None, beams: int = 1, target_lang: str | None = None
    ) -> list[Translation]:
        """One `Translation` per text; texts longer than the model's positions are split into
        sentences, every sentence of every text translated in one batch, and joined back."""
        max_new_tokens = self._checked(max_new_tokens, beams)
        pieces = self._pieces(texts, target_lang)
        flat = [row for rows in pieces for row in rows]
        forced = self._target(target_lang)[1]
        # Batches of at most MAX_BATCH rows: a long document's sentences must not size one huge cache.
        generated = iter(
            [
                ids
                for at in range(0, len(flat), MAX_BATCH)
                for ids in self._search(flat[at : at + MAX_BATCH], max_new_tokens, beams, forced)
            ]
        )
        out = []
        for rows in pieces:
            parts = [next(generated) for _ in rows]
            out.append(Translation(" ".join(self.decode(p) for p in parts), [t for p in parts for t in p], len(rows)))
        return out

    def translate(
        self, texts: list[str], max_new_tokens: int | None = None, beams: int = 1, target_lang: str | None = None
    ) -> list[str]:
        return [t.text for t in self.translations(texts, max_new_tokens, beams, target_lang)]

    def check(
        self, texts: list[str], max_new_tokens: int | None = None, beams: int = 1, target_lang: str | None = None
    ) -> int:
        """Refuse what `translations` would refuse (TranslationError), before any search runs;
        returns the source tokens of all texts (a server's usage count)."""
        self._checked(max_new_tokens, beams)
        return sum(len(row) for rows in self._pieces(texts, target_lang) for row in rows)

    def stream(self, text: str, max_new_tokens: int | None = None, target_lang: str | None = None) -> Iterator[str]:
        """Greedy translation of one text as it is written: pieces of text whose concatenation is
        `translate([text])[0]`. A long text's sentences are decoded in batches; a sentence's
        text is shown once those before it are finished, so the pieces come in reading order.
        The generator returns the number of tokens generated (StopIteration.value)."""
        max_new_tokens = self._checked(max_new_tokens, 1)
        rows = self._pieces([text], target_lang)[0]
        forced = self._target(target_lang)[1]
        done: list[str] = []  # the translations of earlier batches
        shown, generated = "", 0
        for at in range(0, len(rows), MAX_BATCH):
            ids, mask = self._padded(rows[at : at + MAX_BATCH])
            out: list[list[int]] = []
            for out, running in self.graphs.greedy_steps(ids, mask, max_new_tokens, forced):
                visible = list(done)
                for row, tokens in enumerate(out):
                    visible.append(self.decode(tokens))
                    if running[row]:
                        break
                now = " ".join(visible)
                # A partial sentence may end inside a character (a byte piece) or be rewritten by
                # the next token's decoding: only a text that extends what was shown is sent.
                if now.startswith(shown) and len(now) > len(shown) and not now.endswith("\ufffd"):
                    yield now[len(shown) :]
                    shown = now
            done += [self.decode(tokens) for tokens in out]
            generated += sum(map(len, out))
        final = " ".join(done)
        if final.startswith(shown) and len(final) > len(shown):
            yield final[len(shown) :]
        return generated


@dataclass(frozen=True)
class Translation:
    text: str
    token_ids: list[int]  # generated ids (no start token, no EOS), of every sentence in turn
    sentences: int  # 1, or the number of sentences a long text was split into


# After sentence-final punctuation (Latin, CJK), and at line breaks. Written here: the device half
# has no sentence splitter among its dependencies, and a text is split only when it is longer than
# the model's positions, where a rare wrong split ("Dr. Smith") costs less than a refusal.
_SENTENCE_END = re.compile(r"(?<=[.!?…。！？])\s+|\s*\n\s*")


def split_sentences(text: str) -> list[str]:
    return [part for part in _SENTENCE_END.split(text.strip()) if part.strip()]
