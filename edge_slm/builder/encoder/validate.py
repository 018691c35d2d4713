"""The exported encoder against torch: each validation text run alone in torch (no padding) and in
padded ONNX batches of mixed lengths, so a graph that lets padding leak into the result fails."""

from __future__ import annotations

import os

import numpy as np

from edge_slm.core.errors import ParityError
from edge_slm.runtime.encoder import EncoderGraph

# Largest |onnx - torch| allowed in fp32: logits are O(1-10), embeddings unit vectors.
PARITY_TOLERANCE = {"classification": 1e-3, "embedding": 1e-4}
VALIDATION_TEXTS = (
    "turn off the kitchen lights",
    "hi",
    "What will the weather be like in Lisbon on Saturday afternoon, and should I bring a jacket?",
    "play something relaxing",
    "Set a timer for twelve minutes, then remind me to take the bread out of the oven before it burns.",
    "add milk",
    "Encoders pool their hidden states into one vector per text; padding must never change that vector.",
)


def graph_of(exported, tokenizer, providers=("CPUExecutionProvider",), path=None) -> EncoderGraph:
    """An onnxruntime session over a built encoder graph (fp32 or reduced), as the device opens it."""
    return EncoderGraph(
        path or exported.onnx_path,
        tokenizer.backend_tokenizer,
        list(exported.inputs),
        exported.shape["max_sequence_length"],
        tokenizer.pad_token_id or 0,
        threads=os.cpu_count() or 1,
        providers=list(providers),
        unfused_layer_norms=exported.layer_norms == "unfused",
    )


def torch_outputs(head, tokenizer, texts, names, max_length: int) -> np.ndarray:
    """The torch module's output for each text on its own (batch of one, no padding, truncated
    to the bundle's limit as the device truncates it)."""
    import torch

    rows = []
    with torch.no_grad():
        for text in texts:
            batch = tokenizer([text], return_tensors="pt", truncation=True, max_length=max_length)
            rows.append(head(*(batch[name] for name in names))[0].numpy())
    return np.stack(rows)


def validate_encoder(exported, head, tokenizer) -> dict:
    """Max |diff| between torch and the fp32 graph in batches of 3; ParityError beyond tolerance."""
    texts = list(VALIDATION_TEXTS)
    reference = torch_outputs(head, tokenizer, texts, exported.inputs, exported.shape["max_sequence_length"])
    graph = graph_of(exported, tokenizer)
    got = graph.run(texts, batch_size=3)
    diff = float(np.abs(got - reference).max())
    tolerance = PARITY_TOLERANCE[exported.shape["task"]]
    if not diff <= tolerance:
        raise ParityError(
            f"the exported encoder differs from torch by {diff:.2e} (tolerance {tolerance:.0e}) on padded batches"
        )
    return {"max_abs_diff": diff, "tolerance": tolerance, "texts": len(texts), "batch_size": 3}
