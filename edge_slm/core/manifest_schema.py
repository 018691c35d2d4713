"""The manifest's schema, checked as a whole before anything uses a bundle.

A bundle comes from another machine, so its manifest is untrusted input: every key that the
runtime, `inspect` and `bench` read is checked here for presence and type, and every file name it
gives must be a plain name inside the bundle. The first problem is one error naming the key. A
small hand-written checker, because the device set has no schema library and the rules are few.
"""

from __future__ import annotations

import re

from edge_slm.core.errors import BundleError
from edge_slm.core.manifest import MANIFEST_TYPES, Manifest, family_of

PRECISIONS = ("fp32", "fp16", "int8", "int4")
FAMILIES = tuple(MANIFEST_TYPES)
TASKS = ("classification", "embedding", "question-answering")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_VERSION = re.compile(r"\d+(\.\d+){0,2}([+.-][0-9A-Za-z.]+)?")


class _Rule:
    def __init__(self, what: str, test, optional: bool = False):
        self.what, self.test, self.optional = what, test, optional


def _pos_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 < v < 1 << 31


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 53


def is_plain_name(name) -> bool:
    """A file name the bundle may hold: no directory part, not hidden-special, printable."""
    return (
        isinstance(name, str)
        and 0 < len(name) <= 255
        and name not in (".", "..")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
        and name.isprintable()
    )


def _str_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _optional_dict(v) -> bool:
    return v is None or isinstance(v, dict)


COMMON_RULES = {
    "schema_version": _Rule("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "target": _Rule("a string", lambda v: isinstance(v, str) and v != ""),
    "precision": _Rule(f"one of {', '.join(PRECISIONS)}", lambda v: v in PRECISIONS),
    "source": _Rule("an object", lambda v: isinstance(v, dict)),
    "model": _Rule("an object", lambda v: isinstance(v, dict)),
    "family": _Rule(" or ".join(FAMILIES), lambda v: v in FAMILIES, True),
    "model.architecture": _Rule("a string", lambda v: isinstance(v, str)),
    "model.parameters": _Rule("a count", _count),
    "min_onnxruntime": _Rule("a version such as 1.24.0", lambda v: isinstance(v, str) and _VERSION.fullmatch(v), True),
    "graph": _Rule("an object", lambda v: isinstance(v, dict)),
    "graph.file": _Rule("a plain file name in the bundle", is_plain_name),
    "graph.opset": _Rule("an object", lambda v: isinstance(v, dict)),
    "graph.ir_version": _Rule("a count", _count),
    "graph.nodes": _Rule("a count", _count),
    "graph.op_counts": _Rule("an object", lambda v: isinstance(v, dict)),
    "profile": _Rule("an object", lambda v: isinstance(v, dict)),
    "profile.device": _Rule("an object", lambda v: isinstance(v, dict)),
    "profile.device.features": _Rule("a list of strings", _str_list, True),
    "profile.runtime": _Rule("an object", lambda v: isinstance(v, dict)),
    "profile.runtime.execution_providers": _Rule("a non-empty list of provider names", lambda v: _str_list(v) and v),
    "profile.runtime.threads": _Rule("a positive integer", _pos_int),
    "profile.runtime.tensorrt": _Rule("an object or null", _optional_dict, True),
    "profile.runtime.serve_max_tokens": _Rule("a positive integer", _pos_int, True),
    "profile.runtime.serve_parallel": _Rule("a positive integer", _pos_int, True),
    "profile.runtime.serve_request_seconds": _Rule(
        "a positive number of seconds",
        lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1e9,
        True,
    ),
    "files": _Rule("a non-empty object of file name -> {sha256, bytes}", lambda v: isinstance(v, dict) and v),
    "validation": _Rule("an object or null", _optional_dict, True),
    "quantization": _Rule("an object or null", _optional_dict, True),
    "accuracy": _Rule("an object or null", _optional_dict, True),
    "pruning": _Rule("an object or null", _optional_dict, True),
    "versions": _Rule("an object or null", _optional_dict, True),
}
# A decoder (the family of bundles without a "family" key) has a KV cache and a context length.
DECODER_RULES = {
    **COMMON_RULES,
    "graph.kind": _Rule("fused or generic", lambda v: v in ("fused", "generic")),
    "graph.prefill_file": _Rule("a plain file name in the bundle", is_plain_name, True),
    "graph.kv_cache": _Rule("an object", lambda v: isinstance(v, dict)),
    "graph.kv_cache.shared_buffer": _Rule("true or false", lambda v: isinstance(v, bool)),
}
for _key in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "vocab_size", "context_length"):
    DECODER_RULES[f"model.{_key}"] = _Rule("a positive integer", _pos_int)
