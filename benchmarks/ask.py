"""Question answering from documents, measured on the shipped manuals: retrieval, answers, refusals, speed.

    .venv/bin/python benchmarks/ask.py --embedder export/x86-laptop-embedder [--decoder export/x86-laptop] \
        [--k 3] [--split tune,heldout] [--out benchmarks/results/ask.jsonl] [--search-scale 10000,100000]

Indexes `edge_slm/data/manuals/` into a temporary folder (timed), answers every question of
`questions.jsonl` extractively (and with the decoder when one is given), one split at a time
(one record each: the tuning split sets the threshold, the held-out one only measures it; the
threshold `calibrate_min_score` would pick from the tuning split is in every record), and prints retrieval
top-1 / top-k (the right manual, in a passage holding the answer), extractive answer accuracy,
refusal accuracy on the unanswerable questions, index time, ask latency and peak RSS. The best
passage scores of the answerable and unanswerable questions are printed too: the gap between them
is where `DEFAULT_MIN_SCORE` belongs. `--search-scale` times numpy's search over random unit
vectors of the embedder's width (float16 on disk, float32 in memory, as the index keeps them).
One JSON record per run with `--out`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from edge_slm.core.system import peak_rss_mb  # noqa: E402
from edge_slm.runtime.bench import machine  # noqa: E402
from edge_slm.runtime.index import build_index, open_embedder  # noqa: E402
from edge_slm.runtime.qa import open_index  # noqa: E402
from edge_slm.runtime.qa_eval import MANUALS_DIR, SPLITS, calibrate_min_score, evaluate_qa, load_questions  # noqa: E402


def search_scale(sizes: list[int], dim: int, repetitions: int = 20) -> dict:
    """Milliseconds of one top-3 search over `size` random unit vectors, float32 and float16."""
    rng = np.random.default_rng(0)
    out = {}
    for size in sizes:
        vectors = rng.standard_normal((size, dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        query = vectors[0]
        for dtype in (np.float32, np.float16):
            matrix = vectors.astype(dtype)
            q = query.astype(dtype)
            samples = []
            for _ in range(repetitions + 2):
                started = time.perf_counter()
                scores = matrix @ q
                np.argpartition(-scores, 3)[:3]
                samples.append((time.perf_counter() - started) * 1000)
            samples = samples[2:]  # warm-up
            out[f"{size}x{dim}_{np.dtype(dtype).name}_ms"] = {
                "mean": round(statistics.mean(samples), 3),
                "stdev": round(statistics.stdev(samples), 3),
                "mb": round(matrix.nbytes / 1e6, 1),
            }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--embedder", type=Path, required=True)
    parser.add_argument("--decoder", type=Path)
    parser.add_argument("--reader", type=Path, help="A question-answering bundle: its spans as the extractive answers.")
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--min-score", type=float)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--search-scale", default="", help="Comma-separated sizes, e.g. 10000,100000.")
    parser.add_argument("--out", type=Path, help="Append one JSON record here.")
    parser.add_argument("--rows", action="store_true", help="Print every question's outcome.")
    parser.add_argument("--split", default=",".join(SPLITS), help="Comma-separated splits, one record each.")
    args = parser.parse_args()

    encoder = open_embedder(args.embedder, args.threads)
    decoder = None
    if args.decoder:
        from edge_slm import runtime

        decoder = runtime.load(args.decoder, threads=args.threads)
    reader = None
    if args.reader:
        from edge_slm import runtime

        reader = runtime.load(args.reader, threads=args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        stats = build_index(MANUALS_DIR, encoder, Path(scratch) / "manuals.index")
        index_s = time.perf_counter() - started
        qa = open_index(Path(scratch) / "manuals.index", encoder)
        tuned = calibrate_min_score(evaluate_qa(qa, load_questions(split="tune"), k=args.k)["rows"])
        for split in args.split.split(","):
            questions = load_questions(split=split)
            extractive = evaluate_qa(qa, questions, k=args.k, min_score=args.min_score, reader=reader)
            generated = None
            if decoder is not None:
                generated = evaluate_qa(qa, questions, k=args.k, decoder=decoder, min_score=args.min_score)
            report(args, split, stats, index_s, extractive, generated, tuned, encoder)
    return 0


def report(args, split, stats, index_s, extractive, generated, tuned, encoder) -> None:
    answerable = sorted(r["best_score"] for r in extractive["rows"] if "rank" in r)
    unanswerable = sorted(r["best_score"] for r in extractive["rows"] if "rank" not in r)
    record = {
        "benchmark": "ask",
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "embedder": str(args.embedder),
        "decoder": str(args.decoder) if args.decoder else None,
        "reader": str(args.reader) if args.reader else None,
        "split": split,
        "min_score_calibrated_on_tune": tuned,
        "documents": stats.documents,
        "passages": stats.passages,
        "index_s": round(index_s, 3),
        "extractive": {key: value for key, value in extractive.items() if key != "rows"},
        "generated": {key: value for key, value in generated.items() if key != "rows"} if generated else None,
        "best_score_answerable_min": answerable[0],
        "best_score_unanswerable_max": unanswerable[-1] if unanswerable else None,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "machine": machine(),
    }
    if args.search_scale:
        sizes = [int(size) for size in args.search_scale.split(",")]
        record["search"] = search_scale(sizes, int(encoder.graph.output_width))
    if args.rows:
        for row in extractive["rows"] + (generated["rows"] if generated else []):
            print(json.dumps(row, ensure_ascii=False))
    print(json.dumps({key: value for key, value in record.items() if key != "machine"}, indent=2))
    print("best passage score, answerable:", answerable[:5], "...", "unanswerable:", unanswerable)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    sys.exit(main())
