"""A loaded encoder bundle: texts in, label probabilities (`classify`) or vectors (`embed`) out,
or a question and a context in and the answer's span out (`answer`, `runtime/reader.py`), with
onnxruntime, numpy and tokenizers only.

Texts are sorted by length and padded per batch, to the batch's longest (never to the maximum
length): the padding a batch carries costs as much as real tokens. Texts longer than the bundle's
`max_sequence_length` are truncated with a warning, or refused with `truncate=False`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from edge_slm.core.errors import BundleError, EdgeSlmError
from edge_slm.core.manifest import EncoderManifest
from edge_slm.core.text import check_text
from edge_slm.runtime.session import check_onnxruntime, pick_providers, tensorrt_options

log = logging.getLogger("edge_slm.runtime")
TOKENIZER_FILE = "tokenizer.json"
CALLS = {"classification": "classify", "embedding": "embed", "question-answering": "answer"}  # what each task does


class InputError(EdgeSlmError):
    """A text the encoder cannot take: empty, not a string, or too long with truncation off."""


@dataclass(frozen=True)
class Classification:
    label: str
    probability: float
    probabilities: dict[str, float]  # every label's probability, highest first

    def to_dict(self) -> dict:
        return {"label": self.label, "probability": self.probability, "probabilities": self.probabilities}


class EncoderGraph:
    """An encoder's ONNX session and tokenizer: batches of texts -> the graph's output rows.
    Used by the runtime's `Encoder` and by the build's parity check and accuracy gate."""

    def __init__(
        self,
        path: Path,
        tokenizer: Tokenizer,
        inputs: list[str],
        max_length: int,
        pad_id: int,
        threads: int,
        providers: list[str],
        provider_options: list[dict] | None = None,
        vocab_size: int | None = None,
        unfused_layer_norms: bool = False,
    ):
        # Tokenizers before the session: what parsing them frees, the session's allocations reuse.
        self.tokenizer = Tokenizer.from_str(tokenizer.to_str())
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.truncating = Tokenizer.from_str(self.tokenizer.to_str())
        self.truncating.enable_truncation(int(max_length))
        try:
            self.session = open_session(path, threads, providers, provider_options, unfused_layer_norms)
        except Exception as exc:  # onnxruntime's errors have no common base class
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise BundleError(f"{path}: onnxruntime cannot load this graph ({first}): rebuild the bundle") from None
        graph_inputs = [i.name for i in self.session.get_inputs()]
        if sorted(graph_inputs) != sorted(inputs):
            raise BundleError(f"{path}: the graph's inputs {graph_inputs} are not the manifest's {inputs}: rebuild")
        self.output_width = self.session.get_outputs()[0].shape[-1]
        self.inputs, self.max_length, self.pad_id = list(inputs), int(max_length), int(pad_id)
        self.unfused_layer_norms = unfused_layer_norms
        self.vocab_size = vocab_size

    def token_counts(self, texts: list[str]) -> list[int]:
        return [len(e.ids) for e in self.tokenizer.encode_batch(_checked_texts(texts))]

    def run(self, texts: list[str], batch_size: int = 32, truncate: bool = True) -> np.ndarray:
        """The output row of each text, in the order given."""
        texts = _checked_texts(texts)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size is {batch_size!r}; use 1 or more")
        encodings = self.tokenizer.encode_batch(texts)
        too_long = [i for i, e in enumerate(encodings) if len(e.ids) > self.max_length]
        if too_long and not truncate:
            i = too_long[0]
            raise InputError(
                f"text {i + 1} has {len(encodings[i].ids)} tokens; this bundle takes at most {self.max_length} "
                "(shorten it, or allow truncation)"
            )
        if too_long:
            log.warning("%d text(s) longer than %d tokens were truncated", len(too_long), self.max_length)
            for i, encoding in zip(too_long, self.truncating.encode_batch([texts[i] for i in too_long])):
                encodings[i] = encoding
        order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))
        rows: list[np.ndarray | None] = [None] * len(texts)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            for i, row in zip(chunk, self._run_batch([encodings[i] for i in chunk])):
                rows[i] = row
        return np.stack(rows) if rows else np.zeros((0, 0), np.float32)

    def feed(self, encodings) -> dict[str, np.ndarray]:
        """The graph's inputs for one batch, padded to its longest text."""
        width = max(len(e.ids) for e in encodings)
        feed = {
            "input_ids": np.full((len(encodings), width), self.pad_id, np.int64),
            "attention_mask": np.zeros((len(encodings), width), np.int64),
            "token_type_ids": np.zeros((len(encodings), width), np.int64),
        }
        for row, e in enumerate(encodings):
            feed["input_ids"][row, : len(e.ids)] = e.ids
            feed["attention_mask"][row, : len(e.ids)] = 1
            feed["token_type_ids"][row, : len(e.ids)] = e.type_ids
        return {name: feed[name] for name in self.inputs}

    def _run_batch(self, encodings) -> np.ndarray:
        feed = self.feed(encodings)
        if self.vocab_size is not None and feed["input_ids"].max() >= self.vocab_size:
            raise BundleError(
                f"the tokenizer gave token id {int(feed['input_ids'].max())}, beyond the model's vocabulary of "
                f"{self.vocab_size}: the bundle's tokenizer.json does not belong to its graph; rebuild"
            )
        try:
            (out,) = self.session.run(None, feed)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise BundleError(f"onnxruntime failed on a batch of {len(encodings)} ({first[:300]}): rebuild") from None
        return out.astype(np.float32, copy=False)


