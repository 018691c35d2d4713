"""A seq2seq model folder: which ones this family claims, and their tokenizers as `tokenizers`
files the device can read (it has no sentencepiece or transformers).

Marian ships sentencepiece models (`source.spm`, `target.spm`) and a `vocab.json` shared by both
sides: the source text is cut into pieces by source.spm and each piece looked up in vocab.json
(unknown pieces: <unk>). transformers has no fast Marian tokenizer, so the source side is rebuilt
here as a Unigram model over source.spm's pieces and scores, numbered by vocab.json; pieces that
vocab.json lacks are numbered after it (`unk_above`: the runtime maps them to <unk>). The target
side only decodes: vocab.json's pieces and sentencepiece's "▁" -> space rule. T5 has a fast
tokenizer: one tokenizer.json does both.

M2M100 is built the same way from its `sentencepiece.bpe.model` (a BPE model: its merges, as
transformers' own converters read them) and `vocab.json`, with its language tokens (`__de__`)
numbered after the vocabulary; the source is `__<src>__ text </s>` and the target language is the
decoder's forced first token (`forced_bos`). NLLB (model_type m2m_100 too) and mBART-50 ship fast
tokenizers: their tokenizer.json is saved as is and their language codes (`deu_Latn`, `de_DE`) are
forced first tokens too. BART has a fast tokenizer and no languages.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from edge_slm.core.errors import ModelError

CLAIMED_TYPES = ("marian", "t5", "m2m_100", "mbart", "bart")
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
    target_languages: dict[str, str]  # language -> source prefix text ("" for a forced first token)
    forced_bos: dict[str, int] = dataclasses.field(default_factory=dict)  # language -> the decoder's first token


def convert_tokenizers(path: Path, hf_tokenizer) -> Tokenizers:
    kind = model_type(str(path))
    if kind == "marian":
        return _marian(path, hf_tokenizer)
    if kind == "m2m_100" and not getattr(hf_tokenizer, "is_fast", False):
        return _m2m100(path, hf_tokenizer)
    if kind in ("m2m_100", "mbart") and getattr(hf_tokenizer, "is_fast", False):
        return _fast_multilingual(hf_tokenizer)
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

    vocab = json.loads((path / "vocab.json").read_text(encoding="utf-8"))
    # Separate vocabularies (`separate_vocabs`): the source is numbered by vocab.json, the
    # generated ids by target_vocab.json, as MarianTokenizer decodes them.
    target_vocab = vocab
    if getattr(hf_tokenizer, "separate_vocabs", False):
        target_file = path / "target_vocab.json"
        if not target_file.is_file():
            raise ModelError(f"{path}: separate_vocabs is set but target_vocab.json is missing: copy the whole folder")
        target_vocab = json.loads(target_file.read_text(encoding="utf-8"))
    proto = spm_model.ModelProto()
    proto.ParseFromString((path / "source.spm").read_bytes())
    if proto.trainer_spec.model_type != 1:  # UNIGRAM
        raise ModelError(f"{path / 'source.spm'}: only unigram sentencepiece models are converted")
    codes = {p: i for p, i in vocab.items() if p.startswith(">>") and p.endswith("<<")}  # target-language tokens
    eos = hf_tokenizer.eos_token
    source, unk_above = _source_tokenizer(path / "source.spm", vocab, codes, hf_tokenizer.unk_token, f"$A {eos}", eos)
    specials = [hf_tokenizer.eos_token, hf_tokenizer.unk_token, hf_tokenizer.pad_token]
    return Tokenizers(
        source,
        _target_tokenizer(target_vocab, hf_tokenizer.unk_token),
        tuple(sorted({target_vocab[t] for t in specials if t in target_vocab})),  # left out of decoded text
        vocab[hf_tokenizer.unk_token],
        unk_above,
        {code[2:-2]: code + " " for code in codes},
    )


def _m2m100(path: Path, hf_tokenizer) -> Tokenizers:
    """M2M100Tokenizer: sentencepiece pieces numbered by vocab.json, `__xx__` language tokens after it."""
    vocab = json.loads((path / "vocab.json").read_text(encoding="utf-8"))
    languages = {code: int(i) for code, i in hf_tokenizer.lang_code_to_id.items()}
    tokens = {hf_tokenizer.get_lang_token(code): i for code, i in languages.items()}
    src = hf_tokenizer.get_lang_token(hf_tokenizer.src_lang)
    eos = hf_tokenizer.eos_token
    spm_file = Path(hf_tokenizer.spm_file)
    source, unk_above = _source_tokenizer(spm_file, vocab, tokens, hf_tokenizer.unk_token, f"{src} $A {eos}", eos)
    return Tokenizers(
        source,
        _target_tokenizer({**vocab, **tokens}, hf_tokenizer.unk_token),
        tuple(sorted(set(hf_tokenizer.all_special_ids) | set(languages.values()))),
        vocab[hf_tokenizer.unk_token],
        unk_above,
        {code: "" for code in languages},
        languages,
    )


def _fast_multilingual(hf_tokenizer) -> Tokenizers:
    """NLLB's and mBART's fast tokenizers: the source language token and EOS come from their own
    post-processor (the `src_lang` they were saved with); the target languages are their language
    codes (`deu_Latn`, `de_DE`), each a forced first token of the decoder."""
    codes = getattr(hf_tokenizer, "lang_code_to_id", None) or {
        t: hf_tokenizer.convert_tokens_to_ids(t) for t in hf_tokenizer.additional_special_tokens if "_" in t
    }
    languages = {code: int(i) for code, i in codes.items()}
    return Tokenizers(
        hf_tokenizer.backend_tokenizer,
        None,
        tuple(sorted(set(hf_tokenizer.all_special_ids) | set(languages.values()))),
        int(hf_tokenizer.unk_token_id),
        None,
        {code: "" for code in languages},
        languages,
    )


def _source_tokenizer(spm_file: Path, vocab: dict, specials: dict, unk_token: str, template: str, eos: str):
    """A `tokenizers` model cutting text as sentencepiece model `spm_file` does, numbered by `vocab`
    (plus `specials`: piece -> id, added tokens that are never split); pieces `vocab` lacks get ids
    from the first free one up (returned: the runtime maps them to unk). Unigram keeps the pieces'
    scores; BPE keeps the merges in sentencepiece's order (transformers' SentencePieceExtractor)."""
    import sentencepiece.sentencepiece_model_pb2 as spm_model
    from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers
    from tokenizers.processors import TemplateProcessing

    proto = spm_model.ModelProto()
    proto.ParseFromString(spm_file.read_bytes())
    ids = {**vocab, **specials}
    size = max(ids.values()) + 1
    unk = vocab[unk_token]
    if proto.trainer_spec.model_type == 1:  # UNIGRAM
        scores = {p.piece: p.score for p in proto.pieces if p.type in (1, 4)}  # normal and user-defined pieces
        by_id = {i: piece for piece, i in ids.items()}
        # Ids the vocabulary gives to pieces sentencepiece cannot produce get a name no text
        # contains, so the Unigram model never picks them and the ids stay the vocabulary's.
        pieces = [
            (by_id[i], scores.get(by_id[i], 0.0))
            if by_id.get(i) in scores or by_id.get(i) in specials
            else (f"\0unused{i}", 0.0)
            for i in range(size)
        ]
        extra = [(p, s) for p, s in scores.items() if p not in ids]
        model = models.Unigram(pieces + extra, unk_id=unk, byte_fallback=False)
    elif proto.trainer_spec.model_type == 2:  # BPE
        from transformers.convert_slow_tokenizer import SentencePieceExtractor

        spm_vocab, merges = SentencePieceExtractor(str(spm_file)).extract()
        extra = [p for p in spm_vocab if p not in ids]
        numbered = {**ids, **{p: size + n for n, p in enumerate(extra)}}
        model = models.BPE(numbered, merges, unk_token=unk_token, fuse_unk=True, byte_fallback=False)
    else:
        raise ModelError(f"{spm_file}: only unigram and BPE sentencepiece models are converted")
    source = Tokenizer(model)
    charsmap = proto.normalizer_spec.precompiled_charsmap
    steps = [normalizers.Precompiled(charsmap)] if charsmap else []
    # sentencepiece's own whitespace rule (trim, collapse runs) after its character map.
    source.normalizer = normalizers.Sequence([*steps, normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")])
    source.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    from tokenizers import decoders

    source.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    named = [t for t in template.split() if t != "$A"]
    source.post_processor = TemplateProcessing(single=template, special_tokens=[(t, ids[t]) for t in named])
    source.add_special_tokens([AddedToken(token) for token in sorted(specials)])
    return source, (size if extra else None)


def _target_tokenizer(vocab: dict, unk_token: str):
    """Decoding only: the vocabulary's pieces and sentencepiece's "▁" -> space rule."""
    from tokenizers import Tokenizer, decoders, models

    target = Tokenizer(models.WordLevel(vocab, unk_token=unk_token))
    target.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return target
