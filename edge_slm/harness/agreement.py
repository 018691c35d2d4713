"""Whether another machine runs a bundle as this one does: one rule for `edge-slm deploy`'s smoke
test (the device over SSH) and `edge-slm verify --emulate` (qemu), over the traces of
`edge_slm.runtime.probe`, with the tolerances of the bundle's profile.

Decoders: the same prompt ids; the same greedy tokens, except that where they part this machine's
own top two logits were closer than the largest logit difference the two machines showed (another
CPU's kernels round in another order, and a near-tie may go either way); and the two close: for a
reduced precision whose next-token statistics over the evaluation text were taken, next-token
agreement and perplexity within the precision's accuracy budget; otherwise the largest logit
difference within the precision's `max_logit_difference` (relative to the largest logit; fp32,
the reference, has no budget and a fixed 0.1%). Encoders: the profile's
`encoder.min_label_agreement` for labels, `encoder.min_cosine` for the mean cosine of vectors.
"""

from __future__ import annotations

import base64

import numpy as np

from edge_slm.core.targets import Profile

# fp32 has no accuracy budget (it is the reference): on two machines only the kernels' summation
# order differs, which moves logits by about 1e-5 of the largest.
FP32_LOGIT_DIFFERENCE = 1e-3


def logit_tolerance(profile: Profile, precision: str) -> float:
    budget = getattr(profile.budget, precision, None) if precision != "fp32" else None
    return budget.max_logit_difference if budget else FP32_LOGIT_DIFFERENCE


def _floats(encoded: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(encoded), np.float32)


def greedy_agreement(host: dict, other: dict, profile: Profile, precision: str, statistics: dict | None = None) -> dict:
    """Two `greedy_trace`s (and the `statistical_agreement` of two `eval_trace`s, when taken)
    judged by the one rule; `summary` is one line with the numbers."""
    tolerance = logit_tolerance(profile, precision)
    budget = getattr(profile.budget, precision, None) if precision != "fp32" else None
    same_prompt = host["prompt_ids"] == other["prompt_ids"]
    agree = 0
    for a, b in zip(host["tokens"], other["tokens"]):
        if a != b:
            break
        agree += 1
    # Logits compared only where both sides saw the same tokens (the parting step included).
    diffs = [
        float(np.abs(_floats(h) - _floats(o)).max() / np.abs(_floats(h)).max())
        for h, o in zip(host["logits"][: agree + 1], other["logits"][: agree + 1])
    ]
    worst = max(diffs) if diffs else float("inf")
    near_tie = False
    if agree < len(host["tokens"]) and agree < len(host["logits"]):
        top = np.sort(_floats(host["logits"][agree]))
        near_tie = bool((top[-1] - top[-2]) / np.abs(top).max() <= worst)
    greedy = same_prompt and (agree == len(host["tokens"]) or near_tie)
    summary = (
        f"{agree}/{len(host['tokens'])} greedy tokens as on this machine ({other.get('text', '')!r})"
        + ("" if same_prompt else ", different prompt ids")
        + ("; they part at a near-tie" if near_tie else "")
        + f", largest logit difference {100 * worst:.3f}% of the largest logit"
    )
    if statistics is not None and budget is None:
        statistics |= {"budget": None, "passed": None}  # reported only: fp32 is the reference, it has no budget
    if statistics is not None and budget is not None:
        # A reduced precision's kernels round differently on another CPU, by amounts that do not
        # scale with the largest logit: its accuracy budget, measured over the text, decides.
        statistics["budget"] = {"min_top1": budget.min_top1, "max_ppl_difference": budget.max_ppl_increase}
        statistics["passed"] = (
            statistics["top1_agreement"] >= budget.min_top1
            and abs(statistics["ppl_difference"]) <= budget.max_ppl_increase
        )
        close = statistics["passed"]
        summary += (
            f"; over {statistics['tokens']} tokens of eval.txt next-token agreement "
            f"{100 * statistics['top1_agreement']:.1f}% (needs {100 * budget.min_top1:.0f}%), "
            f"perplexity {100 * statistics['ppl_difference']:+.2f}% (allowed ±{100 * budget.max_ppl_increase:.1f}%)"
        )
    else:
        close = worst <= tolerance
        summary += f" (tolerance {100 * tolerance:.1f}%)"
    result = {
        "passed": bool(greedy and close),
        "summary": summary,
        "same_prompt_ids": same_prompt,
        "tokens_agreeing": agree,
        "tokens": len(host["tokens"]),
        "host_tokens": host["tokens"],
        "emulated_tokens": other["tokens"],
        "text": other.get("text", ""),
        "max_relative_logit_diff": worst,
        "tolerance": tolerance,
        "first_disagreement_near_tie": near_tie,
    }
    if statistics is not None:
        result["statistics"] = statistics
    return result


def statistical_agreement(host: dict, other: dict) -> dict:
    """Next-token agreement and perplexity of two `eval_trace`s."""
    agree = float(np.mean(np.asarray(host["top1"]) == np.asarray(other["top1"])))
    ppl_host = float(np.exp(-np.mean(host["target_logprobs"])))
    ppl_other = float(np.exp(-np.mean(other["target_logprobs"])))
    return {
        "tokens": len(host["top1"]) + 1,
        "top1_agreement": agree,
        "perplexity_host": ppl_host,
        "perplexity_emulated": ppl_other,
        "ppl_difference": ppl_other / ppl_host - 1,
    }


def encoder_agreement(host: dict, other: dict, profile: Profile) -> dict:
    """Two `encoder_trace`s: labels agreeing, or the mean cosine of the vectors, against the profile."""
    if "labels" in host:
        agree = sum(a == b for a, b in zip(host["labels"], other["labels"]))
        share = agree / max(len(host["labels"]), 1)
        need = profile.encoder.min_label_agreement
        return {
            "passed": share >= need and len(other["labels"]) == len(host["labels"]),
            "summary": f"{agree}/{len(host['labels'])} labels as on this machine ({', '.join(other['labels'][:8])})"
            + ("" if share >= need else f", fewer than the {100 * need:.0f}% the profile needs"),
            "label_agreement": share,
            "needs": need,
        }
    h = _floats(host["vectors"]).reshape(-1, host["dim"])
    o = _floats(other["vectors"]).reshape(-1, other["dim"])
    need = profile.encoder.min_cosine
    if h.shape != o.shape:
        return {
            "passed": False,
            "summary": f"vectors of shape {o.shape}, {h.shape} on this machine",
            "mean_cosine": 0.0,
            "min_cosine": 0.0,
            "needs": need,
        }
    cosine = (h * o).sum(1) / (np.linalg.norm(h, axis=1) * np.linalg.norm(o, axis=1))
    return {
        "passed": bool(cosine.mean() >= need),
        "summary": f"embeddings' cosine to this machine's: mean {cosine.mean():.5f}, min {cosine.min():.5f} "
        f"for {len(cosine)} texts (needs a mean of {need})",
        "mean_cosine": float(cosine.mean()),
        "min_cosine": float(cosine.min()),
        "needs": need,
    }
