"""Unstructured sparsity for compression only: zero the least important weights of every decoder
matrix (Wanda: |W_ij| * ||x_j|| over calibration activations), freely or 2:4 (two of every four
consecutive inputs). The matrices keep their shape, so onnxruntime's and llama.cpp's dense CPU
kernels run exactly as fast as before: the gain is a smaller file once compressed, nothing else.
Run by `edge-slm prune --sparsity R [--sparsity-pattern unstructured|2:4]`.
"""

from __future__ import annotations

import zlib

from edge_slm.builder.prune.calibration import calibration_pass

LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def input_norms(model, batches) -> dict[str, object]:
    """||x_j|| over calibration tokens for the input of every decoder matrix."""
    import torch

    sums: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in model.named_modules():
        if name.split("layers.")[-1].split(".", 1)[-1] in LINEARS:

            def hook(module, args, name=name):
                a = args[0].reshape(-1, args[0].shape[-1]).double()
                sums[name] = sums.get(name, 0) + (a * a).sum(0)

            hooks.append(module.register_forward_pre_hook(hook))
    calibration_pass(model, batches, hooks)
    return {name: s.sqrt().float() for name, s in sums.items()}


def sparsify(model, batches, ratio: float, pattern: str = "unstructured") -> dict:
    """Zero `ratio` of each decoder matrix's weights per output row (2:4: exactly half); returns
    the achieved sparsity and the compressed size of the decoder weights before and after."""
    import torch

    norms = input_norms(model, batches)
    modules = dict(model.named_modules())
    dense_bytes = compressed_before = compressed_after = zeros = total = 0
    with torch.no_grad():
        for name, norm in norms.items():
            weight = modules[name].weight
            before = weight.detach().numpy().tobytes()
            score = weight.abs() * norm[None, :]
            if pattern == "2:4":
                groups = score.reshape(score.shape[0], -1, 4)
                drop = groups.argsort(dim=-1)[..., :2]
                mask = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, drop, False).reshape(score.shape)
            else:
                k = int(round(ratio * score.shape[1]))
                drop = score.argsort(dim=1)[:, :k]
                mask = torch.ones_like(score, dtype=torch.bool).scatter_(1, drop, False)
            weight.mul_(mask)
            dense_bytes += len(before)
            compressed_before += len(zlib.compress(before, 6))
            compressed_after += len(zlib.compress(weight.detach().numpy().tobytes(), 6))
            zeros += int((~mask).sum())
            total += mask.numel()
    return {
        "pattern": pattern,
        "ratio": ratio if pattern != "2:4" else 0.5,
        "zeroed_weights": zeros,
        "decoder_weights": total,
        "sparsity": zeros / max(total, 1),
        "decoder_fp32_bytes": dense_bytes,
        "zlib_bytes_dense": compressed_before,
        "zlib_bytes_sparse": compressed_after,
        "speed": "none: onnxruntime and llama.cpp run dense kernels on CPU; only the compressed file shrinks",
    }


def zero_share(model) -> float:
    weights = [
        m.weight.detach().numpy()
        for n, m in model.named_modules()
        if n.split("layers.")[-1].split(".", 1)[-1] in LINEARS
    ]
    return float(sum((w == 0).sum() for w in weights) / sum(w.size for w in weights))