# onnxruntime fuses each residual Add + LayerNormalization into a SkipLayerNormalization at load.
# A bundle whose build left them apart on purpose (targets/*.toml [encoder] fuse_skip_layer_norm =
# false, recorded as the manifest's graph.layer_norms = "unfused": the CPU kernel of the fused node
# measured slower) is opened without that fusion; any other bundle as onnxruntime would.
UNFUSED_LAYER_NORMS = ["SkipLayerNormFusion"]


def open_session(
    path: Path,
    threads: int,
    providers: list[str],
    provider_options=None,
    unfused_layer_norms: bool = False,
    optimized_path=None,
):
    """The onnxruntime session of an encoder graph (`optimized_path`: also write the graph as
    onnxruntime optimized it, to see what runs)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 4  # failures reach the user as our one line, not onnxruntime's log
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(
        str(path),
        options,
        providers=providers,
        provider_options=provider_options,
        disabled_optimizers=UNFUSED_LAYER_NORMS if unfused_layer_norms else None,
    )


def _checked_texts(texts) -> list[str]:
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InputError(f"text {i + 1} is {type(text).__name__}, not a string")
        if not text.strip():
            raise InputError(f"text {i + 1} is empty; give each text some words")
        check_text(text, f"text {i + 1}", InputError)
    return texts


def encoder_provider_options(providers: list[str], manifest: EncoderManifest) -> list[dict]:
    """TensorRT needs shape profiles for the dynamic axes: one text of one token up to a batch of
    32 of the bundle's longest input."""
    longest = manifest.model.max_sequence_length

    def shapes(batch: int, tokens: int) -> str:
        return ",".join(f"{name}:{batch}x{tokens}" for name in manifest.graph.inputs)

    profiles = (shapes(1, 1), shapes(8, min(64, longest)), shapes(32, longest))
    return [tensorrt_options(manifest, *profiles) if p == "TensorrtExecutionProvider" else {} for p in providers]


