"""Structured pruning: fewer decoder layers, fewer GQA groups, fewer FFN channels, so that the
matrices really shrink (dense kernels gain nothing from zeros). Model directory in, model
directory out; the result is a standard Hugging Face model that `edge-slm build --model DIR`
exports and quantizes like any other.

Importance comes from activations on calibration text, not weight magnitude alone:
- layers: ShortGPT's block influence, 1 - cos(layer input, layer output) averaged over tokens;
  the layers that change their input least go first;
- GQA groups (one key/value head and its query heads, removed whole so the config stays valid):
  the norm of what the group contributes to the output projection, ||W_o[:, group] a_group||;
- FFN channels: Wanda-style ||a_j|| * ||W_down[:, j]||, the size of channel j's contribution;
the same count is removed in every layer (transformers wants uniform layer sizes), each layer
choosing its own least important channels and groups.
Run by `edge-slm prune --model M --out DIR [--ffn R] [--head-groups N] [--layers N]`, and by
`edge-slm build` for profiles with a [prune] section. `edge_slm.builder.prune.recover` then distils the
pruned model back towards the original.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edge_slm.builder.decoder.export import head_dim_of
from edge_slm.builder.prune.calibration import calibration_batches, calibration_pass
from edge_slm.builder.prune.checkpoints import checkpoint_dir, remove_checkpoints
from edge_slm.core.data import CALIBRATION_TEXT, EVAL_TEXT
from edge_slm.core.errors import ModelError
from edge_slm.core.outputs import check_output_folder, output_folder


@dataclass(frozen=True)
class PruneSettings:
    ffn: float = 0.0  # share of FFN channels removed in every layer (0.25 keeps 75%)
    head_groups: int = 0  # whole GQA groups removed in every layer
    layers: int = 0  # whole decoder layers removed
    compensate: bool = True  # refit the down / output projections on the remaining channels
    sparsity: float = 0.0  # unstructured zeros per matrix row, for compression only (no speed)
    sparsity_pattern: str = "unstructured"  # or "2:4": two zeros in every four inputs

    def describe(self) -> str:
        parts = [
            f"ffn -{100 * self.ffn:.0f}%" if self.ffn else "",
            f"-{self.head_groups} head groups" if self.head_groups else "",
            f"-{self.layers} layers" if self.layers else "",
            f"{self.sparsity_pattern} sparsity {100 * self.sparsity:.0f}%" if self.sparsity else "",
        ]
        return ", ".join(p for p in parts if p) or "nothing"


def check_settings(settings: PruneSettings, config) -> None:
    """Refuse settings the model cannot take, before any work, naming what is possible."""
    groups = config.num_key_value_heads
    if not 0 <= settings.ffn < 1:
        raise ModelError(
            f"--ffn {settings.ffn}: give the share of FFN channels to remove, from 0 up to (not including) 1"
        )
    if not 0 <= settings.head_groups < groups:
        raise ModelError(
            f"--head-groups {settings.head_groups}: this model has {groups} key/value groups a layer; "
            f"remove 0 to {groups - 1}"
        )
    if not 0 <= settings.sparsity < 1 or settings.sparsity_pattern not in ("unstructured", "2:4"):
        raise ModelError(
            f"--sparsity {settings.sparsity} --sparsity-pattern {settings.sparsity_pattern}: give a share "
            "from 0 up to 1 and the pattern unstructured or 2:4"
        )
    if not 0 <= settings.layers < config.num_hidden_layers:
        raise ModelError(
            f"--layers {settings.layers}: this model has {config.num_hidden_layers} layers; "
            f"remove 0 to {config.num_hidden_layers - 1}"
        )


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def layer_influence(model, batches) -> list[float]:
    """1 - cos(input, output) of each decoder layer, averaged over calibration tokens."""
    import torch

    sums = [0.0] * len(model.model.layers)
    counts = [0] * len(model.model.layers)
    hooks = []
    for index, layer in enumerate(model.model.layers):

        def hook(module, args, kwargs, output, index=index):
            inputs = args[0] if args else kwargs["hidden_states"]
            outputs = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(inputs.float(), outputs.float(), dim=-1)
            sums[index] += float((1 - cos).sum())
            counts[index] += cos.numel()

        hooks.append(layer.register_forward_hook(hook, with_kwargs=True))
    calibration_pass(model, batches, hooks)
    return [s / max(c, 1) for s, c in zip(sums, counts)]


def channel_scores(model, batches) -> tuple[list[np.ndarray], list[np.ndarray], list, list]:
    """Per layer: the importance of each FFN channel and of each GQA group, and the Gram matrices
    (sum of a a^T over tokens) of the down and output projections' inputs, for compensation."""
    import torch

    config = model.config
    ffn_gram = [
        torch.zeros(config.intermediate_size, config.intermediate_size, dtype=torch.float64) for _ in model.model.layers
    ]
    head_dim = head_dim_of(config)
    attn_out = [
        torch.zeros(config.num_attention_heads * head_dim, config.num_attention_heads * head_dim, dtype=torch.float64)
        for _ in model.model.layers
    ]  # Gram matrix of the o_proj input, for ||W_o[:, g] a_g||
    hooks = []
    for index, layer in enumerate(model.model.layers):

        def ffn_hook(module, args, index=index):
            a = args[0].reshape(-1, args[0].shape[-1]).double()
            ffn_gram[index] += a.T @ a

        def attn_hook(module, args, index=index):
            a = args[0].reshape(-1, args[0].shape[-1]).double()
            attn_out[index] += a.T @ a

        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(ffn_hook))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(attn_hook))
    calibration_pass(model, batches, hooks)
    groups = config.num_key_value_heads
    per_group = config.num_attention_heads // groups * head_dim
    ffn_scores, group_scores = [], []
    with torch.no_grad():
        for index, layer in enumerate(model.model.layers):
            w_down = layer.mlp.down_proj.weight.double()
            ffn_scores.append((ffn_gram[index].diagonal().sqrt() * w_down.norm(dim=0)).numpy())
            w_o = layer.self_attn.o_proj.weight.double()
            scores = []
            for g in range(groups):
                cols = slice(g * per_group, (g + 1) * per_group)
                # sum over tokens of ||W_o[:, g] a_g||^2 = trace(W_g^T W_g A_g) with A_g = sum a_g a_g^T
                gram = attn_out[index][cols, cols]
                scores.append(float(torch.trace(w_o[:, cols].T @ w_o[:, cols] @ gram)))
            group_scores.append(np.sqrt(np.maximum(scores, 0)))
    return ffn_scores, group_scores, ffn_gram, attn_out


