"""A loaded seq2seq bundle (Marian / OPUS-MT, T5): texts in, translations out, with onnxruntime,
numpy and tokenizers only.

    translator = runtime.load("export/opus-mt-en-de")          # a Translator
    translator.translate(["Good morning."], beams=4)            # -> ["Guten Morgen."]

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

from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from edge_slm.core.errors import BundleError, EdgeSlmError
from edge_slm.core.manifest import SearchSettings, Seq2SeqGeneration, Seq2SeqManifest, Seq2SeqTokenizer
from edge_slm.runtime.session import check_onnxruntime, pick_providers

MAX_BEAMS = 16  # wider beams cost memory (beams x cache) and rarely help translation
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

    def _process(self, scores: np.ndarray, length: int, max_length: int) -> np.ndarray:
        """transformers' logits processors in its order: min length, suppressed tokens, forced EOS.
        `length` counts the decoder tokens so far (the start token included)."""
        s = self.settings
        if length < s.min_length:
            scores[:, s.eos_token_id] = -np.inf
        if s.suppress_token_ids:
            scores[:, list(s.suppress_token_ids)] = -np.inf
        if s.forced_eos and length == max_length - 1:
            scores[:, :] = -np.inf
            scores[:, s.eos_token_id] = 0.0
        return scores

    def greedy(self, ids: np.ndarray, mask: np.ndarray, max_new_tokens: int) -> list[list[int]]:
        s = self.settings
        hidden = self.encode(ids, mask)
        rows = ids.shape[0]
        tokens = np.full((rows, 1), s.decoder_start_token_id, np.int64)
        out: list[list[int]] = [[] for _ in range(rows)]
        running = np.ones(rows, bool)
        past = None
        for step in range(max_new_tokens):
            logits, past = self.step(tokens, hidden, mask, past)
            chosen = self._process(logits, step + 1, max_new_tokens + 1).argmax(axis=1)
            chosen = np.where(running, chosen, s.pad_token_id)
            for row in np.flatnonzero(running):
                if chosen[row] != s.eos_token_id:
                    out[row].append(int(chosen[row]))
            running &= chosen != s.eos_token_id
            if not running.any():
                break
            tokens = chosen[:, None].astype(np.int64)
        return out

    def beam_search(self, ids: np.ndarray, mask: np.ndarray, max_new_tokens: int, beams: int) -> list[list[int]]:
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
            logp = self._process(logp, cur, max_length).reshape(batch, beams, -1) + running_scores[:, :, None]
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
        if isinstance(texts, str) or not texts:
            raise TranslationError("give a list of one or more texts to translate")
        prefix = self._prefix(target_lang)
        rows = []
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise TranslationError(f"text {i} is empty: give some text to translate")
            ids = self.source.encode(prefix + text).ids
            unknown = self.tokenizer.unk_above  # source pieces the shared vocabulary lacks
            if unknown is not None:
                ids = [t if t < unknown else self.tokenizer.unk_token_id for t in ids]
            if len(ids) > self.max_source_tokens:
                raise TranslationError(
                    f"text {i} is {len(ids)} tokens; this model takes at most {self.max_source_tokens}: "
                    "split it into sentences"
                )
            rows.append(ids)
        return rows

    def _prefix(self, target_lang: str | None) -> str:
        if target_lang is None:
            return self.languages.get("", "")
        if target_lang not in self.languages or target_lang == "":
            known = ", ".join(sorted(k for k in self.languages if k)) or "none: it translates into one language"
            raise TranslationError(f"target language {target_lang!r} is not one this model knows ({known})")
        return self.languages[target_lang]

    def translate_ids(
        self, texts: list[str], max_new_tokens: int | None = None, beams: int = 1, target_lang: str | None = None
    ) -> list[list[int]]:
        """The generated token ids of each text (no start token, no EOS)."""
        limit = self.generation.max_new_tokens
        max_new_tokens = limit if max_new_tokens is None else max_new_tokens
        if not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= limit:
            raise TranslationError(f"max new tokens is {max_new_tokens}; use 1 to {limit}")
        if not isinstance(beams, int) or isinstance(beams, bool) or not 1 <= beams <= MAX_BEAMS:
            raise TranslationError(f"beams is {beams}; use 1 (greedy) to {MAX_BEAMS}")
        rows = self.tokenize(texts, target_lang)
        pad = self.graphs.settings.pad_token_id
        width = max(map(len, rows))
        ids = np.full((len(rows), width), pad, np.int64)
        mask = np.zeros((len(rows), width), np.int64)
        for r, row in enumerate(rows):
            ids[r, : len(row)], mask[r, : len(row)] = row, 1
        if beams == 1:
            return self.graphs.greedy(ids, mask, max_new_tokens)
        return self.graphs.beam_search(ids, mask, max_new_tokens, beams)

    def translate(
        self, texts: list[str], max_new_tokens: int | None = None, beams: int = 1, target_lang: str | None = None
    ) -> list[str]:
        special = set(self.tokenizer.special_token_ids)
        return [
            self.target.decode([t for t in ids if t not in special], skip_special_tokens=True)
            for ids in self.translate_ids(texts, max_new_tokens, beams, target_lang)
        ]
