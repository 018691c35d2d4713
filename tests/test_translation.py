"""Seq2seq translation bundles (builder/seq2seq/, runtime/seq2seq.py): tiny random Marian and T5
models made here, with sentencepiece tokenizers trained here (no downloads). The bundles' encoder
and decoder match torch, and greedy and beam-4 search give transformers' `generate` tokens."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import start_server

from edge_slm.core.errors import BundleError
from edge_slm.core.targets import load_profile

CORPUS = [
    "the cat sits on the mat",
    "a dog runs in the park",
    "hello world how are you",
    "machine translation on small devices",
    "the weather is nice today",
    "please turn off the lights",
    "where is the train station",
    "I would like a cup of coffee",
    "the meeting starts at nine",
    "small models translate without a network",
]
SENTENCES = [
    "the cat runs in the park",
    "hello, where is the coffee?",
    "please translate this small sentence on the device",
    "a dog",
    "the weather on the mat is nice today",
]
MAX_NEW = 12


def _spm(directory, prefix, **ids):
    import sentencepiece as spm

    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 5))
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(directory / prefix),
        vocab_size=90,
        hard_vocab_limit=False,
        model_type="unigram",
        character_coverage=1.0,
        minloglevel=2,
        **ids,
    )
    return directory / f"{prefix}.model"


def make_marian(directory):
    import sentencepiece as spm
    import torch
    from transformers import MarianConfig, MarianMTModel, MarianTokenizer

    directory.mkdir(parents=True)
    model_file = _spm(directory, "spm", bos_id=-1, eos_id=1, unk_id=2, pad_id=-1)
    for side in ("source", "target"):
        shutil.copy(model_file, directory / f"{side}.spm")
    pieces = spm.SentencePieceProcessor(model_file=str(model_file))
    vocab = {"</s>": 0, "<unk>": 1}
    for i in range(pieces.get_piece_size()):
        vocab.setdefault(pieces.id_to_piece(i), len(vocab))
    vocab["<pad>"] = len(vocab)  # Marian's pad is its last id
    (directory / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = MarianTokenizer(
        str(directory / "source.spm"), str(directory / "target.spm"), str(directory / "vocab.json")
    )
    torch.manual_seed(0)
    pad = vocab["<pad>"]
    config = MarianConfig(
        vocab_size=len(vocab),
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        pad_token_id=pad,
        eos_token_id=0,
        decoder_start_token_id=pad,
        forced_eos_token_id=0,
        bad_words_ids=[[pad]],
        init_std=0.2,  # at 0.02 a random model writes the same tokens whatever the source says
    )
    model = MarianMTModel(config).eval()
    model.save_pretrained(directory)
    model.generation_config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "source.model").unlink(missing_ok=True)
    return directory


def make_marian_separate_vocabs(directory):
    """A Marian with separate source and target vocabularies (`separate_vocabs`, target_vocab.json):
    the target side's sentencepiece model is trained on other text, so that the ids differ."""
    import sentencepiece as spm
    import torch
    from transformers import MarianConfig, MarianMTModel, MarianTokenizer

    directory.mkdir(parents=True)
    shutil.copy(_spm(directory, "spm", bos_id=-1, eos_id=1, unk_id=2, pad_id=-1), directory / "source.spm")
    reversed_corpus = directory / "target-corpus.txt"
    reversed_corpus.write_text("\n".join(" ".join(w[::-1] for w in line.split()) for line in CORPUS * 5))
    spm.SentencePieceTrainer.train(
        input=str(reversed_corpus),
        model_prefix=str(directory / "target"),
        vocab_size=80,
        hard_vocab_limit=False,
        model_type="unigram",
        character_coverage=1.0,
        minloglevel=2,
        bos_id=-1,
        eos_id=1,
        unk_id=2,
        pad_id=-1,
    )
    (directory / "target.model").rename(directory / "target.spm")

    def vocab_of(model_file):
        pieces = spm.SentencePieceProcessor(model_file=str(model_file))
        vocab = {"</s>": 0, "<unk>": 1}
        for i in range(pieces.get_piece_size()):
            vocab.setdefault(pieces.id_to_piece(i), len(vocab))
        vocab["<pad>"] = len(vocab)
        return vocab

    source, target = vocab_of(directory / "source.spm"), vocab_of(directory / "target.spm")
    (directory / "vocab.json").write_text(json.dumps(source))
    (directory / "target_vocab.json").write_text(json.dumps(target))
    tokenizer = MarianTokenizer(
        str(directory / "source.spm"),
        str(directory / "target.spm"),
        str(directory / "vocab.json"),
        target_vocab_file=str(directory / "target_vocab.json"),
        separate_vocabs=True,
    )
    torch.manual_seed(3)
    pad = target["<pad>"]
    config = MarianConfig(
        vocab_size=len(source),
        decoder_vocab_size=len(target),
        share_encoder_decoder_embeddings=False,
        tie_word_embeddings=False,  # else the output projection is tied to the source embeddings' shape
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        pad_token_id=pad,
        eos_token_id=0,
        decoder_start_token_id=pad,
        forced_eos_token_id=0,
        bad_words_ids=[[pad]],
        init_std=0.2,
    )
    model = MarianMTModel(config).eval()
    model.save_pretrained(directory)
    model.generation_config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "source.model").unlink(missing_ok=True)
    return directory