class Encoder:
    """An encoder bundle: `classify` for a classifier, `embed` for an embedder, `answer` for a
    question-answering reader."""

    def __init__(self, path: Path, manifest: EncoderManifest, graph: EncoderGraph):
        self.path, self.manifest, self.graph = path, manifest, graph
        self.task = manifest.model.task
        self.labels = list(manifest.model.labels)
        self.normalize = manifest.model.normalize
        self.max_length = graph.max_length

    @classmethod
    def open(
        cls,
        bundle: Path,
        manifest: EncoderManifest,
        threads: int,
        providers: list[str] | None,
        context: int | None = None,
        memory: dict | None = None,
    ) -> Encoder:
        """The Encoder of a verified encoder bundle (`runtime.load` picks it by the manifest's type)."""
        if context is not None:
            raise EdgeSlmError(f"{bundle} is an encoder bundle: it has no context (KV cache) to size")
        check_onnxruntime(bundle, manifest.min_onnxruntime)
        return open_encoder(bundle, manifest, threads, providers)

    def _require(self, task: str, call: str) -> None:
        if self.task != task:
            other = CALLS.get(self.task, "?")
            raise EdgeSlmError(f"{self.path} is a {self.task} bundle: it cannot {call}; use {other} with it")

    def logits(self, texts: list[str], batch_size: int = 32, truncate: bool = True) -> np.ndarray:
        self._require("classification", "classify")
        return self.graph.run(texts, batch_size, truncate)

    def classify(self, texts: list[str] | str, batch_size: int = 32, truncate: bool = True) -> list[Classification]:
        """The most likely label of each text and every label's probability."""
        probabilities = softmax(self.logits(texts, batch_size, truncate))
        results = []
        for row in probabilities:
            ranked = sorted(zip(self.labels, row.tolist()), key=lambda pair: -pair[1])
            results.append(Classification(ranked[0][0], ranked[0][1], dict(ranked)))
        return results

    def embed(self, texts: list[str] | str, batch_size: int = 32, truncate: bool = True) -> np.ndarray:
        """One vector per text, [N, D] float32 (unit length when the model normalizes)."""
        self._require("embedding", "embed")
        return self.graph.run(texts, batch_size, truncate)

    def answer(self, question: str, context: str, **options) -> list:
        """The best spans of `context` that answer `question` (`SpanReader.answer`: top_k,
        doc_stride, max_answer_len, max_seq_len, handle_impossible_answer, align_to_words)."""
        self._require("question-answering", "answer")
        if not hasattr(self, "_reader"):
            from edge_slm.runtime.reader import SpanReader

            self._reader = SpanReader(self.graph)
        return self._reader.answer(question, context, **options)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def open_encoder(bundle: Path, manifest: EncoderManifest, threads: int, providers: list[str] | None) -> Encoder:
    """The Encoder of a verified bundle's files, checked against its manifest."""
    for name in (TOKENIZER_FILE, manifest.graph.file):
        if not (bundle / name).is_file():
            raise BundleError(f"{bundle / name}: missing from the bundle: copy the whole directory again or rebuild")
    try:
        tokenizer = Tokenizer.from_file(str(bundle / TOKENIZER_FILE))
    except Exception as exc:
        raise BundleError(f"{bundle / TOKENIZER_FILE}: cannot be read ({exc})") from None
    chosen = pick_providers(providers or list(manifest.profile.runtime.execution_providers))
    per_provider = encoder_provider_options(chosen, manifest)
    for options in per_provider:
        if "trt_engine_cache_path" in options:
            Path(options["trt_engine_cache_path"]).mkdir(parents=True, exist_ok=True)
    model = manifest.model
    graph = EncoderGraph(
        bundle / manifest.graph.file,
        tokenizer,
        list(manifest.graph.inputs),
        model.max_sequence_length,
        manifest.tokenizer.pad_token_id,
        threads,
        chosen,
        per_provider,
        vocab_size=model.vocab_size,
        unfused_layer_norms=manifest.graph.recorded.get("layer_norms") == "unfused",
    )
    width, want = graph.output_width, model.output_dim
    if isinstance(width, int) and width != want:
        raise BundleError(
            f"{bundle}: the graph's output has {width} columns, the manifest says {want} "
            f"({'labels' if model.task == 'classification' else 'dimensions'}): rebuild the bundle"
        )
    return Encoder(bundle, manifest, graph)