def compensate(weight, gram, kept, damping: float = 1.0):
    """Refit an output projection on the inputs that remain: the W' [out, k] that best reproduces
    the full layer's output W a on calibration activations, in least squares with a ridge pull
    towards the original columns, strong by default (`damping` 1.0 of the mean diagonal): a few
    hundred calibration tokens overfit a light one.
    Solves (G_kk + l I) W'^T = G_k: W^T + l W_:k^T, where G is the Gram matrix sum a a^T."""
    import torch

    w = weight.double()
    g_kk = gram[kept][:, kept]
    ridge = damping * float(g_kk.diagonal().mean()) * torch.eye(len(kept), dtype=torch.float64)
    rhs = gram[kept] @ w.T + ridge @ w[:, kept].T
    return torch.linalg.solve(g_kk + ridge, rhs).T.to(weight.dtype).contiguous()


def prune_model(model, tokenizer, settings: PruneSettings, calibration_text: str, progress=lambda msg: None) -> dict:
    """Prune `model` in place; return what was removed and the parameter counts."""
    import torch

    check_settings(settings, model.config)
    before = parameter_count(model)
    batches = calibration_batches(tokenizer, calibration_text)
    removed_layers: list[int] = []
    if settings.layers:
        progress(
            f"scoring {len(model.model.layers)} layers by block influence on {sum(b.shape[1] for b in batches)} tokens"
        )
        influence = layer_influence(model, batches)
        removed_layers = sorted(int(i) for i in np.argsort(influence)[: settings.layers])
        keep = [layer for i, layer in enumerate(model.model.layers) if i not in removed_layers]
        model.model.layers = torch.nn.ModuleList(keep)
        for new_index, layer in enumerate(keep):
            layer.self_attn.layer_idx = new_index
        model.config.num_hidden_layers = len(keep)
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = [t for i, t in enumerate(model.config.layer_types) if i not in removed_layers]
        progress(
            f"removed layers {removed_layers} (influence {', '.join(f'{influence[i]:.3f}' for i in removed_layers)}; "
            f"median {np.median(influence):.3f})"
        )
    removed_groups: list[list[int]] = []
    if settings.ffn or settings.head_groups:
        progress("scoring FFN channels and attention groups on the calibration text")
        ffn_scores, group_scores, ffn_grams, attn_grams = channel_scores(model, batches)
        keep_ffn = model.config.intermediate_size - int(round(settings.ffn * model.config.intermediate_size))
        keep_ffn -= keep_ffn % 8  # multiples of 8 suit every kernel's tiling
        head_dim = head_dim_of(model.config)
        for index, layer in enumerate(model.model.layers):
            if settings.ffn:
                kept = torch.from_numpy(np.sort(np.argsort(-ffn_scores[index])[:keep_ffn]))
                refit = (
                    compensate(layer.mlp.down_proj.weight.data, ffn_grams[index], kept) if settings.compensate else None
                )
                _shrink_mlp(layer.mlp, kept)
                if refit is not None:
                    layer.mlp.down_proj.weight.data = refit
            if settings.head_groups:
                drop = sorted(int(g) for g in np.argsort(group_scores[index])[: settings.head_groups])
                o_full = layer.self_attn.o_proj.weight.data
                q_rows = _shrink_attention(layer.self_attn, model.config, drop, head_dim)
                if settings.compensate:
                    layer.self_attn.o_proj.weight.data = compensate(o_full, attn_grams[index], q_rows)
                removed_groups.append(drop)
        if settings.ffn:
            model.config.intermediate_size = keep_ffn
        if settings.head_groups:
            ratio = model.config.num_attention_heads // model.config.num_key_value_heads
            model.config.head_dim = head_dim  # no longer hidden_size / heads
            model.config.num_key_value_heads -= settings.head_groups
            model.config.num_attention_heads -= settings.head_groups * ratio
    sparsity = None
    if settings.sparsity:
        from edge_slm.builder.prune.sparsify import sparsify

        progress(
            f"zeroing weights ({settings.sparsity_pattern}, {100 * settings.sparsity:.0f}%) by Wanda scores: "
            "compression only, no speed on dense kernels"
        )
        sparsity = sparsify(model, batches, settings.sparsity, settings.sparsity_pattern)
        progress(
            f"{100 * sparsity['sparsity']:.1f}% of decoder weights are zero; compressed (zlib) "
            f"{sparsity['zlib_bytes_dense'] / 1e6:.0f} MB -> {sparsity['zlib_bytes_sparse'] / 1e6:.0f} MB"
        )
    after = parameter_count(model)
    progress(f"{before / 1e6:.1f}M -> {after / 1e6:.1f}M parameters ({100 * (1 - after / before):.1f}% fewer)")
    return {
        "settings": asdict(settings),
        "removed_layers": removed_layers,
        "removed_groups_per_layer": removed_groups,
        "sparsity": sparsity,
        "parameters_before": before,
        "parameters_after": after,
        "config": {
            k: getattr(model.config, k)
            for k in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size")
        },
    }