def make_mbart50(directory):
    """A tiny random mBART with mBART-50's fast tokenizer, converted from a sentencepiece model."""
    import torch
    from transformers import MBart50TokenizerFast, MBartConfig, MBartForConditionalGeneration

    directory.mkdir(parents=True)
    model_file = _spm(directory, "sentencepiece.bpe", bos_id=0, pad_id=1, eos_id=2, unk_id=3)
    tokenizer = MBart50TokenizerFast(vocab_file=str(model_file), src_lang="en_XX", tgt_lang="de_DE", from_slow=True)
    torch.manual_seed(4)
    config = MBartConfig(vocab_size=len(tokenizer), decoder_start_token_id=2, forced_bos_token_id=None, **_BART_SHAPE)
    MBartForConditionalGeneration(config).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def make_nllb(directory):
    """A tiny random M2M100 with NLLB's fast tokenizer (tokenizer.json, 202 language codes),
    converted from a sentencepiece model trained here: model_type m2m_100, as NLLB's."""
    import torch
    from transformers import M2M100Config, M2M100ForConditionalGeneration, NllbTokenizerFast

    directory.mkdir(parents=True)
    model_file = _spm(directory, "sentencepiece.bpe", bos_id=0, pad_id=1, eos_id=2, unk_id=3)
    tokenizer = NllbTokenizerFast(vocab_file=str(model_file), src_lang="eng_Latn", tgt_lang="deu_Latn", from_slow=True)
    torch.manual_seed(6)
    shape = {k: v for k, v in _BART_SHAPE.items() if k != "forced_eos_token_id"}
    config = M2M100Config(vocab_size=len(tokenizer), decoder_start_token_id=2, **shape)
    M2M100ForConditionalGeneration(config).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def make_bart(directory):
    """A tiny random BART with a byte-level BPE tokenizer trained here; <s> is forced first, as
    facebook/bart-large's generation config does."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import BartConfig, BartForConditionalGeneration, BartTokenizerFast

    directory.mkdir(parents=True)
    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator(CORPUS * 5, vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    trainer.save_model(str(directory))
    tokenizer = BartTokenizerFast(str(directory / "vocab.json"), str(directory / "merges.txt"))
    torch.manual_seed(5)
    config = BartConfig(vocab_size=len(tokenizer), decoder_start_token_id=2, forced_bos_token_id=0, **_BART_SHAPE)
    BartForConditionalGeneration(config).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


_BART_SHAPE = dict(
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    max_position_embeddings=64,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
    forced_eos_token_id=2,
    scale_embedding=False,
    init_std=0.2,
)


def make_t5(directory):
    import torch
    from transformers import T5Config, T5ForConditionalGeneration, T5Tokenizer, T5TokenizerFast

    directory.mkdir(parents=True)
    model_file = _spm(directory, "spiece", pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    slow = T5Tokenizer(str(model_file), extra_ids=0, legacy=False)
    fast = T5TokenizerFast.from_pretrained(str(directory), extra_ids=0, legacy=False, vocab_file=str(model_file))
    torch.manual_seed(1)
    config = T5Config(
        vocab_size=len(slow),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        task_specific_params={"translation_en_to_de": {"prefix": "translate English to German: "}},
    )
    model = T5ForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


def make_m2m100(directory):
    """A tiny random M2M100 with M2M100Tokenizer's files: a BPE sentencepiece model (as the real
    sentencepiece.bpe.model is) and vocab.json numbered as fairseq's dictionaries are."""
    import sentencepiece as spm
    import torch
    from transformers import M2M100Config, M2M100ForConditionalGeneration, M2M100Tokenizer

    directory.mkdir(parents=True)
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 5))
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(directory / "spm"),
        vocab_size=90,
        hard_vocab_limit=False,
        model_type="bpe",
        character_coverage=1.0,
        minloglevel=2,
        bos_id=0,
        pad_id=1,
        eos_id=2,
        unk_id=3,
    )
    (directory / "spm.model").rename(directory / "sentencepiece.bpe.model")
    pieces = spm.SentencePieceProcessor(model_file=str(directory / "sentencepiece.bpe.model"))
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for i in range(pieces.get_piece_size()):
        vocab.setdefault(pieces.id_to_piece(i), len(vocab))
    (directory / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = M2M100Tokenizer(
        str(directory / "vocab.json"), str(directory / "sentencepiece.bpe.model"), src_lang="en", tgt_lang="de"
    )
    torch.manual_seed(2)
    config = M2M100Config(
        vocab_size=len(vocab) + len(tokenizer.lang_code_to_id) + tokenizer.num_madeup_words,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
        scale_embedding=False,  # sqrt(d_model) on random embeddings drowns the source: the same tokens for all
        init_std=0.2,
    )
    model = M2M100ForConditionalGeneration(config).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def profile():
    return load_profile("x86-laptop")


@pytest.fixture(scope="module")
def marian(tmp_path_factory):
    return make_marian(tmp_path_factory.mktemp("marian") / "opus-mt-tiny")


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    return make_t5(tmp_path_factory.mktemp("t5") / "t5-tiny")


def _build(model_dir, profile, out, **kw):
    from edge_slm.builder.pipeline import build

    lines = []
    manifest = build(str(model_dir), profile, out, echo=lines.append, **kw)
    return manifest, lines


@pytest.fixture(scope="module")
def marian_bundle(marian, profile, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "marian-fp32"
    manifest, lines = _build(marian, profile, out, precision="fp32")
    return out, manifest, lines


@pytest.fixture(scope="module")
def t5_bundle(t5, profile, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "t5-fp32"
    manifest, lines = _build(t5, profile, out, precision="fp32")
    return out, manifest, lines


@pytest.fixture(scope="module")
def m2m100(tmp_path_factory):
    return make_m2m100(tmp_path_factory.mktemp("m2m") / "m2m100-tiny")


@pytest.fixture(scope="module")
def m2m100_bundle(m2m100, profile, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "m2m100-fp32"
    manifest, lines = _build(m2m100, profile, out, precision="fp32")
    return out, manifest, lines


def _reference(model_dir, texts, beams, prefix="", length_penalty=1.0, early_stopping=False, **kw):
    """transformers' generate, one sentence at a time: the generated ids without start and EOS."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model = AutoModelForSeq2SeqLM.from_pretrained(str(model_dir)).eval()
    if getattr(model.config, "share_encoder_decoder_embeddings", True) is False:
        # transformers' beam search sizes its scores by config.vocab_size (the source side's here)
        # where the logits have the target side's: told the target size, it runs.
        model.config.vocab_size = model.config.decoder_vocab_size
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    eos = model.generation_config.eos_token_id
    out = []
    for text in texts:
        batch = tokenizer([prefix + text], return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(
                **batch,
                max_new_tokens=MAX_NEW,
                num_beams=beams,
                do_sample=False,
                length_penalty=length_penalty,
                early_stopping=early_stopping,
                **kw,
            )[0].tolist()[1:]
        out.append(ids[: ids.index(eos)] if eos in ids else ids)
    return out, tokenizer


def test_marian_bundle_matches_torch_and_records_the_family(marian_bundle):
    out, manifest, lines = marian_bundle
    assert manifest["family"] == "seq2seq" and manifest["graph"]["kind"] == "seq2seq"
    validation = manifest["validation"]
    assert validation["encoder_max_abs_diff"] < 1e-4 and validation["decoder_logits_max_abs_diff"] < 1e-3
    assert validation["decoder_steps"] == 2
    assert manifest["generation"]["suppress_token_ids"] == [manifest["generation"]["pad_token_id"]]
    assert manifest["generation"]["forced_eos"] is True
    assert sorted(manifest["files"]) == sorted(
        ["encoder_model.onnx", "decoder_model_merged.onnx", "tokenizer.json", "target_tokenizer.json"]
    )
    assert any("validating the fp32 graphs against torch" in line for line in lines)


def test_marian_source_tokenizer_equals_marian_tokenizer(marian, marian_bundle):
    from tokenizers import Tokenizer
    from transformers import MarianTokenizer

    reference = MarianTokenizer.from_pretrained(str(marian))
    ours = Tokenizer.from_file(str(marian_bundle[0] / "tokenizer.json"))
    for text in SENTENCES + ["  spaces   inside  ", "Ünïcödé ½ ﬁ", "x"]:
        assert ours.encode(text).ids == reference(text).input_ids, text


def test_multilingual_marian_codes_and_pieces_outside_the_vocabulary(tmp_path):
    """A vocabulary with target-language codes (>>deu<<) and without some of source.spm's pieces:
    ids as MarianTokenizer gives them (a missing piece is <unk>), and the codes become languages."""
    import sentencepiece as spm
    from transformers import MarianTokenizer

    from edge_slm.builder.seq2seq.source import convert_tokenizers

    model_file = _spm(tmp_path, "spm", bos_id=-1, eos_id=1, unk_id=2, pad_id=-1)
    for side in ("source", "target"):
        shutil.copy(model_file, tmp_path / f"{side}.spm")
    pieces = spm.SentencePieceProcessor(model_file=str(model_file))
    vocab = {"</s>": 0, "<unk>": 1, ">>deu<<": 2, ">>fra<<": 3}
    cut = pieces.encode("the cat runs in the park", out_type=str)
    dropped = {cut[1], cut[-1]}  # source pieces the shared vocabulary lacks
    for i in range(pieces.get_piece_size()):
        if pieces.id_to_piece(i) not in dropped:
            vocab.setdefault(pieces.id_to_piece(i), len(vocab))
    vocab["<pad>"] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "marian"}))
    reference = MarianTokenizer(
        str(tmp_path / "source.spm"), str(tmp_path / "target.spm"), str(tmp_path / "vocab.json")
    )
    converted = convert_tokenizers(tmp_path, reference)
    assert converted.target_languages == {"deu": ">>deu<< ", "fra": ">>fra<< "}
    assert converted.unk_above == len(vocab)
    for text in [">>deu<< the cat runs in the park", ">>fra<< hello world", "the cat"]:
        ids = [t if t < converted.unk_above else converted.unk_token_id for t in converted.source.encode(text).ids]
        assert ids == reference(text).input_ids, text
    assert 1 in reference("the cat runs in the park").input_ids  # a dropped piece really is <unk>


@pytest.mark.parametrize("beams", [1, 4])
def test_marian_translations_equal_transformers_generate(marian, marian_bundle, beams):
    from edge_slm import runtime

    want, tokenizer = _reference(marian, SENTENCES, beams)
    translator = runtime.load(marian_bundle[0])
    got = translator.translate_ids(SENTENCES, max_new_tokens=MAX_NEW, beams=beams)
    assert got == want
    assert any(len(ids) == MAX_NEW - 1 for ids in want), [len(w) for w in want]  # forced EOS at the limit
    texts = translator.translate(SENTENCES, max_new_tokens=MAX_NEW, beams=beams)
    assert texts == tokenizer.batch_decode([w + [0] for w in want], skip_special_tokens=True)


@pytest.mark.parametrize(("early_stopping", "length_penalty"), [(True, 1.0), ("never", 2.0), (False, 0.5)])
def test_beam_search_follows_transformers_stopping_rules(marian, marian_bundle, early_stopping, length_penalty):
    """The generation config's early_stopping and length_penalty, as the bundle would record them."""
    import dataclasses

    from edge_slm import runtime

    want, _ = _reference(marian, SENTENCES, 4, length_penalty=length_penalty, early_stopping=early_stopping)
    translator = runtime.load(marian_bundle[0])
    settings = translator.graphs.settings
    translator.graphs.settings = dataclasses.replace(
        settings, early_stopping=early_stopping, length_penalty=length_penalty
    )
    assert translator.translate_ids(SENTENCES, max_new_tokens=MAX_NEW, beams=4) == want


def test_beam_search_differs_from_greedy_on_these_weights(marian_bundle):
    """Else the beam test above would not test beam search."""
    from edge_slm import runtime

    translator = runtime.load(marian_bundle[0])
    greedy = translator.translate_ids(SENTENCES, max_new_tokens=MAX_NEW, beams=1)
    assert greedy != translator.translate_ids(SENTENCES, max_new_tokens=MAX_NEW, beams=4)


@pytest.mark.parametrize("beams", [1, 4])
def test_t5_translations_equal_transformers_generate(t5, t5_bundle, beams):
    from edge_slm import runtime

    out, manifest, _ = t5_bundle
    assert manifest["generation"]["target_languages"]["de"] == "translate English to German: "
    want, _ = _reference(t5, SENTENCES, beams, prefix="translate English to German: ")
    translator = runtime.load(out)
    assert translator.translate_ids(SENTENCES, max_new_tokens=MAX_NEW, beams=beams) == want
    assert translator.translate_ids(SENTENCES, max_new_tokens=MAX_NEW, beams=beams, target_lang="de") == want


def test_marian_with_separate_vocabularies(tmp_path, profile):
    """Source ids from vocab.json, generated ids decoded with target_vocab.json: greedy and beam
    search equal generate's tokens, and the text equals MarianTokenizer's decoding."""
    from edge_slm import runtime

    model_dir = make_marian_separate_vocabs(tmp_path / "marian-separate")
    manifest, _ = _build(model_dir, profile, tmp_path / "bundle", precision="fp32")
    assert manifest["model"]["vocab_size"] != json.loads((model_dir / "config.json").read_text())["decoder_vocab_size"]
    translator = runtime.load(tmp_path / "bundle")
    for beams in (1, 4):
        want, tokenizer = _reference(model_dir, SENTENCES, beams)
        assert translator.translate_ids(SENTENCES, max_new_tokens=MAX_NEW, beams=beams) == want
        texts = translator.translate(SENTENCES, max_new_tokens=MAX_NEW, beams=beams)
        assert texts == tokenizer.batch_decode(want, skip_special_tokens=True)
        assert any(texts), texts


@pytest.mark.parametrize("kind", ["nllb", "mbart", "bart"])
def test_nllb_mbart50_and_bart_translations_equal_transformers_generate(tmp_path, profile, kind):
    """NLLB and mBART-50: the target language is a forced first token, as M2M100's, with their
    fast tokenizers; BART: <s> forced first, no languages. The same graphs serve all three."""
    from transformers import AutoTokenizer

    from edge_slm import runtime
    from edge_slm.runtime.seq2seq import TranslationError

    model_dir = {"nllb": make_nllb, "mbart": make_mbart50, "bart": make_bart}[kind](tmp_path / kind)
    manifest, _ = _build(model_dir, profile, tmp_path / "bundle", precision="fp32")
    assert manifest["validation"]["decoder_logits_max_abs_diff"] < 1e-3
    translator = runtime.load(tmp_path / "bundle")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    lang = {"nllb": "deu_Latn", "mbart": "de_DE", "bart": None}[kind]
    forced = tokenizer.convert_tokens_to_ids(lang) if lang else 0
    for beams in (1, 4):
        want, _ = _reference(model_dir, SENTENCES, beams, forced_bos_token_id=forced)
        got = translator.translate_ids(SENTENCES, max_new_tokens=MAX_NEW, beams=beams, target_lang=lang)
        assert got == want and all(ids[0] == forced for ids in got)
        texts = translator.translate(SENTENCES, max_new_tokens=MAX_NEW, beams=beams, target_lang=lang)
        assert texts == tokenizer.batch_decode(want, skip_special_tokens=True)
    if kind == "nllb":
        assert len(manifest["generation"]["forced_bos_token_ids"]) == 202
    elif kind == "mbart":
        assert len(manifest["generation"]["forced_bos_token_ids"]) == 52
        with pytest.raises(
            TranslationError, match=r"^this model translates into several languages: name one \(af_ZA, ar_AR, "
        ):
            translator.translate(["the cat"])
    else:
        assert manifest["generation"]["forced_bos_token_ids"] == {"": 0}


def test_m2m100_tokenizer_and_languages(m2m100, m2m100_bundle, capsys):
    """The converted BPE source tokenizer gives M2M100Tokenizer's ids (`__en__ ... </s>`); the
    languages are its 100 codes, each a forced first token of the decoder."""
    from tokenizers import Tokenizer
    from transformers import M2M100Tokenizer

    reference = M2M100Tokenizer.from_pretrained(str(m2m100))
    out, manifest, _ = m2m100_bundle
    ours = Tokenizer.from_file(str(out / "tokenizer.json"))
    unk_above = manifest["tokenizer"].get("unk_above")
    for text in SENTENCES + ["  spaces   inside  ", "Ünïcödé ½ ﬁ", "x"]:
        ids = [t if unk_above is None or t < unk_above else 3 for t in ours.encode(text).ids]
        assert ids == reference(text).input_ids, text
    forced = manifest["generation"]["forced_bos_token_ids"]
    assert len(forced) == 100 and forced["de"] == reference.get_lang_id("de") and "" not in forced
    code, text, _ = run_cli(capsys, "inspect", str(out))
    assert (
        code == 0
        and "target languages: 100 (af, am, ar, ast, az, ba, be, bg, ...) as the decoder's first token" in text
    )
    assert manifest["validation"]["decoder_logits_max_abs_diff"] < 1e-3


@pytest.mark.parametrize("beams", [1, 4])
def test_m2m100_translations_equal_transformers_generate(m2m100, m2m100_bundle, beams):
    from transformers import M2M100Tokenizer

    from edge_slm import runtime

    translator = runtime.load(m2m100_bundle[0])
    for lang in ("de", "fr") if beams == 1 else ("de",):
        forced = M2M100Tokenizer.from_pretrained(str(m2m100)).get_lang_id(lang)
        want, tokenizer = _reference(m2m100, SENTENCES, beams, forced_bos_token_id=forced)
        got = translator.translate_ids(SENTENCES, max_new_tokens=MAX_NEW, beams=beams, target_lang=lang)
        assert got == want and all(ids[0] == forced for ids in got)
        texts = translator.translate(SENTENCES, max_new_tokens=MAX_NEW, beams=beams, target_lang=lang)
        # This M2M100Tokenizer, made from files, does not count its language tokens as special
        # (the hub's does): they are left out of the reference text by hand.
        languages = set(tokenizer.lang_code_to_id.values())
        assert texts == tokenizer.batch_decode(
            [[t for t in w if t not in languages] for w in want], skip_special_tokens=True
        )
    greedy = translator.translate_ids(SENTENCES, max_new_tokens=MAX_NEW, target_lang="de")
    assert greedy != translator.translate_ids(SENTENCES, max_new_tokens=MAX_NEW, beams=4, target_lang="de")


def test_m2m100_needs_a_known_target_language(m2m100_bundle):
    from edge_slm import runtime
    from edge_slm.runtime.seq2seq import TranslationError

    translator = runtime.load(m2m100_bundle[0])
    with pytest.raises(TranslationError) as none:
        translator.translate(["the cat"])
    assert str(none.value).startswith("this model translates into several languages: name one (af, am, ar, ")
    with pytest.raises(TranslationError) as unknown:
        translator.translate(["the cat"], target_lang="klingon")
    message = str(unknown.value)
    assert message.startswith("target language 'klingon' is not one this model knows (af, am, ar, ast, ")
    assert "\n" not in message and message.endswith(", zh, zu)")


@pytest.mark.parametrize("beams", [1, 4])
def test_a_batch_equals_its_sentences_one_at_a_time(marian_bundle, beams):
    from edge_slm import runtime

    translator = runtime.load(marian_bundle[0])
    three = SENTENCES[:3]
    batch = translator.translate(three, max_new_tokens=MAX_NEW, beams=beams)
    assert batch == [translator.translate([s], max_new_tokens=MAX_NEW, beams=beams)[0] for s in three]


def test_int8_build_runs_the_gate_and_translates(marian, profile, tmp_path):
    from edge_slm import runtime

    out = tmp_path / "marian-int8"
    manifest, lines = _build(marian, profile, out, allow_accuracy_loss=True)  # the profile's precision
    assert manifest["precision"] == "int8"
    assert manifest["quantization"]["weights"] == "int8 per-channel"
    assert manifest["quantization"]["weight_range"] == "-64..64"  # the profile's [seq2seq] reduce_range
    assert (
        "MatMulInteger" in manifest["graph"]["op_counts"] or "DynamicQuantizeMatMul" in manifest["graph"]["op_counts"]
    )
    # 7-bit weights in both graphs, the merged decoder's If branches too: no 16-bit pair sum can saturate
    weights = _int8_weights(out / "encoder_model.onnx") + _int8_weights(out / "decoder_model_merged.onnx")
    assert len(weights) >= 8 and min(w.min() for w in weights) >= -64 and max(w.max() for w in weights) <= 64
    assert max(np.abs(w).max() for w in weights) == 64  # the grid's end is reached: 7 bits, not fewer
    accuracy = manifest["accuracy"]
    assert 0.0 <= accuracy["chrf_vs_fp32"] <= 100.0 and 0.0 <= accuracy["bleu_vs_fp32"] <= 100.0
    assert accuracy["texts"] == 24 and accuracy["identical"] == round(24 * accuracy["identical_share"])
    assert accuracy["budget"] == {"min_chrf": 90.0, "min_bleu": 70.0, "min_identical": 0.5}
    assert any("vs fp32 on 24 sentences: chrF" in line for line in lines)
    assert "encoder_model.onnx" in manifest["files"]
    translations = runtime.load(out).translate(SENTENCES[:2], max_new_tokens=MAX_NEW)
    assert len(translations) == 2 and all(isinstance(t, str) for t in translations)


def _int8_weights(path) -> list:
    """Every int8 initializer of a graph and of its subgraphs (the merged decoder's If branches)."""
    import onnx
    from onnx import numpy_helper

    def walk(graph):
        found = [numpy_helper.to_array(t) for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    found += walk(attribute.g)
        return found

    return walk(onnx.load(str(path)).graph)


def test_fp16_for_the_jetson_profile_keeps_fp32_translations(marian, marian_bundle, tmp_path):
    """The Jetson profile's precision is fp16: float16 weights in both graphs (the decoder's If
    branches included) and a float16 cache; on the CPU provider it translates as fp32 does."""
    import onnx

    from edge_slm import runtime

    jetson = load_profile("jetson-orin")
    out = tmp_path / "marian-fp16"
    # Random weights with wide logits sit closer to ties than trained ones: the budget is waived,
    # the figures must still show fp16 writing nearly what fp32 writes.
    manifest, lines = _build(marian, jetson, out, allow_accuracy_loss=True)
    assert manifest["precision"] == "fp16" and manifest["quantization"]["method"] == "fp16"
    accuracy = manifest["accuracy"]
    assert accuracy["budget"] == {"min_chrf": 98.0, "min_bleu": 95.0, "min_identical": 0.9}
    assert accuracy["chrf_vs_fp32"] > 98 and accuracy["bleu_vs_fp32"] > 90, accuracy  # measured: 99.7, 94.3
    assert accuracy["identical_share"] >= 0.85, accuracy  # measured: 22 of 24
    decoder = onnx.load(str(out / "decoder_model_merged.onnx"))
    kinds = {i.data_type for i in decoder.graph.initializer if i.data_type in (1, 10)}
    assert kinds == {10}  # float16 only among float weights
    assert {i.type.tensor_type.elem_type for i in decoder.graph.input if i.name.startswith("past_")} == {10}
    from edge_slm.core.bundle import read_manifest
    from edge_slm.harness.deploy import _min_chrf

    assert _min_chrf(read_manifest(out)) == 98.0  # deploy's smoke test reads the budget the bundle recorded
    fp16 = runtime.load(out, providers=["CPUExecutionProvider"])
    fp32 = runtime.load(marian_bundle[0])
    same = sum(a == b for a, b in zip(fp16.translate(SENTENCES, MAX_NEW), fp32.translate(SENTENCES, MAX_NEW)))
    assert same >= 4, same


def test_the_gate_fails_without_the_waiver_when_below_budget(profile):
    from edge_slm.builder.seq2seq import gate
    from edge_slm.core.errors import AccuracyBudgetError

    measured = {"chrf_vs_fp32": 42.0, "bleu_vs_fp32": 80.0, "identical_share": 0.25, "texts": 24}
    with pytest.raises(AccuracyBudgetError) as caught:
        gate.check(measured, profile.seq2seq.int8, "int8", allow=False)
    assert str(caught.value) == (
        "int8 translation outside its accuracy budget ([seq2seq.int8]): chrF against fp32 42.0 (budget >= 90); "
        "25% of sentences identical to fp32's (budget >= 50%). Build it with --precision fp32, or pass "
        "--allow-accuracy-loss"
    )
    assert gate.check(measured, profile.seq2seq.int8, "int8", allow=True)["passed"] is False
    sources, references = gate.parallel_text()
    assert len(sources) == len(references) == 24
    assert gate.scores(references, references) == pytest.approx({"chrf": 100.0, "bleu": 100.0, "identical": 1.0})


def test_the_seq2seq_budget_is_a_profile_table():
    from edge_slm.core.errors import ProfileError
    from edge_slm.core.targets import profile_from_dict

    raw = load_profile("x86-laptop").to_dict()
    raw["seq2seq"]["int8"]["min_bleu"] = 101
    with pytest.raises(ProfileError, match=r"^profile: 'seq2seq.int8.min_bleu' is 101.0; use 0 to 100$"):
        profile_from_dict(raw)
    raw["seq2seq"]["int8"] = {"min_ter": 1.0}
    with pytest.raises(ProfileError, match=r"unknown key 'seq2seq.int8.min_ter' \(allowed here: min_chrf, min_bleu"):
        profile_from_dict(raw)


def run_cli(capsys, *args) -> tuple[int, str, str]:
    from edge_slm.cli import main

    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_translate_command_and_its_refusals(capsys, marian_bundle):
    bundle = str(marian_bundle[0])
    code, out, err = run_cli(capsys, "translate", bundle, "the cat", "a dog", "--beams", "2", "--max-tokens", "5")
    assert code == 0 and len(out.splitlines()) == 2, err
    long_text = " ".join(["machine translation"] * 80)
    cases = [
        (["translate", bundle, ""], "error: text 0 is empty: give some text to translate"),
        (["translate", bundle, "hi", "--beams", "0"], "error: beams is 0; use 1 (greedy) to 16"),
        (["translate", bundle, "hi", "--beams", "1000"], "error: beams is 1000; use 1 (greedy) to 16"),
        (["translate", bundle, "hi", "--max-tokens", "0"], "error: max new tokens is 0; use 1 to 63"),
        (
            ["translate", bundle, "hi", "--target-lang", "fra"],
            "error: target language 'fra' is not one this model knows (none: it translates into one language)",
        ),
        (
            ["translate", bundle, "hi", "--stream", "--beams", "2"],
            "error: --stream prints greedy text as it is written: use it with --beams 1 and without --json",
        ),
    ]
    for args, message in cases:
        code, _, err = run_cli(capsys, *args)
        assert code == 2 and err.strip() == message, (args, err)
    code, _, err = run_cli(capsys, "translate", bundle, long_text)
    assert code == 2 and err.startswith("error: text 0 is ") and "this model takes at most 64: split it" in err


def test_translate_reads_files_and_stdin_and_writes_token_ids(capsys, marian_bundle, tmp_path):
    import subprocess
    import sys

    from edge_slm import runtime

    bundle = str(marian_bundle[0])
    translator = runtime.load(bundle)
    want = translator.translations(SENTENCES[:3], max_new_tokens=8)
    lines = tmp_path / "texts.txt"
    lines.write_text(f"{SENTENCES[0]}\n\n{SENTENCES[1]}\n{SENTENCES[2]}\n")
    code, out, err = run_cli(capsys, "translate", bundle, "--file", str(lines), "-n", "8", "--json", "--beams", "1")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(r["text"], r["translation"], r["token_ids"]) for r in rows] == [
        (t, w.text, w.token_ids) for t, w in zip(SENTENCES[:3], want)
    ]
    command = [sys.executable, "-m", "edge_slm.cli", "translate", bundle, "-n", "8", "--beams", "1"]
    piped = subprocess.run(command, input="\n".join(SENTENCES[:3]).encode(), capture_output=True, timeout=120)
    assert piped.returncode == 0 and piped.stdout.decode().splitlines() == [w.text for w in want], piped.stderr
    empty = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
    assert empty.returncode == 2 and empty.stderr.decode().strip() == "error: stdin: no text in it (one text per line)"
    code, out, _ = run_cli(capsys, "translate", bundle, SENTENCES[0], "-n", "8", "--stream")
    assert code == 0 and out == want[0].text + "\n"


def test_stream_and_long_texts_split_into_sentences(marian_bundle):
    """Streaming pieces join to the greedy translation; a text longer than the model's positions
    is translated sentence by sentence in one batch (the same as each sentence on its own)."""
    from edge_slm import runtime
    from edge_slm.runtime.seq2seq import TranslationError, split_sentences

    translator = runtime.load(marian_bundle[0])
    for text in SENTENCES[:3]:
        pieces = list(translator.stream(text, max_new_tokens=MAX_NEW))
        assert "".join(pieces) == translator.translate([text], max_new_tokens=MAX_NEW)[0]
        assert len(pieces) > 1, pieces
    sentences = ["The cat sits on the mat.", "Where is the train station?", "Please turn off the lights!"] * 4
    long_text = " ".join(sentences)
    assert split_sentences(long_text) == sentences
    assert len(translator.tokenize([sentences[0]])[0]) * len(sentences) > translator.max_source_tokens
    one_by_one = translator.translate(sentences, max_new_tokens=MAX_NEW)
    [whole] = translator.translations([long_text], max_new_tokens=MAX_NEW)
    assert whole.sentences == 12 and whole.text == " ".join(one_by_one)
    assert "".join(translator.stream(long_text, max_new_tokens=MAX_NEW)) == whole.text
    with pytest.raises(TranslationError, match=r"^text 0 has a \d+-token sentence; this model takes at most 64"):
        translator.translate(["Short one. " + " ".join(["machine translation"] * 40) + "."])


def test_other_commands_refuse_a_seq2seq_bundle_by_name(capsys, marian_bundle):
    bundle = str(marian_bundle[0])
    for args in (["classify", bundle, "hello"], ["generate", bundle, "hello"]):
        code, _, err = run_cli(capsys, *args)
        assert code == 2 and err.strip() == f"error: {bundle} is a seq2seq bundle: translate with it"
    code, _, err = run_cli(capsys, "verify", bundle, "--emulate", "cortex-a72")
    assert code == 2 and err.strip() == (
        f"error: {bundle} is a seq2seq bundle: `edge-slm verify` does not measure translation yet; "
        "use `edge-slm translate` (benchmarks/translate_peers.py measures its speed)"
    )


def test_bench_measures_a_translation_bundle_and_the_report_reads_it(capsys, marian_bundle, tmp_path):
    """`edge-slm bench` on a seq2seq bundle: typed Seq2SeqResults records (1 sentence, batch 16,
    peak RSS), the gate's figures against --reference (itself here: 100, 100, all identical)."""
    from edge_slm.harness.report import write_report
    from edge_slm.runtime.bench import record_problem

    bundle = str(marian_bundle[0])
    out = tmp_path / "records.jsonl"
    args = ["bench", bundle, "-r", "2", "--warmup", "1", "--threads", "1", "--reference", bundle, "--out", str(out)]
    code, table, err = run_cli(capsys, *args)
    assert code == 0, err
    [record] = [json.loads(line) for line in out.read_text().splitlines()]
    assert record_problem(record) is None and record["bundle"]["family"] == "seq2seq" and record["test"] == "s1+b16"
    results = record["results"]
    assert results["sentences_per_s_b16"]["texts"] == 16 and results["sentences_per_s_b16"]["n"] == 2
    assert results["latency_ms_1"]["n"] == 10 and results["peak_rss_mb"] > results["rss_after_load_mb"] * 0.9
    # The same samples: each sentences/s one at a time is 1000 / its ms.
    rates, latencies = results["sentences_per_s_b1"]["samples"], results["latency_ms_1"]["samples"]
    assert rates == pytest.approx([1e3 / ms for ms in latencies], rel=1e-9)
    accuracy = record["accuracy"]
    assert accuracy["chrf_vs_fp32"] == pytest.approx(100) and accuracy["bleu_vs_fp32"] == pytest.approx(100)
    assert accuracy["identical"] == 24 and accuracy["source"] == f"measured against {bundle}"
    assert "b16 sent/s" in table and "100.0 / 100.0 / 100%" in table
    write_report([out], tmp_path / "report")
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Translation" in report and "sentences/s, batch 16" in report


def test_inspect_and_a_tampered_manifest(capsys, marian_bundle, tmp_path):
    from edge_slm.core.bundle import verify_bundle

    code, out, _ = run_cli(capsys, "inspect", str(marian_bundle[0]))
    assert code == 0 and "seq2seq: 2+2 layers" in out and "decoder logits" in out
    copy = tmp_path / "copy"
    shutil.copytree(marian_bundle[0], copy)
    raw = json.loads((copy / "manifest.json").read_text())
    raw["generation"]["early_stopping"] = "yes"
    (copy / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="manifest key 'generation.early_stopping' must be true, false or \"never\""):
        verify_bundle(copy)


def test_the_server_translates_and_refuses_bad_beams(marian_bundle):
    """A real `edge-slm serve` on loopback, spoken to with httpx: the runtime's translations."""
    import httpx

    from edge_slm import runtime

    proc, base = start_server(marian_bundle[0])
    try:
        body = {"input": ["the cat", "a dog runs"], "beams": 2, "max_tokens": 8}
        ok = httpx.post(base + "/v1/translations", json=body, timeout=60)
        assert ok.status_code == 200, ok.text
        want = runtime.load(marian_bundle[0]).translate(["the cat", "a dog runs"], max_new_tokens=8, beams=2)
        assert ok.json()["data"] == [
            {"object": "translation", "index": i, "translation": t} for i, t in enumerate(want)
        ]
        bad = httpx.post(base + "/v1/translations", json={"input": "the cat", "beams": 0}, timeout=60)
        assert bad.status_code == 400 and bad.json()["error"]["message"] == "beams is 0; use 1 (greedy) to 16"
        wrong = httpx.post(base + "/v1/embeddings", json={"input": "the cat"}, timeout=60)
        model_id = httpx.get(base + "/v1/models", timeout=10).json()["data"][0]["id"]
        assert wrong.status_code == 400 and wrong.json()["error"]["message"] == (
            f"the bundle {model_id!r} serves translation, not embedding: use /v1/translations "
            "(or serve a embedding bundle)"
        )
        _chat_completions_translate(base, marian_bundle[0], model_id)
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def _chat_completions_translate(base, bundle, model_id):
    """The openai client's chat completion on a translation bundle: the last user message,
    translated (beam search as the bundle's default; greedy when streamed), usage counted."""
    import openai

    from edge_slm import runtime

    translator = runtime.load(bundle)
    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
    messages = [
        {"role": "system", "content": "Translate."},
        {"role": "user", "content": "an earlier message"},
        {"role": "assistant", "content": "..."},
        {"role": "user", "content": SENTENCES[2]},
    ]
    reply = client.chat.completions.create(model=model_id, messages=messages, max_tokens=MAX_NEW)
    [want] = translator.translations([SENTENCES[2]], max_new_tokens=MAX_NEW, beams=1)
    assert reply.choices[0].message.content == want.text and reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == len(want.token_ids)
    assert reply.usage.prompt_tokens == len(translator.tokenize([SENTENCES[2]])[0])
    stream = client.chat.completions.create(
        model=model_id, messages=messages, max_tokens=MAX_NEW, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == want.text and len(pieces) > 1
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=model_id, messages=messages, extra_body={"target_lang": "fra"})
    assert bad.value.body["message"] == (
        "target language 'fra' is not one this model knows (none: it translates into one language)"
    )
    for field, value in [
        ("tools", [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]),
        ("logprobs", True),
        ("response_format", {"type": "json_object"}),
        ("stop", ["x"]),
        ("audio", {"voice": "alloy", "format": "wav"}),
        ("n", 2),
    ]:
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model=model_id, messages=messages, extra_body={field: value})
        assert refused.value.body["param"] == field, field
    with pytest.raises(openai.BadRequestError) as plain:
        client.completions.create(model=model_id, prompt="the cat")
    assert "serves translation, not generation: use /v1/translations" in plain.value.body["message"]