# Sampling defaults (the server's, for what a request leaves out): recorded since they were; optional.
SAMPLING_DEFAULT_RANGES = {"temperature": (0, 2), "top_p": (0, 1), "top_k": (0, 1 << 20), "repetition_penalty": (0, 10)}
DECODER_RULES["generation.sampling"] = _Rule("an object", lambda v: isinstance(v, dict), True)
for _key, (_low, _high) in SAMPLING_DEFAULT_RANGES.items():
    DECODER_RULES[f"generation.sampling.{_key}"] = _Rule(
        f"a number from {_low} to {_high}",
        lambda v, low=_low, high=_high: isinstance(v, (int, float)) and not isinstance(v, bool) and low <= v <= high,
        True,
    )
RULES = DECODER_RULES

# An encoder maps a batch of texts to one vector (embedding) or one set of label scores each, or
# (question-answering) a question and a context to a start and an end logit per token.
ENCODER_RULES = {
    **COMMON_RULES,
    "graph.kind": _Rule("encoder", lambda v: v == "encoder"),
    "graph.inputs": _Rule("a list of input names", lambda v: _str_list(v) and v),
    "graph.output": _Rule("an output name", lambda v: isinstance(v, str) and v != ""),
    # Optional: bundles built before the choice existed say nothing, and run as onnxruntime fuses them.
    "graph.layer_norms": _Rule("fused or unfused", lambda v: v in ("fused", "unfused"), True),
    "model.task": _Rule("classification, embedding or question-answering", lambda v: v in TASKS),
    "model.normalize": _Rule("true or false", lambda v: isinstance(v, bool)),
    "model.pooling": _Rule("cls, mean or none", lambda v: v in ("cls", "mean", "none")),
    "model.labels": _Rule("a list of at least 2 label names", lambda v: _str_list(v) and len(v) >= 2, True),
    "tokenizer": _Rule("an object", lambda v: isinstance(v, dict)),
    "tokenizer.pad_token_id": _Rule("a count", _count),
    "tokenizer.lowercase": _Rule("true or false", lambda v: isinstance(v, bool), True),
}
for _key in ("num_layers", "hidden_size", "num_heads", "vocab_size", "max_sequence_length", "output_dim"):
    ENCODER_RULES[f"model.{_key}"] = _Rule("a positive integer", _pos_int)

# A seq2seq bundle: an encoder graph, a merged decoder graph with cache, and the search settings.
SEQ2SEQ_RULES = {
    **COMMON_RULES,
    "graph.kind": _Rule("seq2seq", lambda v: v == "seq2seq"),
    "graph.decoder_file": _Rule("a plain file name in the bundle", is_plain_name),
    "model.model_type": _Rule("a string", lambda v: isinstance(v, str)),
    "tokenizer": _Rule("an object", lambda v: isinstance(v, dict)),
    "tokenizer.source_file": _Rule("a plain file name in the bundle", is_plain_name),
    "tokenizer.target_file": _Rule("a plain file name in the bundle", is_plain_name),
    "tokenizer.special_token_ids": _Rule("a list of token ids", lambda v: isinstance(v, list) and all(map(_count, v))),
    "tokenizer.unk_token_id": _Rule("a count", _count),
    "tokenizer.unk_above": _Rule("a positive integer", _pos_int, True),
    "generation": _Rule("an object", lambda v: isinstance(v, dict)),
    "generation.decoder_start_token_id": _Rule("a count", _count),
    "generation.eos_token_id": _Rule("a count", _count),
    "generation.pad_token_id": _Rule("a count", _count),
    "generation.forced_eos": _Rule("true or false", lambda v: isinstance(v, bool)),
    "generation.suppress_token_ids": _Rule(
        "a list of token ids", lambda v: isinstance(v, list) and all(map(_count, v))
    ),
    "generation.min_length": _Rule("a count", _count),
    "generation.length_penalty": _Rule(
        "a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) < 100
    ),
    "generation.early_stopping": _Rule('true, false or "never"', lambda v: isinstance(v, bool) or v == "never"),
    "generation.max_new_tokens": _Rule("a positive integer", _pos_int),
    "generation.default_beams": _Rule("a positive integer", _pos_int),
    "generation.target_languages": _Rule(
        "an object of language -> prefix text",
        lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in (*v, *v.values())),
    ),
    "generation.forced_bos_token_ids": _Rule(
        "an object of language -> token id",
        lambda v: isinstance(v, dict) and all(isinstance(k, str) and _count(i) for k, i in v.items()),
        True,
    ),
}
for _key in ("encoder_layers", "decoder_layers", "hidden_size", "num_heads", "vocab_size", "max_source_tokens"):
    SEQ2SEQ_RULES[f"model.{_key}"] = _Rule("a positive integer", _pos_int)

