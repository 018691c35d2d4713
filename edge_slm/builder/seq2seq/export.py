"""Export with optimum (encoder + merged decoder with past), validation against torch, int8.

optimum's `main_export(task="text2text-generation-with-past")` writes optimum's layout: an encoder
graph and a merged decoder graph (its first step takes the encoder's output and returns the
cross-attention keys/values; later steps take the cache back). We keep those two files and check
them against torch before anything else uses them: the encoder's output and the decoder's logits
at a first step and at a cached step, within PARITY_TOLERANCE.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from edge_slm.core.errors import ExportError, ParityError

ENCODER_FILE, DECODER_FILE = "encoder_model.onnx", "decoder_model_merged.onnx"
PARITY_TOLERANCE = 1e-3  # fp32 graphs vs torch on O(1-10) logits; optimum's own default atol is 1e-4..1e-3
VALIDATION_TEXTS = (
    "the cat sits on the mat",
    "hello",
    "machine translation on small devices should keep the meaning of every sentence",
)


def export_graphs(model_dir: Path, out_dir: Path, note) -> dict[str, Path]:
    from optimum.exporters.onnx import main_export

    work = out_dir / "optimum"
    try:
        main_export(str(model_dir), str(work), task="text2text-generation-with-past", do_validation=False)
    except Exception as exc:  # optimum raises many types; the message names the problem
        raise ExportError(f"optimum could not export {model_dir}: {exc}") from None
    paths = {}
    for name in (ENCODER_FILE, DECODER_FILE):
        if not (work / name).is_file():
            raise ExportError(f"optimum wrote no {name} for {model_dir}: is it an encoder-decoder model?")
        shutil.move(str(work / name), str(out_dir / name))
        for data in work.glob(name + "_data"):
            shutil.move(str(data), str(out_dir / data.name))
        paths[name] = out_dir / name
    shutil.rmtree(work, ignore_errors=True)
    return paths


def validate_graphs(graphs, model, tokenizer) -> dict:
    """Max |onnx - torch| of the encoder output and of the decoder logits at the first step and a
    cached step, on a padded batch; ParityError beyond tolerance."""
    import torch

    batch = tokenizer(list(VALIDATION_TEXTS), return_tensors="pt", padding=True)
    start = model.config.decoder_start_token_id
    with torch.no_grad():
        enc = model.get_encoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        steps = torch.tensor([[start, 5]] * len(VALIDATION_TEXTS))
        logits = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, decoder_input_ids=steps
        ).logits.numpy()
    ids, mask = batch.input_ids.numpy(), batch.attention_mask.numpy()
    hidden = graphs.encode(ids, mask)
    keep = mask.astype(bool)  # padded positions' hidden states are never attended to
    encoder_diff = float(np.abs(hidden - enc.numpy())[keep].max())
    first, past = graphs.step(steps[:, :1].numpy(), hidden, mask, None)
    second, _ = graphs.step(steps[:, 1:].numpy(), hidden, mask, past)
    decoder_diff = float(max(np.abs(first - logits[:, 0]).max(), np.abs(second - logits[:, 1]).max()))
    worst = max(encoder_diff, decoder_diff)
    if not worst <= PARITY_TOLERANCE:
        raise ParityError(
            f"the exported seq2seq graphs differ from torch: encoder {encoder_diff:.2e}, decoder logits "
            f"{decoder_diff:.2e} (tolerance {PARITY_TOLERANCE:.0e})"
        )
    return {
        "encoder_max_abs_diff": encoder_diff,
        "decoder_logits_max_abs_diff": decoder_diff,
        "tolerance": PARITY_TOLERANCE,
        "texts": len(VALIDATION_TEXTS),
        "decoder_steps": 2,
    }


def quantize_int8(paths: dict[str, Path], out_dir: Path, reduce_range: bool) -> dict:
    """onnxruntime's dynamic int8 (per-channel weights, activations quantized at run time) on the
    MatMuls of both graphs: the recipe optimum uses for Marian, and onnxruntime walks the merged
    decoder's If branches. Embeddings (Gather) stay fp32: they are shared with the output projection.
    `reduce_range`: weights in -64..64, for the reason `core.targets.Encoder.reduce_range` gives."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    for name, path in paths.items():
        quantize_dynamic(
            str(path),
            str(out_dir / name),
            per_channel=True,
            reduce_range=reduce_range,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul"],
        )
    return {
        "method": "onnxruntime quantize_dynamic",
        "weights": "int8 per-channel",
        "weight_range": "-64..64" if reduce_range else "-127..127",
        "ops": ["MatMul"],
    }


def convert_fp16(paths: dict[str, Path], out_dir: Path) -> dict:
    """float16 weights and activations in both graphs (the merged decoder's If branches too), and
    float16 hidden states, cache and logits between them: on the GPU the cache stays half as large
    and crosses no Cast per step; the runtime reads the cache's type from the graph and casts the
    logits to float32 for the search. onnxruntime's converter (the encoder family's fp16 uses it
    too); its CPU provider runs the result, which is how the build checks the numerics."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    for name, path in paths.items():
        # keep_io_types is not used: its Casts at the outputs rename what the If branches return,
        # which onnxruntime then refuses (a branch may not return an outer-scope value).
        half = convert_float_to_float16(onnx.load(str(path)), keep_io_types=False, disable_shape_infer=True)
        onnx.save(half, str(out_dir / name))
    return {"method": "fp16", "weights": "float16", "io": "float16 hidden states, cache and logits"}
