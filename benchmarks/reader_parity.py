"""An extractive reader bundle against transformers' question-answering pipeline on the same model:
the same best span, the same score, on SQuAD-format questions.

    .venv/bin/python benchmarks/reader_parity.py --model DIR --bundle export/x86-laptop-reader \
        [--data edge_slm/data/manuals/squad.json] [--max-seq-len 256] [--out benchmarks/results/reader/parity.jsonl]

For each question the pipeline (torch, fp32) and the bundle's `SpanReader` answer over the same
context with the same max_seq_len and the pipeline's other defaults; the record has the share of
questions whose best span (text and character offsets) is the pipeline's, the largest score
difference, SQuAD exact match and F1 of both against the expected answers, and the bundle's mean
milliseconds per question (this shared machine: a rough figure, not a speed comparison).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_slm import runtime  # noqa: E402
from edge_slm.builder.encoder.qa import score_answers  # noqa: E402
from edge_slm.core.squad import SHIPPED_SQUAD, read_squad  # noqa: E402
from edge_slm.runtime.bench import machine  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="The *ForQuestionAnswering directory built.")
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=SHIPPED_SQUAD)
    parser.add_argument("--max-seq-len", type=int, default=None)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from transformers import AutoModelForQuestionAnswering, AutoTokenizer, pipeline

    pipe = pipeline(
        "question-answering",
        model=AutoModelForQuestionAnswering.from_pretrained(str(args.model)),
        tokenizer=AutoTokenizer.from_pretrained(str(args.model)),
    )
    reader = runtime.load(args.bundle, threads=args.threads)
    max_seq_len = args.max_seq_len or min(reader.graph.max_length, 384)  # what the reader takes by default
    questions = read_squad(args.data)
    same, diffs, ms, got_answers, want_answers = 0, [], [], [], []
    for q in questions:
        want = pipe(question=q.question, context=q.context, max_seq_len=max_seq_len)
        started = time.perf_counter()
        got = reader.answer(q.question, q.context, max_seq_len=max_seq_len)[0]
        ms.append(1e3 * (time.perf_counter() - started))
        same += (got.answer, got.start, got.end) == (want["answer"], want["start"], want["end"])
        diffs.append(abs(got.score - want["score"]))
        got_answers.append(got.answer)
        want_answers.append(want["answer"])
    gold = [[text for text, _ in q.answers] for q in questions]
    record = {
        "benchmark": "reader-parity",
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": str(args.model),
        "bundle": str(args.bundle),
        "precision": reader.manifest.precision,
        "data": str(args.data),
        "questions": len(questions),
        "max_seq_len": max_seq_len,
        "same_best_span_as_pipeline": round(same / len(questions), 4),
        "max_score_diff": max(diffs),
        "bundle_answers": {**score_answers(got_answers, gold), "ms_mean": round(statistics.mean(ms), 2)},
        "pipeline_answers": score_answers(want_answers, gold),
        "machine": machine(),
    }
    print(json.dumps({k: v for k, v in record.items() if k != "machine"}, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