def _linear(old, rows=None, cols=None):
    import torch

    weight = old.weight.data
    weight = weight[rows] if rows is not None else weight
    weight = weight[:, cols] if cols is not None else weight
    new = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=old.bias is not None)
    new.weight.data = weight.clone().contiguous()
    if old.bias is not None:
        new.bias.data = (old.bias.data[rows] if rows is not None else old.bias.data).clone()
    return new


def _shrink_mlp(mlp, kept) -> None:
    mlp.gate_proj = _linear(mlp.gate_proj, rows=kept)
    mlp.up_proj = _linear(mlp.up_proj, rows=kept)
    mlp.down_proj = _linear(mlp.down_proj, cols=kept)


def _shrink_attention(attn, config, drop_groups: list[int], head_dim: int):
    """Remove whole GQA groups; returns the kept query channels (the o_proj input columns)."""
    import torch

    groups = config.num_key_value_heads
    ratio = config.num_attention_heads // groups
    keep_groups = [g for g in range(groups) if g not in drop_groups]
    q_rows = torch.tensor(
        [(g * ratio + h) * head_dim + d for g in keep_groups for h in range(ratio) for d in range(head_dim)]
    )
    kv_rows = torch.tensor([g * head_dim + d for g in keep_groups for d in range(head_dim)])
    attn.q_proj = _linear(attn.q_proj, rows=q_rows)
    attn.k_proj = _linear(attn.k_proj, rows=kv_rows)
    attn.v_proj = _linear(attn.v_proj, rows=kv_rows)
    attn.o_proj = _linear(attn.o_proj, cols=q_rows)
    # transformers' attention reads these per module in some versions: keep them consistent.
    for name, value in (("num_heads", len(keep_groups) * ratio), ("num_key_value_heads", len(keep_groups))):
        if hasattr(attn, name):
            setattr(attn, name, value)
    return q_rows


class TorchScorer:
    """Just enough of `runtime.Model` for `evaluate()`, on a torch model: perplexity before and
    after pruning is measured by the same code as the accuracy gate and `edge-slm eval`."""

    def __init__(self, model, tokenizer, context_length: int = 2048, path: str = "torch"):
        self.model, self.tokenizer, self.context_length, self.path = model, tokenizer, context_length, path

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text).input_ids

    def logprobs(self, token_ids):
        import torch

        with torch.no_grad():
            logits = self.model(torch.tensor([token_ids])).logits[0, :-1].double()
        return torch.log_softmax(logits, dim=-1).numpy()


