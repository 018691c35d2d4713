"""The translation accuracy gate: a reduced-precision (int8, fp16) translator's greedy output
against the fp32 graphs' on the English side of the shipped parallel text
(edge_slm/data/parallel-en-de.txt), scored as translations are: corpus chrF and BLEU (sacrebleu)
with fp32's output as the reference, and the share of sentences written word for word alike.
The budget is the profile's `[seq2seq.int8]` / `[seq2seq.fp16]` table; missing it fails the build
unless --allow-accuracy-loss. Real weights keep all three near their best under dynamic int8;
random test weights do not (hence the waiver in the tests).

The German side is the human reference: fp32 and the candidate are also scored against it when
the model translates into German (recorded, not gated: only the drop against fp32 is the build's)."""

from __future__ import annotations

from edge_slm.core.errors import AccuracyBudgetError
from edge_slm.core.targets import TranslationBudget
from edge_slm.runtime.translation_eval import against_reference, parallel_text, scores

MAX_NEW_TOKENS = 64  # the gate's sentences are short: 64 tokens is room for any of them


def measure(candidate, reference, target_lang: str | None = None, german: bool = False) -> dict:
    tokens = min(MAX_NEW_TOKENS, reference.generation.max_new_tokens)
    measured = against_reference(candidate, reference, tokens, target_lang)
    got, want = measured.pop("got"), measured.pop("want")
    if german:  # the human reference: informative, the gate reads the figures against fp32
        _, references = parallel_text()
        measured["vs_reference"] = {"fp32": scores(want, references), "candidate": scores(got, references)}
    return measured


def check(measured: dict, budget: TranslationBudget, precision: str, allow: bool) -> dict:
    problems = []
    if measured["chrf_vs_fp32"] < budget.min_chrf:
        problems.append(f"chrF against fp32 {measured['chrf_vs_fp32']:.1f} (budget >= {budget.min_chrf:g})")
    if measured["bleu_vs_fp32"] < budget.min_bleu:
        problems.append(f"BLEU against fp32 {measured['bleu_vs_fp32']:.1f} (budget >= {budget.min_bleu:g})")
    if measured["identical_share"] < budget.min_identical:
        problems.append(
            f"{measured['identical_share']:.0%} of sentences identical to fp32's (budget >= {budget.min_identical:.0%})"
        )
    if problems and not allow:
        raise AccuracyBudgetError(
            f"{precision} translation outside its accuracy budget ([seq2seq.{precision}]): {'; '.join(problems)}. "
            "Build it with --precision fp32, or pass --allow-accuracy-loss"
        )
    budget_keys = {"min_chrf": budget.min_chrf, "min_bleu": budget.min_bleu, "min_identical": budget.min_identical}
    return {**measured, "budget": budget_keys, "passed": not problems, "problems": problems}