# One entry per MANIFEST_TYPES family.
RULES_OF = {
    "decoder": DECODER_RULES,
    "encoder": ENCODER_RULES,
    "seq2seq": SEQ2SEQ_RULES,
}  # one entry per MANIFEST_TYPES family

_MISSING = object()


def _lookup(manifest: dict, key: str):
    value = manifest
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def parse_manifest(manifest, where: str) -> Manifest:
    """The typed manifest of a manifest dict, after `check_manifest`: a BundleError naming the key
    otherwise. The one place a manifest's JSON becomes a `DecoderManifest`, `EncoderManifest`, ..."""
    check_manifest(manifest, where)
    return MANIFEST_TYPES[family_of(manifest)].from_checked(manifest)


def check_manifest(manifest, where: str) -> dict:
    """Raise BundleError naming the first key that is missing or of the wrong type or value."""
    if not isinstance(manifest, dict):
        raise BundleError(
            f"{where}: the manifest must be a JSON object, got {type(manifest).__name__}: rebuild the bundle"
        )
    family = family_of(manifest)
    if family not in FAMILIES:
        raise BundleError(
            f"{where}: manifest key 'family' must be {' or '.join(FAMILIES)}, got {family!r}: rebuild the bundle"
        )
    for key, rule in RULES_OF[family].items():
        value = _lookup(manifest, key)
        if value is _MISSING:
            if rule.optional:
                continue
            raise BundleError(f"{where}: the manifest has no '{key}' ({rule.what}): rebuild the bundle")
        if not rule.test(value):
            shown = repr(value)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise BundleError(f"{where}: manifest key '{key}' must be {rule.what}, got {shown}: rebuild the bundle")
    for name, info in manifest["files"].items():
        if not is_plain_name(name) or name == "manifest.json":
            raise BundleError(
                f"{where}: the manifest lists the file {name!r}, which is not a plain file name inside the bundle: "
                "a bundle names only its own files; rebuild it"
            )
        if not (isinstance(info, dict) and _count(info.get("bytes")) and _SHA256.fullmatch(str(info.get("sha256")))):
            raise BundleError(
                f"{where}: manifest entry files.{name} needs a 'sha256' (64 hex digits) and 'bytes': rebuild the bundle"
            )
    model = manifest["model"]
    if family == "encoder":
        if model["task"] == "classification" and len(model.get("labels") or []) != model["output_dim"]:
            raise BundleError(
                f"{where}: a classifier's model.labels must name its {model['output_dim']} outputs: rebuild the bundle"
            )
    elif family == "decoder" and model["num_heads"] % model["num_kv_heads"]:
        raise BundleError(
            f"{where}: model.num_heads {model['num_heads']} is not a multiple of num_kv_heads {model['num_kv_heads']}"
        )
    for key in (
        "graph.file",
        "graph.prefill_file",
        "graph.decoder_file",
        "tokenizer.source_file",
        "tokenizer.target_file",
    ):
        if key not in RULES_OF[family]:  # another family's file key: neither checked nor read
            continue
        name = _lookup(manifest, key)
        if name is not _MISSING and name not in manifest["files"]:
            raise BundleError(
                f"{where}: '{key}' names {name!r}, which the manifest's files do not list: rebuild the bundle"
            )
    return manifest