def perplexity(model, tokenizer, text: str, window: int = 512) -> float:
    from edge_slm.runtime.evaluate import evaluate

    model.eval()
    return evaluate(TorchScorer(model, tokenizer), text, window=window)["perplexity"]


def top1_against(model, reference, tokenizer, text: str, window: int = 512) -> dict:
    from edge_slm.runtime.evaluate import evaluate

    model.eval()
    got = evaluate(TorchScorer(model, tokenizer), text, TorchScorer(reference, tokenizer), window=window)
    return {
        "perplexity": got["perplexity"],
        "reference_perplexity": got["reference_perplexity"],
        "ppl_increase": got["perplexity"] / got["reference_perplexity"] - 1,
        "top1_agreement": got["top1_agreement"],
        "mean_kl": got["mean_kl"],
    }


def save_pruned(model, tokenizer, out: Path, record: dict) -> None:
    """Write a standard Hugging Face directory plus `edge_slm_prune.json` (what was done, measured)."""
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "edge_slm_prune.json").write_text(json.dumps(record, indent=2, default=_jsonable) + "\n")


def _jsonable(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value) if math.isfinite(value) else None
    raise TypeError(type(value).__name__)


def prune_directory(
    model_ref: str | None,
    settings: PruneSettings,
    out: Path,
    calibration: Path | None = None,
    recovery=None,
    progress=lambda msg: None,
) -> dict:
    """`edge-slm prune`: load, measure, prune, (recover), measure again, write `out` atomically.
    Perplexity is measured on the shipped evaluation text, never trained on."""
    import copy
    import os

    import torch

    from edge_slm.builder.decoder.export import load_torch_model
    from edge_slm.builder.decoder.load import load, load_tokenizer

    check_prune_output(Path(out))
    loaded = load(model_ref, progress=progress)
    tokenizer = load_tokenizer(loaded.path, loaded.add_bos)
    model = load_torch_model(loaded.path)
    check_settings(settings, model.config)
    calibration_path = Path(calibration) if calibration else CALIBRATION_TEXT
    try:
        calibration_text = calibration_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(
            f"{calibration_path}: cannot read the calibration text ({exc}); pass a UTF-8 text file"
        ) from None
    eval_text = EVAL_TEXT.read_text(encoding="utf-8")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    teacher, student = model, copy.deepcopy(model)
    record = prune_model(student, tokenizer, settings, calibration_text, progress=progress)
    record.update(
        {"source": loaded.source, "calibration": {"file": calibration_path.name}, "eval_text": EVAL_TEXT.name}
    )
    progress("measuring both models on the evaluation text")
    pruned = top1_against(student, teacher, tokenizer, eval_text)
    ppl_before = pruned["reference_perplexity"]
    progress(f"perplexity {ppl_before:.2f} before pruning, {pruned['perplexity']:.2f} after")
    record["perplexity"] = {"before": ppl_before, "pruned": pruned["perplexity"]}
    record["top1_agreement"] = {"pruned": pruned["top1_agreement"]}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if recovery is not None and recovery.steps > 0:
        from edge_slm.builder.prune.recover import recover
        from edge_slm.core.cache import cache_root

        record["recovery"] = recover(
            student,
            teacher,
            tokenizer,
            calibration_text,
            recovery,
            checkpoint_dir(out),
            progress,
            data_dir=cache_root() / "distillation",
            teacher_id=loaded.source.get("sha256", ""),
            run={"pruning": asdict(settings), "layers": record.get("removed_layers")},
        )
        recovered = top1_against(student, teacher, tokenizer, eval_text)
        record["perplexity"]["recovered"] = recovered["perplexity"]
        record["top1_agreement"]["recovered"] = recovered["top1_agreement"]
        progress(
            f"perplexity {recovered['perplexity']:.2f} after recovery "
            f"({100 * (recovered['perplexity'] / ppl_before - 1):+.1f}% against the unpruned model), "
            f"top-1 agreement {100 * recovered['top1_agreement']:.1f}%"
        )
    final = record["perplexity"].get("recovered", record["perplexity"]["pruned"])
    record["ppl_increase"] = final / ppl_before - 1
    with output_folder(out, "edge-slm prune") as staging:  # checks `out` again: it may have changed meanwhile
        save_pruned(student, tokenizer, staging, record)
    remove_checkpoints(out)
    return record


PRUNE_RECORD = "edge_slm_prune.json"


def check_prune_output(out: Path) -> None:
    """Refuse an output that is not new, empty, or a model `edge-slm prune` wrote that nobody added
    to or changed (`core.outputs`, the rule of every edge-slm output folder)."""
    check_output_folder(out)
