"""Translation scores, shared by the build's gate (builder/seq2seq/gate.py) and `edge-slm bench`:
the shipped parallel text (edge_slm/data/parallel-en-de.txt: English sentences and their German
translations) and sacrebleu's corpus chrF and BLEU, with the share of identical sentences.

sacrebleu is imported when a score is asked for: the build host has it (the `build` extra); a
device has it only where someone installed it, and `bench` then reads the build's figures from
the manifest instead of measuring.
"""

from __future__ import annotations

from edge_slm.core.data import PARALLEL_EN_DE


def parallel_text() -> tuple[list[str], list[str]]:
    """(English sentences, their German references) of the shipped parallel text."""
    rows = [line.split("\t") for line in PARALLEL_EN_DE.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r[0] for r in rows], [r[1] for r in rows]


def scores(got: list[str], want: list[str]) -> dict:
    """chrF, BLEU (sacrebleu corpus scores, 0-100) of `got` against `want`, and the share identical."""
    from sacrebleu.metrics import BLEU, CHRF

    return {
        "chrf": float(CHRF().corpus_score(got, [want]).score),
        # Effective order: a corpus of short sentences may have no 4-gram in common, not a zero BLEU.
        "bleu": float(BLEU(effective_order=True).corpus_score(got, [want]).score),
        "identical": sum(a == b for a, b in zip(got, want)) / len(want),
    }


def against_reference(candidate, reference, max_new_tokens: int, target_lang: str | None = None) -> dict:
    """Greedy translations of the parallel text's English side by two translators, scored with
    the reference's output as the reference (the gate's figures)."""
    sources, _ = parallel_text()
    got = candidate.translate(sources, max_new_tokens, target_lang=target_lang)
    want = reference.translate(sources, max_new_tokens, target_lang=target_lang)
    measured = scores(got, want)
    return {
        "texts": len(sources),
        "chrf_vs_fp32": measured["chrf"],
        "bleu_vs_fp32": measured["bleu"],
        "identical_share": measured["identical"],
        "identical": round(measured["identical"] * len(sources)),
        "got": got,
        "want": want,
    }
