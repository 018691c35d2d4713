"""On-device accuracy: perplexity of a bundle over a text, and agreement with a reference bundle.

`edge-slm eval BUNDLE --text FILE [--reference FP32_BUNDLE]`. The text is cut into windows of the
context length (or `window`); every token after the first of each window is scored.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from edge_slm.core.errors import EdgeSlmError
from edge_slm.core.text import check_text, decode_lines


def evaluate(model, text: str, reference=None, window: int | None = None, progress=lambda done, total: None) -> dict:
    ids = model.encode(text)
    window = min(window or model.context_length, model.context_length)
    if len(ids) < 2:
        raise EdgeSlmError("the evaluation text has fewer than 2 tokens: give a longer text")
    if window < 2:
        raise EdgeSlmError("the window must be at least 2 tokens")
    if reference is not None and reference.encode(text) != ids:
        raise EdgeSlmError("the reference bundle tokenizes the text differently: compare bundles of the same model")
    windows = [ids[i : i + window] for i in range(0, len(ids), window)]
    windows = [w for w in windows if len(w) >= 2]
    nll = ref_nll = scored = agree = 0
    kl_sum = 0.0
    for n, chunk in enumerate(windows):
        logp = model.logprobs(chunk)
        targets = np.asarray(chunk[1:])
        nll -= float(logp[np.arange(len(targets)), targets].sum())
        scored += len(targets)
        if reference is not None:
            ref = reference.logprobs(chunk)
            ref_nll -= float(ref[np.arange(len(targets)), targets].sum())
            agree += int((ref.argmax(-1) == logp.argmax(-1)).sum())
            kl_sum += float((np.exp(ref) * (ref - logp)).sum())
        progress(n + 1, len(windows))
    result = {
        "tokens": len(ids),
        "scored_tokens": scored,
        "windows": len(windows),
        "window": window,
        "perplexity": math.exp(nll / scored),
        "mean_nll": nll / scored,
    }
    if reference is not None:
        result.update(
            {
                "reference": str(reference.path),
                "top1_agreement": agree / scored,
                "mean_kl": kl_sum / scored,
                "reference_perplexity": math.exp(ref_nll / scored),
            }
        )
    return result


def read_text(path: Path) -> str:
    """The UTF-8 text of `path`; a byte that is not UTF-8 is one error naming its line."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise EdgeSlmError(f"{path}: no such text file") from None
    for number, line in decode_lines(data):
        check_text(line, f"{path}:{number}")
    return data.decode("utf-8")
