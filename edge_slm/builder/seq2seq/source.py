"""A seq2seq model folder: which ones this family claims, and their tokenizers as `tokenizers`
files the device can read (it has no sentencepiece or transformers).

Marian ships sentencepiece models (`source.spm`, `target.spm`) and a `vocab.json` shared by both
sides: the source text is cut into pieces by source.spm and each piece looked up in vocab.json
(unknown pieces: <unk>). transformers has no fast Marian tokenizer, so the source side is rebuilt
here as a Unigram model over source.spm's pieces and scores, numbered by vocab.json; pieces that
vocab.json lacks are numbered after it (`unk_above`: the runtime maps them to <unk>). The target
side only decodes: vocab.json's pieces and sentencepiece's "▁" -> space rule. T5 has a fast
tokenizer: one tokenizer.json does both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edge_slm.core.errors import ModelError

CLAIMED_TYPES = ("marian", "t5")
SOURCE_TOKENIZER, TARGET_TOKENIZER = "tokenizer.json", "target_tokenizer.json"


def model_type(model_ref: str | None) -> str | None:
    config = Path(model_ref) / "config.json" if model_ref else None
    if config is None or not config.is_file():
        return None
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError):
        return None


def is_seq2seq(model_ref: str | None) -> bool:
    return model_type(model_ref) in CLAIMED_TYPES


@dataclass(frozen=True)
class Tokenizers:
    """What the bundle's tokenizer section records, and the files to write."""

    source: object  # tokenizers.Tokenizer
    target: object | None  # None: the source one decodes too
    special_token_ids: tuple[int, ...]
    unk_token_id: int
    unk_above: int | None
    target_languages: dict[str, str]


def convert_tokenizers(path: Path, hf_tokenizer) -> Tokenizers:
    kind = model_type(str(path))
    if kind == "marian":
        return _marian(path, hf_tokenizer)
    if not getattr(hf_tokenizer, "is_fast", False):
        raise ModelError(f"{path}: no fast tokenizer for {kind}; save one (tokenizer.json) beside the model")
    return Tokenizers(
        hf_tokenizer.backend_tokenizer,
        None,
        tuple(sorted(set(hf_tokenizer.all_special_ids))),
        int(hf_tokenizer.unk_token_id),
        None,
        _t5_prefixes(path),
    )


def _t5_prefixes(path: Path) -> dict[str, str]:
    """T5's task prefixes ("translate English to German: ") by target language, from its config."""
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    out = {}
    for task, params in (config.get("task_specific_params") or {}).items():
        if task.startswith("translation_") and "_to_" in task and isinstance(params, dict) and params.get("prefix"):
            out[task.rsplit("_to_", 1)[1]] = params["prefix"]
    if len(out) == 1:
        out[""] = next(iter(out.values()))  # the only language is the default
    return out


def _marian(path: Path, hf_tokenizer) -> Tokenizers:
    import sentencepiece.sentencepiece_model_pb2 as spm_model
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    if getattr(hf_tokenizer, "separate_vocabs", False):
        raise ModelError(f"{path}: Marian models with separate source and target vocabularies are not converted yet")
    vocab = json.loads((path / "vocab.json").read_text(encoding="utf-8"))
    proto = spm_model.ModelProto()
    proto.ParseFromString((path / "source.spm").read_bytes())
    if proto.trainer_spec.model_type != 1:  # UNIGRAM
        raise ModelError(f"{path / 'source.spm'}: only unigram sentencepiece models are converted")
    scores = {p.piece: p.score for p in proto.pieces if p.type in (1, 4)}  # normal and user-defined pieces
    size = max(vocab.values()) + 1
    by_id = {i: piece for piece, i in vocab.items()}
    # Ids vocab.json gives to pieces source.spm cannot produce get a name no text contains, so the
    # Unigram model never picks them and the ids stay vocab.json's.
    codes = {p for p in vocab if p.startswith(">>") and p.endswith("<<")}  # target-language tokens
    pieces = [
        (by_id[i], scores.get(by_id[i], 0.0))
        if by_id.get(i) in scores or by_id.get(i) in codes
        else (f"\0unused{i}", 0.0)
        for i in range(size)
    ]
    extra = [(p, s) for p, s in scores.items() if p not in vocab]
    unk = vocab[hf_tokenizer.unk_token]
    source = Tokenizer(models.Unigram(pieces + extra, unk_id=unk, byte_fallback=False))
    charsmap = proto.normalizer_spec.precompiled_charsmap
    steps = [normalizers.Precompiled(charsmap)] if charsmap else []
    # sentencepiece's own whitespace rule (trim, collapse runs) after its character map.
    source.normalizer = normalizers.Sequence([*steps, normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")])
    source.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    source.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    from tokenizers.processors import TemplateProcessing

    eos = hf_tokenizer.eos_token
    source.post_processor = TemplateProcessing(single=f"$A {eos}", special_tokens=[(eos, vocab[eos])])
    source.add_special_tokens([AddedToken(code) for code in sorted(codes)])
    target = Tokenizer(models.WordLevel(vocab, unk_token=hf_tokenizer.unk_token))
    target.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    languages = {code[2:-2]: code + " " for code in codes}
    return Tokenizers(
        source,
        target,
        tuple(sorted(set(hf_tokenizer.all_special_ids))),
        unk,
        size if extra else None,
        languages,
    )
