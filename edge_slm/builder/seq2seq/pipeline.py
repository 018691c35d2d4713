"""The seq2seq build (Marian / OPUS-MT, T5, M2M100 / NLLB, mBART, BART): the encoder build's shape with its own stages.

    load -> export (optimum: encoder + merged decoder) -> validate against torch
         -> [int8 | fp16 -> translation gate against fp32] -> tokenizers -> manifest

`edge-slm build --model DIR [--precision fp32|fp16|int8]` takes this path when DIR's config.json
says model_type marian, t5, m2m_100, mbart or bart (docs/translation.md); the precision defaults to the
profile's `[seq2seq] precision`, the gate's budget is its `[seq2seq.<precision>]` table.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edge_slm.builder.manifest import tool_versions
from edge_slm.builder.runner import Stage, no_section, run_stages, whole_profile
from edge_slm.builder.seq2seq import gate
from edge_slm.builder.seq2seq.export import (
    DECODER_FILE,
    ENCODER_FILE,
    convert_fp16,
    export_graphs,
    quantize_int8,
    validate_graphs,
)
from edge_slm.builder.seq2seq.source import SOURCE_TOKENIZER, TARGET_TOKENIZER, Tokenizers, convert_tokenizers
from edge_slm.core import capabilities
from edge_slm.core.bundle import write_manifest
from edge_slm.core.errors import ModelError, ProfileError
from edge_slm.core.manifest import SearchSettings, Seq2SeqGeneration, Seq2SeqTokenizer
from edge_slm.core.targets import Profile
from edge_slm.core.targets import Seq2Seq as Seq2SeqSpec
from edge_slm.runtime.seq2seq import Seq2SeqGraphs, Translator

SEQ2SEQ_PRECISIONS = ("fp32", "fp16", "int8")
MAX_NEW_TOKENS = 256  # the runtime's cap per translation: a sentence, not a document


@dataclass(frozen=True)
class Seq2SeqRequest:
    model_ref: str
    precision: str
    stages: tuple[str, ...]
    allow_accuracy_loss: bool = False


@dataclass(frozen=True)
class Loaded:
    request: Seq2SeqRequest
    model: Any  # the torch model: validation's reference
    hf_tokenizer: Any
    tokenizers: Tokenizers
    generation: dict  # the manifest's generation section
    model_section: dict


@dataclass(frozen=True)
class Graphs:
    loaded: Loaded
    paths: dict  # file name -> path of the fp32 graphs
    validation: dict | None = None
    quantization: dict | None = None
    accuracy: dict | None = None
    final_dir: Path | None = None  # where the shipped graphs are (the bundle for int8)


def load_stage(request: Seq2SeqRequest, _: None, out_dir: Path, note) -> Loaded:
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, GenerationConfig

    path = Path(request.model_ref)
    try:
        model = AutoModelForSeq2SeqLM.from_pretrained(str(path)).eval()
        hf_tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot load the seq2seq model ({exc})") from None
    cfg, gen = model.config, GenerationConfig.from_model_config(model.config)
    if (path / "generation_config.json").is_file():
        gen = GenerationConfig.from_pretrained(str(path))
    tokenizers = convert_tokenizers(path, hf_tokenizer)
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, int) else gen.eos_token_id[0]
    pad = gen.pad_token_id if gen.pad_token_id is not None else cfg.pad_token_id
    suppressed = sorted({w[0] for w in (gen.bad_words_ids or []) if len(w) == 1} | set(gen.suppress_tokens or []))
    positions = getattr(cfg, "max_position_embeddings", None) or 512  # T5's relative positions: a cap of ours
    generation = {
        "decoder_start_token_id": int(cfg.decoder_start_token_id if cfg.decoder_start_token_id is not None else pad),
        "eos_token_id": int(eos),
        "pad_token_id": int(pad),
        "forced_eos": gen.forced_eos_token_id is not None,
        "suppress_token_ids": [int(t) for t in suppressed],
        "min_length": int(gen.min_length or 0),
        "length_penalty": float(gen.length_penalty),
        "early_stopping": gen.early_stopping if gen.early_stopping in (True, "never") else False,
        "max_new_tokens": int(min(MAX_NEW_TOKENS, positions - 1)),
        "default_beams": int(gen.num_beams or 1),
        "target_languages": dict(tokenizers.target_languages),
    }
    forced_bos = dict(tokenizers.forced_bos)
    if generation["decoder_start_token_id"] in forced_bos.values():
        # mBART-cc25 fine-tunes start the decoder with their target language: that one only.
        forced_bos, generation["target_languages"] = {}, {}
    if not forced_bos and gen.forced_bos_token_id is not None:  # BART's <s>: forced whatever the language
        forced_bos, generation["target_languages"] = {"": int(gen.forced_bos_token_id)}, {"": ""}
    if forced_bos:  # M2M100 / NLLB / mBART-50: the target language is the decoder's first token
        forced = forced_bos
        default = [code for code, i in forced.items() if i == gen.forced_bos_token_id]
        if default:  # the model's generation config names a target language: the default one
            forced[""], generation["target_languages"][""] = forced[default[0]], ""
        generation["forced_bos_token_ids"] = forced
    model_section = {
        "architecture": type(model).__name__,
        "model_type": cfg.model_type,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "encoder_layers": int(getattr(cfg, "encoder_layers", None) or cfg.num_layers),
        "decoder_layers": int(getattr(cfg, "decoder_layers", None) or cfg.num_decoder_layers or cfg.num_layers),
        "hidden_size": int(cfg.d_model),
        "num_heads": int(getattr(cfg, "encoder_attention_heads", None) or cfg.num_heads),
        "vocab_size": int(cfg.vocab_size),
        "max_source_tokens": int(positions),
    }
    note(f"{model_section['architecture']}: {model_section['parameters'] / 1e6:.1f}M params")
    return Loaded(request, model, hf_tokenizer, tokenizers, generation, model_section)


def export_stage(loaded: Loaded, _: None, out_dir: Path, note) -> Graphs:
    paths = export_graphs(Path(loaded.request.model_ref), out_dir, note)
    note(f"{ENCODER_FILE} {_mb(paths[ENCODER_FILE])} MB, {DECODER_FILE} {_mb(paths[DECODER_FILE])} MB")
    return Graphs(loaded, paths, final_dir=out_dir)


def _search(loaded: Loaded) -> SearchSettings:
    g = loaded.generation
    return SearchSettings(
        g["decoder_start_token_id"],
        g["eos_token_id"],
        g["pad_token_id"],
        g["forced_eos"],
        tuple(g["suppress_token_ids"]),
        g["min_length"],
        g["length_penalty"],
        g["early_stopping"],
    )


def graphs_of(loaded: Loaded, directory: Path) -> Seq2SeqGraphs:
    return Seq2SeqGraphs(
        directory / ENCODER_FILE,
        directory / DECODER_FILE,
        _search(loaded),
        os.cpu_count() or 1,
        ["CPUExecutionProvider"],
    )


def translator_of(loaded: Loaded, directory: Path) -> Translator:
    from tokenizers import Tokenizer

    t = loaded.tokenizers
    g = loaded.generation
    source = Tokenizer.from_str(t.source.to_str())
    target = Tokenizer.from_str((t.target or t.source).to_str())
    return Translator(
        graphs_of(loaded, directory),
        source,
        target,
        Seq2SeqTokenizer(SOURCE_TOKENIZER, TARGET_TOKENIZER, t.special_token_ids, t.unk_token_id, t.unk_above),
        Seq2SeqGeneration(
            _search(loaded),
            g["max_new_tokens"],
            g["default_beams"],
            g["target_languages"],
            g.get("forced_bos_token_ids", {}),
        ),
        loaded.model_section["max_source_tokens"],
    )


def validate_stage(graphs: Graphs, _: None, out_dir: Path, note) -> Graphs:
    loaded = graphs.loaded
    validation = validate_graphs(graphs_of(loaded, graphs.final_dir), loaded.model, loaded.hf_tokenizer)
    note(
        f"max |diff| encoder {validation['encoder_max_abs_diff']:.2e}, decoder logits "
        f"{validation['decoder_logits_max_abs_diff']:.2e}: passed"
    )
    return dataclasses.replace(graphs, validation=validation)


def quantize_stage(graphs: Graphs, section: Seq2SeqSpec, out_dir: Path, note) -> Graphs:
    if graphs.loaded.request.precision == "fp16":
        quantization = convert_fp16(graphs.paths, out_dir)
    else:
        quantization = quantize_int8(graphs.paths, out_dir, reduce_range=section.reduce_range)
    note(f"{quantization['method']}: {_mb(out_dir / ENCODER_FILE, out_dir / DECODER_FILE)} MB")
    return dataclasses.replace(graphs, quantization=quantization, final_dir=out_dir)


def gate_stage(graphs: Graphs, section: Seq2SeqSpec, out_dir: Path, note) -> Graphs:
    loaded = graphs.loaded
    precision = loaded.request.precision
    reference = translator_of(loaded, graphs.paths[ENCODER_FILE].parent)
    candidate = translator_of(loaded, graphs.final_dir)
    languages = loaded.generation["target_languages"]
    # A multilingual model needs a target language: German where it has one (the shipped references').
    preferred = [code for code in ("de", "deu", "deu_Latn") if code in languages] + sorted(languages)
    target = None if "" in languages or not languages else preferred[0]
    german = target in ("de", "deu", "deu_Latn") or loaded.request.model_ref.rstrip("/").endswith("-de")
    measured = gate.measure(candidate, reference, target, german)
    accuracy = gate.check(measured, getattr(section, precision), precision, loaded.request.allow_accuracy_loss)
    verdict = "within budget" if accuracy["passed"] else "OUTSIDE budget (allowed by --allow-accuracy-loss)"
    note(
        f"vs fp32 on {accuracy['texts']} sentences: chrF {accuracy['chrf_vs_fp32']:.1f}, BLEU "
        f"{accuracy['bleu_vs_fp32']:.1f}, {accuracy['identical_share']:.0%} identical: {verdict}"
    )
    return dataclasses.replace(graphs, accuracy=accuracy)


def tokenizer_stage(graphs: Graphs, _: None, out_dir: Path, note) -> Graphs:
    t = graphs.loaded.tokenizers
    t.source.save(str(out_dir / SOURCE_TOKENIZER))
    if t.target is not None:
        t.target.save(str(out_dir / TARGET_TOKENIZER))
    return graphs


def manifest_stage(graphs: Graphs, profile: Profile, out_dir: Path, note) -> dict:
    import onnx

    loaded = graphs.loaded
    ops: dict[str, int] = {}
    opset, ir_version = {}, 0
    for name in (ENCODER_FILE, DECODER_FILE):
        proto = onnx.load(str(out_dir / name), load_external_data=False)
        for node in proto.graph.node:
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
        opset.update({o.domain or "ai.onnx": o.version for o in proto.opset_import})
        ir_version = max(ir_version, proto.ir_version)
    t = loaded.tokenizers
    return write_manifest(
        out_dir,
        {
            "family": "seq2seq",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "target": profile.name,
            "precision": loaded.request.precision,
            "source": {"ref": loaded.request.model_ref, "kind": "hf-dir", "sha256": None},
            "model": loaded.model_section,
            "graph": {
                "kind": "seq2seq",
                "file": ENCODER_FILE,
                "decoder_file": DECODER_FILE,
                "opset": opset,
                "ir_version": ir_version,
                "nodes": sum(ops.values()),  # both graphs
                "op_counts": dict(sorted(ops.items())),
            },
            "min_onnxruntime": capabilities.min_onnxruntime(set()),
            "tokenizer": {
                "source_file": SOURCE_TOKENIZER,
                "target_file": TARGET_TOKENIZER if t.target is not None else SOURCE_TOKENIZER,
                "special_token_ids": list(t.special_token_ids),
                "unk_token_id": t.unk_token_id,
                **({"unk_above": t.unk_above} if t.unk_above else {}),
            },
            "generation": loaded.generation,
            "profile": profile.to_dict(),
            "stages": list(loaded.request.stages),
            "validation": graphs.validation,
            "quantization": graphs.quantization,
            "accuracy": graphs.accuracy,
            "versions": tool_versions(),
        },
    )


LOAD = Stage("load", lambda r, p: f"loading seq2seq model {r.model_ref}", no_section, load_stage)
EXPORT = Stage("export", lambda x, p: "exporting encoder + merged decoder with optimum", no_section, export_stage)
VALIDATE = Stage("validate", lambda x, p: "validating the fp32 graphs against torch", no_section, validate_stage)
QUANTIZE = Stage(
    "quantize",
    lambda x, p: (
        f"reducing to {x.loaded.request.precision} "
        + (
            "(float16 weights, activations and cache)"
            if x.loaded.request.precision == "fp16"
            else "(dynamic, per-channel" + (", 7-bit weights)" if p.seq2seq.reduce_range else ")")
        )
    ),
    lambda profile: profile.seq2seq,
    quantize_stage,
)
GATE = Stage(
    "gate",
    lambda x, p: f"accuracy gate: {x.loaded.request.precision} translations against fp32 (chrF, BLEU, identical)",
    lambda profile: profile.seq2seq,
    gate_stage,
)
TOKENIZER = Stage("tokenizer", lambda x, p: "writing the tokenizers", no_section, tokenizer_stage)
MANIFEST = Stage("manifest", lambda x, p: "writing the manifest and checksums", whole_profile, manifest_stage)


def seq2seq_stages(precision: str) -> list[Stage]:
    if precision == "fp32":
        return [LOAD, EXPORT, VALIDATE, TOKENIZER, MANIFEST]
    # The fp32 graphs are the reduced build's intermediates (and its gate's reference): scratch.
    return [LOAD, dataclasses.replace(EXPORT, into="scratch"), VALIDATE, QUANTIZE, GATE, TOKENIZER, MANIFEST]


def build_seq2seq(model_ref, profile: Profile, out: Path, echo, precision=None, allow_accuracy_loss=False) -> dict:
    precision = precision or profile.seq2seq.precision
    if precision not in SEQ2SEQ_PRECISIONS:
        raise ProfileError(
            f"seq2seq models are built in {', '.join(SEQ2SEQ_PRECISIONS)}; --precision {precision} is not one"
        )
    plan = seq2seq_stages(precision)
    request = Seq2SeqRequest(model_ref, precision, tuple(s.name for s in plan), allow_accuracy_loss)
    return run_stages(plan, request, profile, Path(out), echo)


def _mb(*paths: Path) -> float:
    return round(sum(p.stat().st_size for p in paths if p.exists()) / 1e6, 1)
