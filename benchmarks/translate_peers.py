"""edge-slm's Translator against optimum's ORTModelForSeq2SeqLM on the same random Marian with
OPUS-MT en-de's dimensions (6+6 layers, d_model 512, 8 heads, FFN 2048, 58,101 tokens): greedy
sentences/s at batch 1 and 16 and peak RSS, each engine in a fresh process, side by side.

    .venv/bin/python benchmarks/translate_peers.py --work export/translate-peers [--reps 3] [--threads 2]

Random weights translate into nonsense, so the lengths are fixed (`--max-new-tokens`, no EOS is
forced before it); both engines run the same exported graphs' weights and their greedy tokens are
compared. The tokenizers are trained here on a few sentences (the vocabulary is padded to 58,101).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

SENTENCES = [
    "The weather will be sunny tomorrow.",
    "Please turn off the lights in the kitchen.",
    "Where is the nearest train station?",
    "Small models can translate on the device without a network.",
    "I would like a cup of coffee, please.",
    "The meeting starts at nine in the morning.",
    "Machine translation keeps the meaning of every sentence.",
    "A dog runs in the park with a ball.",
] * 2  # 16 sentences


def make_model(directory: Path) -> Path:
    import sentencepiece as spm
    import torch
    from transformers import MarianConfig, MarianMTModel, MarianTokenizer

    if (directory / "config.json").is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(SENTENCES * 10))
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(directory / "spm"),
        vocab_size=200,
        hard_vocab_limit=False,
        model_type="unigram",
        character_coverage=1.0,
        bos_id=-1,
        eos_id=1,
        unk_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    for side in ("source", "target"):
        shutil.copy(directory / "spm.model", directory / f"{side}.spm")
    pieces = spm.SentencePieceProcessor(model_file=str(directory / "spm.model"))
    vocab = {"</s>": 0, "<unk>": 1}
    for i in range(pieces.get_piece_size()):
        vocab.setdefault(pieces.id_to_piece(i), len(vocab))
    while len(vocab) < 58100:  # OPUS-MT en-de's vocabulary size; the pad is the last id
        vocab[f"▁filler{len(vocab)}"] = len(vocab)
    vocab["<pad>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = MarianTokenizer(
        str(directory / "source.spm"), str(directory / "target.spm"), str(directory / "vocab.json")
    )
    torch.manual_seed(0)
    pad = vocab["<pad>"]
    config = MarianConfig(
        vocab_size=len(vocab),
        d_model=512,
        encoder_layers=6,
        decoder_layers=6,
        encoder_attention_heads=8,
        decoder_attention_heads=8,
        encoder_ffn_dim=2048,
        decoder_ffn_dim=2048,
        max_position_embeddings=512,
        pad_token_id=pad,
        eos_token_id=0,
        decoder_start_token_id=pad,
        bad_words_ids=[[pad]],
        init_std=0.2,
    )
    model = MarianMTModel(config).eval()
    with torch.no_grad():  # no EOS before the length limit: every engine decodes the same number of tokens
        model.final_logits_bias[0, 0] = -1e4
    model.save_pretrained(directory)
    model.generation_config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def prepare(work: Path) -> dict[str, Path]:
    from edge_slm.builder.pipeline import build
    from edge_slm.core.targets import load_profile

    model = make_model(work / "model")
    profile = load_profile("x86-laptop")
    out = {}
    for precision in ("fp32", "int8"):
        bundle = work / f"bundle-{precision}"
        if not (bundle / "manifest.json").is_file():
            build(str(model), profile, bundle, echo=print, precision=precision, allow_accuracy_loss=True)
        out[f"edge-slm {precision}"] = bundle
    peer = work / "optimum"
    if not (peer / "encoder_model.onnx").is_file():
        from optimum.exporters.onnx import main_export

        main_export(str(model), str(peer), task="text2text-generation-with-past")
    out["optimum ORTModelForSeq2SeqLM fp32"] = peer
    return out


def worker(engine: str, path: str, threads: int, reps: int, max_new: int) -> dict:
    """One engine in this process: load, warm up, then `reps` timed runs per batch size."""
    from edge_slm.core.system import peak_rss_mb

    if engine.startswith("edge-slm"):
        from edge_slm import runtime

        model = runtime.load(path, threads=threads)

        def run(texts):
            return model.translate_ids(texts, max_new_tokens=max_new, beams=1)
    else:
        import onnxruntime as ort
        from optimum.onnxruntime import ORTModelForSeq2SeqLM
        from transformers import AutoTokenizer

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        model = ORTModelForSeq2SeqLM.from_pretrained(path, session_options=options)
        tokenizer = AutoTokenizer.from_pretrained(path)
        eos = model.generation_config.eos_token_id

        def run(texts):
            batch = tokenizer(texts, return_tensors="pt", padding=True)
            ids = model.generate(**batch, max_new_tokens=max_new, num_beams=1, do_sample=False).tolist()
            return [[t for t in row[1:] if t != eos][:max_new] for row in ids]

    tokens = run(SENTENCES[:1])  # warm-up
    record = {"engine": engine, "first_tokens": tokens[0][:8], "threads": threads, "max_new_tokens": max_new}
    for batch in (1, 16):
        samples = []
        for _ in range(reps):
            start = time.perf_counter()
            for i in range(0, len(SENTENCES), batch):
                run(SENTENCES[i : i + batch])
            samples.append(len(SENTENCES) / (time.perf_counter() - start))
        record[f"sentences_per_s_b{batch}"] = {
            "mean": statistics.mean(samples),
            "stdev": statistics.stdev(samples) if len(samples) > 1 else 0.0,
            "samples": samples,
        }
    # VmHWM, not getrusage: ru_maxrss survives exec, so it would report the parent's torch build.
    record["peak_rss_mb"] = peak_rss_mb()
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("export/translate-peers"))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, help="Append the records (JSONL) here.")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.threads, args.reps, args.max_new_tokens)))
        return
    engines = prepare(args.work)
    records = []
    for engine, path in engines.items():
        command = [sys.executable, __file__, "--worker", engine, str(path), "--reps", str(args.reps)]
        command += ["--threads", str(args.threads), "--max-new-tokens", str(args.max_new_tokens)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        record = json.loads(done.stdout.strip().splitlines()[-1])
        record["machine"] = platform.node()
        records.append(record)
    print(f"greedy, {args.max_new_tokens} new tokens per sentence, {args.threads} threads, {args.reps} reps")
    print("| engine | sentences/s batch 1 | sentences/s batch 16 | peak RSS MB | first tokens |")
    print("|---|---|---|---|---|")
    for r in records:
        b1, b16 = r["sentences_per_s_b1"], r["sentences_per_s_b16"]
        print(
            f"| {r['engine']} | {b1['mean']:.2f} ± {b1['stdev']:.2f} | {b16['mean']:.2f} ± {b16['stdev']:.2f} "
            f"| {r['peak_rss_mb']:.0f} | {r['first_tokens']} |"
        )
    if args.out:
        with args.out.open("a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
