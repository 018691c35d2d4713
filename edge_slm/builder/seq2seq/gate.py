"""The translation accuracy gate: int8 translations against the fp32 graphs' on the same texts,
scored with chrF (sacrebleu), greedy. Below MIN_CHRF fails the build unless --allow-accuracy-loss.
Real weights keep chrF near 100 under dynamic int8; random test weights do not (hence the waiver)."""

from __future__ import annotations

from edge_slm.core.errors import AccuracyBudgetError

MIN_CHRF = 90.0  # chrF of int8 against fp32 output (0-100): a few characters differ at most
GATE_TEXTS = (
    "The weather will be sunny tomorrow.",
    "Please turn off the lights in the kitchen.",
    "Where is the nearest train station?",
    "Small models can translate on the device without a network.",
    "I would like a cup of coffee, please.",
    "The meeting starts at nine in the morning.",
)
MAX_NEW_TOKENS = 64


def measure(candidate, reference) -> dict:
    from sacrebleu.metrics import CHRF

    tokens = min(MAX_NEW_TOKENS, reference.generation.max_new_tokens)
    got = candidate.translate(list(GATE_TEXTS), tokens)
    want = reference.translate(list(GATE_TEXTS), tokens)
    chrf = CHRF().corpus_score(got, [want]).score
    return {
        "texts": len(GATE_TEXTS),
        "chrf_vs_fp32": float(chrf),
        "identical": sum(a == b for a, b in zip(got, want)),
        "min_chrf": MIN_CHRF,
    }


def check(measured: dict, allow: bool) -> dict:
    problems = []
    if measured["chrf_vs_fp32"] < MIN_CHRF:
        problems.append(f"chrF against fp32 {measured['chrf_vs_fp32']:.1f} (budget >= {MIN_CHRF:.0f})")
    if problems and not allow:
        raise AccuracyBudgetError(
            f"int8 translation outside its accuracy budget: {'; '.join(problems)}. Build it with --precision fp32, "
            "or pass --allow-accuracy-loss"
        )
    return {**measured, "passed": not problems, "problems": problems}
