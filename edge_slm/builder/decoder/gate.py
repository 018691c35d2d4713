"""Accuracy gate: a quantized graph against the fp32 graph it came from, on the shipped
evaluation text (`edge_slm/data/eval.txt`, about 2,300 tokens of several kinds of English prose).

Measures perplexity, top-1 next-token agreement and mean KL divergence with the same torch-free
code the device uses (`edge-slm eval`), and raises `AccuracyBudgetError` when the profile's
budget for the precision is exceeded (unless the user allowed the loss). Run by `edge-slm build`.
"""

from __future__ import annotations

from pathlib import Path

from edge_slm.core.data import EVAL_TEXT
from edge_slm.core.errors import AccuracyBudgetError
from edge_slm.core.targets import AccuracyBudget
from edge_slm.runtime.evaluate import evaluate
from edge_slm.runtime.session import CacheShape, DecoderSession

WINDOW = 512  # tokens per scored window: long enough for context, short enough to run in seconds


class GraphScorer:
    """Just enough of `runtime.Model` for `evaluate()`: an ONNX file and the tokenizer's ids."""

    def __init__(self, onnx_path: Path, shape: CacheShape, encode, threads: int, shared_buffer: bool = True):
        self.session = DecoderSession(onnx_path, shape, threads, ["CPUExecutionProvider"], shared_buffer=shared_buffer)
        self.context_length = self.session.context_length
        self.encode = encode
        self.path = onnx_path

    def logprobs(self, token_ids):
        return self.session.logprobs(token_ids)


def measure(
    candidate: Path,
    reference: Path,
    shape: CacheShape,
    encode,
    threads: int = 2,
    text_path: Path = EVAL_TEXT,
    shared_buffer: bool = True,
) -> dict:
    """`shared_buffer`: the graphs write their cache in place (fused), or return it (generic)."""
    text = text_path.read_text(encoding="utf-8")
    cand = GraphScorer(candidate, shape, encode, threads, shared_buffer)
    ref = GraphScorer(reference, shape, encode, threads, shared_buffer)
    got = evaluate(cand, text, ref, window=WINDOW)
    return {
        "text": text_path.name,
        "tokens": got["scored_tokens"],
        "window": WINDOW,
        "perplexity": got["perplexity"],
        "reference_perplexity": got["reference_perplexity"],
        "ppl_increase": got["perplexity"] / got["reference_perplexity"] - 1,
        "top1_agreement": got["top1_agreement"],
        "mean_kl": got["mean_kl"],
    }


def check(measured: dict, budget: AccuracyBudget | None, precision: str, allow_loss: bool) -> dict:
    """Add the budget and the verdict to `measured`; raise when it is exceeded and not allowed."""
    if budget is None:
        return {**measured, "budget": None, "passed": None}
    failures = []
    if measured["ppl_increase"] > budget.max_ppl_increase:
        failures.append(
            f"perplexity +{100 * measured['ppl_increase']:.2f}% (budget +{100 * budget.max_ppl_increase:.2f}%)"
        )
    if measured["top1_agreement"] < budget.min_top1:
        failures.append(
            f"top-1 agreement {100 * measured['top1_agreement']:.1f}% (budget at least {100 * budget.min_top1:.1f}%)"
        )
    result = {
        **measured,
        "budget": {"max_ppl_increase": budget.max_ppl_increase, "min_top1": budget.min_top1},
        "passed": not failures,
        "loss_allowed_by_user": bool(failures and allow_loss),
    }
    if failures and not allow_loss:
        raise AccuracyBudgetError(
            f"the {precision} model is outside its accuracy budget: {'; '.join(failures)}, measured against "
            f"fp32 on {measured['tokens']} tokens of {measured['text']}; change the [quantize] recipe, or pass "
            "--allow-accuracy-loss to build it anyway"
        )
    return result


def check_pruned(record: dict, limit: float, allow_loss: bool) -> dict:
    """The gate of a profile's [prune]: the pruned (and recovered) model's perplexity on the
    evaluation text against the unpruned model's, as `edge-slm prune` measured it (`record` is its
    `edge_slm_prune.json`). Raise when it is over `limit` and the loss was not allowed."""
    measured = record["ppl_increase"]
    passed = measured <= limit
    if not passed and not allow_loss:
        ppl = record["perplexity"]
        after = ppl.get("recovered", ppl["pruned"])
        recovery = "after recovery" if "recovered" in ppl else "without recovery"
        raise AccuracyBudgetError(
            f"the pruned model's perplexity is {after:.2f} {recovery} against {ppl['before']:.2f} unpruned on "
            f"{record.get('eval_text', EVAL_TEXT.name)}: {100 * measured:+.1f}%, over the [prune] limit "
            f"max_ppl_increase = {limit} (+{100 * limit:.1f}%); remove fewer layers, heads or channels, recover longer "
            "(recover_steps, recover_minutes), or pass --allow-accuracy-loss to build it anyway (the pruned model is "
            "cached)"
        )
    return {
        "max_ppl_increase": limit,
        "ppl_increase": measured,
        "passed": passed,
        "loss_allowed_by_user": not passed,
    }
