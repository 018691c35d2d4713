"""What the host compares a device with: the same short runs of a bundle on both sides, in the
same code. `edge-slm deploy` runs them on the device over SSH (its smoke test) and `edge-slm
verify --emulate` under qemu; both run them on this machine too, and decide with
`edge_slm.harness.agreement`. On the device they run through the worker protocol:

    python -m edge_slm.core.worker edge_slm.runtime.probe:greedy_trace '{"bundle": "...", "tokens": 8, "threads": 1}'

Logits and vectors travel as base64 float32, so that both sides compare the same bits.
"""

from __future__ import annotations

import base64
import time

import numpy as np

from edge_slm.core.data import EVAL_TEXT
from edge_slm.core.system import peak_rss_mb

QUESTION = "What is the capital of France?"


def greedy_trace(bundle: str, tokens: int, threads: int | None) -> dict:
    """Prompt ids, greedy tokens and every step's logits for a fixed chat question."""
    import onnxruntime

    from edge_slm import runtime

    model = runtime.load(bundle, threads=threads, verify=False)
    text = (
        model.render_chat([{"role": "user", "content": QUESTION}])
        if model.generation.get("chat_template")
        else QUESTION
    )
    ids = model.encode(text)
    start = time.perf_counter()
    logits = model.session.forward(ids)
    first = time.perf_counter() - start
    steps, out = [logits], []
    for _ in range(tokens):
        out.append(int(np.argmax(steps[-1])))
        if len(out) < tokens:
            steps.append(model.session.forward([out[-1]]))
    seconds = time.perf_counter() - start
    return {
        "prompt_ids": ids,
        "tokens": out,
        "text": model.decode(out),
        "onnxruntime": onnxruntime.__version__,
        "first_token_s": first,
        "seconds": seconds,
        "decode_tokens_per_s": (tokens - 1) / (seconds - first) if tokens > 1 and seconds > first else None,
        # Under qemu-user this is the emulator's process: the guest's memory plus qemu's own.
        "peak_rss_mb": peak_rss_mb(),
        "logits": [base64.b64encode(np.asarray(s, np.float32).tobytes()).decode() for s in steps],
    }


def eval_trace(bundle: str, eval_tokens: int, threads: int | None) -> dict:
    """Next-token statistics over the first `eval_tokens` tokens of the shipped evaluation text
    (at most the bundle's context)."""
    from edge_slm import runtime

    model = runtime.load(bundle, threads=threads, verify=False)
    ids = model.encode(EVAL_TEXT.read_text(encoding="utf-8"))[: min(eval_tokens, model.context_length)]
    logp = model.logprobs(ids)
    targets = np.asarray(ids[1:])
    return {"top1": logp.argmax(-1).tolist(), "target_logprobs": logp[np.arange(len(targets)), targets].tolist()}


def encoder_trace(bundle: str, threads: int | None, texts: list[str] | None = None) -> dict:
    """A classifier's labels, or an embedder's vectors, for `texts` (by default the shipped intents
    test texts for a classifier, the retrieval check's queries and passages for an embedder)."""
    import onnxruntime

    from edge_slm import runtime
    from edge_slm.core.labelled import INTENTS_TEST, read_examples, read_retrieval

    model = runtime.load(bundle, threads=threads, verify=False)
    if texts is None and model.task == "classification":
        texts = [e.text for e in read_examples(INTENTS_TEST)]
    elif texts is None:
        check = read_retrieval()
        texts = check.queries + check.passages
    start = time.perf_counter()
    if model.task == "classification":
        out = {"labels": [r.label for r in model.classify(texts)]}
    else:
        vectors = model.embed(texts)
        out = {"vectors": base64.b64encode(vectors.astype(np.float32).tobytes()).decode(), "dim": vectors.shape[1]}
    return {
        **out,
        "texts": len(texts),
        "seconds": time.perf_counter() - start,
        "onnxruntime": onnxruntime.__version__,
    }
