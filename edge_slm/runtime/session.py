"""One onnxruntime session over a bundle's decoder, with its KV cache.

For fused graphs (GroupQueryAttention) one buffer per layer of [1, kv_heads, context, head_dim]
is preallocated and bound as both past and present: onnxruntime writes new keys in place and a
decode step copies nothing. Generic graphs fall back to feeding `present` back as `past`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edge_slm.core.capabilities import version_tuple
from edge_slm.core.errors import BundleError, EdgeSlmError
from edge_slm.core.manifest import DecoderManifest, Manifest, TensorRTSettings

log = logging.getLogger("edge_slm.runtime")
_warned: set[str] = set()


# The fused graph's optional input: the LM head runs for the last N positions only (0: all).
LOGITS_TO_KEEP = "logits_to_keep"


class ContextFullError(EdgeSlmError):
    """The KV cache holds `context_length` tokens: nothing more fits."""


def pick_providers(requested: tuple[str, ...] | list[str]) -> list[str]:
    """The requested providers this onnxruntime has, in order; a warning for each one it lacks."""
    available = set(ort.get_available_providers())
    chosen = [p for p in requested if p in available]
    for missing in (p for p in requested if p not in available):
        if missing not in _warned:
            _warned.add(missing)
            log.warning(
                "%s is not available in this onnxruntime build; using %s instead",
                missing,
                ", ".join(chosen) or "CPUExecutionProvider",
            )
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def check_onnxruntime(bundle: Path, needed: str | None, have: str | None = None) -> None:
    """Refuse, in our words, a bundle this onnxruntime is too old for (before onnxruntime's own error)."""
    have = have or ort.__version__
    if needed and version_tuple(have) < version_tuple(needed):
        raise BundleError(
            f"{bundle}: this bundle needs onnxruntime >= {needed}, this device has {have}: "
            f"`pip install 'onnxruntime>={needed}'`, or rebuild for a profile that lists {have}"
        )


GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def provider_options(providers: list[str], manifest: DecoderManifest) -> list[dict]:
    """Per-provider options: TensorRT's come from the profile's [runtime.tensorrt] table, with
    shape profiles spanning one decode token to the largest prefill, over the bundle's KV cache."""
    trt = manifest.profile.runtime.tensorrt or TensorRTSettings()
    model = manifest.model
    kv = f"1x{model.num_kv_heads}x{model.context_length}x{model.head_dim}"

    def shapes(tokens: int, total: int) -> str:
        dims = [f"input_ids:1x{tokens}", f"position_ids:1x{tokens}", f"attention_mask:1x{total}"]
        dims += [f"past_key_values.{i}.{kind}:{kv}" for i in range(model.num_layers) for kind in ("key", "value")]
        return ",".join(dims)

    longest = trt.max_prompt_tokens
    profiles = (shapes(1, 1), shapes(1, model.context_length // 2), shapes(longest, model.context_length))
    return [tensorrt_options(manifest, *profiles) if p == "TensorrtExecutionProvider" else {} for p in providers]


def tensorrt_options(manifest: Manifest, min_shapes: str, opt_shapes: str, max_shapes: str) -> dict:
    """TensorRT's options from the profile's [runtime.tensorrt] table, with the bundle's shape
    profile and an engine cache per graph (its sha256)."""
    trt = manifest.profile.runtime.tensorrt or TensorRTSettings()
    graph = manifest.files.get(manifest.graph.file)
    cache = Path(trt.engine_cache_path).expanduser() / (graph.sha256 if graph else "bundle")[:16]
    return {
        "trt_fp16_enable": str(trt.fp16_enable),
        # Explicit QDQ graphs need the int8 flag; fp16 and fp32 bundles must not set it.
        "trt_int8_enable": str(trt.int8_enable and manifest.precision == "int8"),
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(cache),
        "trt_profile_min_shapes": min_shapes,
        "trt_profile_opt_shapes": opt_shapes,
        "trt_profile_max_shapes": max_shapes,
    }


@dataclass(frozen=True)
class CacheShape:
    """What the session needs to know of the model: its KV cache and its vocabulary."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    context_length: int
    vocab_size: int

    @classmethod
    def of(cls, model) -> CacheShape:
        """From a typed manifest's `model` (`DecoderModel`) or the build's model info (a dict)."""
        get = model.__getitem__ if isinstance(model, dict) else model.__getattribute__
        return cls(*(int(get(f.name)) for f in fields(cls)))


class DecoderSession:
    """A decoder graph in onnxruntime with its KV cache; `for_bundle` opens a bundle's."""

    def __init__(
        self,
        model_path: Path,
        shape: CacheShape,
        threads: int,
        providers: list[str],
        shared_buffer: bool = True,
        prefill_file: str | None = None,
        per_provider: list[dict] | None = None,
    ):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # onnxruntime's own error log would repeat, unformatted, the one line edge-slm prints.
        options.log_severity_level = 4
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        per_provider = per_provider or [{} for _ in providers]
        self.session = _open_session(model_path, options, providers, per_provider)
        # Int8 bundles may carry a second graph for prompts (the same weights at another kernel
        # accuracy level: onnxruntime's fast one-token path is slow for many rows).
        self.prefill_session = None
        if prefill_file:
            # Its threads must not spin after a prompt: they would steal the decode steps' cores.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self.prefill_session = _open_session(
                Path(model_path).parent / prefill_file, options, providers, per_provider
            )
        self.providers = self.session.get_providers()
        self.context_length = shape.context_length
        self.num_layers = shape.num_layers
        self.kv_shape = (1, shape.num_kv_heads, self.context_length, shape.head_dim)
        self.vocab_size = shape.vocab_size
        self.shared = shared_buffer
        self.past_names = [f"past_key_values.{i}.{kind}" for i in range(self.num_layers) for kind in ("key", "value")]
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        # Some generic graphs (optimum's Gemma, Bloom) derive positions from the mask themselves.
        self.takes_positions = any(i.name == "position_ids" for i in self.session.get_inputs())
        for session in (self.session, self.prefill_session):
            if session is not None:
                check_signature(session, self, model_path)
        # Graphs that can skip the LM head for prompt tokens whose logits nobody reads.
        self.keeps_logits = any(i.name == LOGITS_TO_KEEP for i in self.session.get_overridable_initializers())
        # Position and mask inputs come from these, sliced: no per-step allocation.
        self._positions = np.arange(self.context_length, dtype=np.int64)[None, :]
        self._ones = np.ones((1, self.context_length), dtype=np.int64)
        self.length = 0  # tokens in the cache
        self._tokens = np.zeros(self.context_length, dtype=np.int64)  # the cached tokens' ids
        # Longrope bundles (Phi-3.5, Phi-4-mini) whose graph changes rotary tables past this length:
        # a sequence that grows past it is encoded again whole (generation.json's `rope_switch`).
        self.rope_switch: int | None = None
        # fp16 bundles (Jetson) keep the cache in fp16; logits are fp32 in every bundle.
        past_type = next(i.type for i in self.session.get_inputs() if i.name == self.past_names[0])
        self.kv_dtype = np.float16 if past_type == "tensor(float16)" else np.float32
        # On a GPU the cache lives in device memory: a decode step then moves only the new token.
        self.kv_device = "cuda" if self.providers[0] in GPU_PROVIDERS else "cpu"
        if self.shared:
            if self.kv_device == "cpu":
                # numpy owns the memory and onnxruntime uses it in place, so that a prompt's cache
                # can be written into it directly (`_prefill_empty`); np.zeros pages become
                # resident only when written, as onnxruntime's own allocation does.
                self._arrays = [np.zeros(self.kv_shape, self.kv_dtype) for _ in self.past_names]
                self._buffers = [ort.OrtValue.ortvalue_from_numpy(a) for a in self._arrays]
            else:
                self._arrays = None
                self._buffers = [
                    ort.OrtValue.ortvalue_from_shape_and_type(self.kv_shape, self.kv_dtype, self.kv_device, 0)
                    for _ in self.past_names
                ]
            self._binding = self._bind(self.session)
            self._prefill_binding = self._bind(self.prefill_session) if self.prefill_session else None
            self._step_logits = ort.OrtValue.ortvalue_from_shape_and_type((1, 1, self.vocab_size), np.float32, "cpu", 0)
        else:
            self._arrays = None
            self._past = self._empty_past()

    @classmethod
    def for_bundle(
        cls, model_path: Path, manifest: DecoderManifest, threads: int, providers: list[str], context: int | None = None
    ) -> DecoderSession:
        """The session of a (verified) bundle: shape, cache layout, prefill graph and provider
        options from its manifest. `context` sizes the KV cache below the bundle's context length
        (memory is 2 x layers x kv_heads x context x head_dim x 4 bytes, allocated up front)."""
        per_provider = provider_options(providers, manifest)
        for opts in per_provider:
            if "trt_engine_cache_path" in opts:
                Path(opts["trt_engine_cache_path"]).mkdir(parents=True, exist_ok=True)
        shape = CacheShape.of(manifest.model)
        if context is not None:
            shape = replace(shape, context_length=context)
        return cls(
            model_path,
            shape,
            threads,
            providers,
            shared_buffer=manifest.graph.shared_kv_buffer,
            prefill_file=manifest.graph.prefill_file,
            per_provider=per_provider,
        )

    def _prefill_empty(self, session, ids, mask, positions) -> np.ndarray:
        """A prompt into an empty cache with the LM head on its last position only. onnxruntime's
        IO binding cannot set an input that has a default (logits_to_keep), so this one call
        goes through `run` with an empty past and its present (the prompt's keys and values, a
        few MB) is copied into the shared cache; the 128 x vocabulary logits of the other prompt
        positions are never computed."""
        empty = self._empty_past()
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": np.ascontiguousarray(positions)}
        feed.update(zip(self.past_names, empty))
        feed[LOGITS_TO_KEEP] = np.array([1], dtype=np.int64)
        outputs = _run(session.run, ["logits", *self.present_names], feed, at=0)
        seq = ids.shape[1]
        for array, present in zip(self._arrays, outputs[1:]):
            array[:, :, :seq] = present
        return outputs[0]

    def _bind(self, session):
        """An IO binding whose past and present are the shared per-layer cache buffers."""
        binding = session.io_binding()
        for past, present, buf in zip(self.past_names, self.present_names, self._buffers):
            binding.bind_ortvalue_input(past, buf)
            binding.bind_ortvalue_output(present, buf)
        return binding

    def _bound_logits(self, binding) -> np.ndarray:
        # get_outputs() lists bound outputs in binding order; the logits are the only 3-D one.
        return next(v for v in binding.get_outputs() if len(v.shape()) == 3).numpy()

    def _empty_past(self) -> list[np.ndarray]:
        shape = (1, self.kv_shape[1], 0, self.kv_shape[3])
        return [np.zeros(shape, self.kv_dtype) for _ in self.past_names]

    def reset(self) -> None:
        self.rollback(0)

    def rollback(self, length: int) -> None:
        """Forget every cached token after the first `length` (a chat turn that diverged)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot roll back to {length}: {self.length} tokens cached")
        if not self.shared and length != self.length:
            self._past = [p[:, :, :length] for p in self._past]
        self.length = length

    def logprobs(self, token_ids: list[int]) -> np.ndarray:
        """log p(token[t+1] | tokens[..t]) over the vocabulary, [len-1, V], in one uncached pass."""
        self.reset()
        logits = self.forward(token_ids, all_logits=True)[:-1].astype(np.float64)
        self.reset()
        logits -= logits.max(axis=-1, keepdims=True)
        return logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))

    def forward(self, token_ids: list[int] | np.ndarray, all_logits: bool = False) -> np.ndarray:
        """Run new tokens through the model after the cached ones; returns the logits of the last
        token [V] (or of every new token [S, V] with `all_logits`)."""
        ids = np.asarray(token_ids, dtype=np.int64).reshape(1, -1)
        seq = ids.shape[1]
        total = self.length + seq
        if seq == 0:
            raise ValueError("forward() needs at least one token")
        if total > self.context_length:
            raise ContextFullError(f"{total} tokens do not fit the context of {self.context_length}")
        if self.rope_switch is not None and 0 < self.length <= self.rope_switch < total:
            # The cached keys were rotated with the short-factor table; transformers' Phi-3 encodes
            # the whole sequence again with the long one when it grows past the switch, and so
            # does this (once per sequence: the prompt's cost again).
            everything = np.concatenate([self._tokens[: self.length], ids[0]])
            self.reset()
            logits = self.forward(everything, all_logits=all_logits)
            return logits[-seq:] if all_logits else logits
        positions = self._positions[:, self.length : total]
        mask = self._ones[:, :total]
        # Prompts go through the prefill graph when there is one; scoring (all_logits) keeps the
        # decode graph, so that perplexity and agreement measure what decoding computes.
        prefill = seq > 1 and not all_logits and self.prefill_session is not None
        session = self.prefill_session if prefill else self.session
        if self.shared and self.length == 0 and seq > 1 and not all_logits and self.keeps_logits and self._arrays:
            logits = self._prefill_empty(session, ids, mask, positions)
        elif self.shared:
            binding = self._prefill_binding if prefill else self._binding
            binding.bind_cpu_input("input_ids", ids)
            binding.bind_cpu_input("attention_mask", mask)
            binding.bind_cpu_input("position_ids", np.ascontiguousarray(positions))
            if seq == 1:
                binding.bind_ortvalue_output("logits", self._step_logits)
            else:
                binding.bind_output("logits", "cpu")
            _run(session.run_with_iobinding, binding, at=self.length)
            # A copy: the bound buffer is overwritten by the next step (196 kB, ~10 us for 49k vocab).
            logits = self._step_logits.numpy().copy() if seq == 1 else self._bound_logits(binding)
        else:
            feed = {"input_ids": ids, "attention_mask": mask}
            if self.takes_positions:
                feed["position_ids"] = np.ascontiguousarray(positions)
            feed.update(zip(self.past_names, self._past))
            if self.keeps_logits:
                feed[LOGITS_TO_KEEP] = np.array([seq if all_logits else 1], dtype=np.int64)
            outputs = _run(session.run, None, feed, at=self.length)
            logits, self._past = outputs[0], outputs[1:]
        self._tokens[self.length : total] = ids[0]
        self.length = total
        return logits[0] if all_logits else logits[0, -1]


def _open_session(path: Path, options, providers: list[str], provider_options: list[dict]):
    try:
        return ort.InferenceSession(str(path), options, providers=providers, provider_options=provider_options)
    except Exception as exc:  # onnxruntime's own errors have no common base class
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BundleError(f"{path}: onnxruntime cannot load this graph ({first}): rebuild the bundle") from None


def _run(call, *args, at: int):
    try:
        return call(*args)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BundleError(
            f"onnxruntime failed at position {at} ({first[:300]}): the bundle's manifest may "
            "disagree with its graph (context length, vocabulary): rebuild the bundle"
        ) from None


def check_signature(session, decoder: DecoderSession, path: Path) -> None:
    """The graph's inputs and outputs against the manifest: a manifest that claims other layers,
    heads or vocabulary than the graph has is refused at load, not deep inside onnxruntime."""
    inputs = {i.name: i for i in session.get_inputs()}
    expected = {"input_ids", "attention_mask", *decoder.past_names} | (
        {"position_ids"} if decoder.takes_positions else set()
    )
    if set(inputs) != expected:
        cache = sum(1 for name in inputs if name.startswith("past_key_values.")) // 2
        raise BundleError(
            f"{path}: the graph has {cache} layers of KV cache and inputs {sorted(inputs)[:4]}..., the "
            f"manifest says {decoder.num_layers} layers: rebuild the bundle"
        )
    _, heads, _, head_dim = decoder.kv_shape
    for name in decoder.past_names[:2]:
        dims = inputs[name].shape
        if len(dims) != 4 or any(
            isinstance(d, int) and d != want for d, want in ((dims[1], heads), (dims[3], head_dim))
        ):
            raise BundleError(
                f"{path}: the graph's {name} has shape {dims}, the manifest says "
                f"{heads} KV heads of {head_dim}: rebuild the bundle"
            )
    logits = next((o for o in session.get_outputs() if o.name == "logits"), None)
    if logits is None or (isinstance(logits.shape[-1], int) and logits.shape[-1] != decoder.vocab_size):
        shape = logits.shape if logits is not None else "no logits output"
        raise BundleError(
            f"{path}: the graph's logits are {shape}, the manifest says a vocabulary of "
            f"{decoder.vocab_size}: rebuild the bundle"
        )
