"""Structured pruning of a BERT-family encoder (a fine-tuned classifier or a sentence embedder) on
its own task's data, then distillation from the unpruned model (`prune.encoder_recover`).

What goes, measured on the task's texts (one text per forward pass, so no padding enters a score):
- layers: block influence, 1 - cos(layer input, layer output) averaged over tokens; the layers
  that change their input least go first (as for decoders, ShortGPT);
- attention heads: the size of what each head adds to the attention output projection,
  ||W_o[:, head] a_head|| summed over tokens; removed with transformers' `prune_heads`, which
  records them in the config (`pruned_heads`), so the folder loads anywhere transformers runs;
- FFN channels: ||a_j|| * ||W_out[:, j]||, the activation-weighted size of channel j's output
  (Wanda-style); `intermediate_size` shrinks with them.
Then each shrunk output projection (the attention output's and the FFN's) is refitted on what
remains: the weights and bias that best reproduce the full projection's output on the scoring
texts, in least squares with a light ridge pull to the old weights (`refit_projection`): the
bias takes up part of the removed channels' average output and the kept ones absorb what they
can of the rest. Measured on all-MiniLM-L6-v2 with the shipped texts, the mean cosine to the
unpruned model right after pruning went from 0.699 to 0.829 with a layer, a quarter of the heads
and half the FFN removed.
The same number of heads and channels goes from every layer: the fused Attention operator and
transformers' config describe one width for all layers.

The output is a standard Hugging Face folder `edge-slm build --model DIR` takes, with the record of
what was removed and the accuracy before pruning, after it and after recovery
(`edge_slm_prune.json`, copied into the bundle's manifest by the build).
Run by `edge-slm prune --model ENCODER --data TASK ...` and `edge-slm build --prune`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from edge_slm.builder.prune.checkpoints import checkpoint_dir, remove_checkpoints
from edge_slm.builder.prune.encoder_data import TaskData, read_held_out, read_task_data
from edge_slm.core.errors import ModelError
from edge_slm.core.labelled import read_retrieval
from edge_slm.core.outputs import check_output_folder, output_folder

PRUNE_RECORD = "edge_slm_prune.json"
PRUNABLE = ("bert", "roberta")  # the BertLayer layout: encoder.layer[i].attention.self / .output, intermediate


@dataclass(frozen=True)
class EncoderPruneSettings:
    layers: int = 0  # whole layers removed, lowest block influence first
    heads: float = 0.0  # share of attention heads removed in every remaining layer
    ffn: float = 0.0  # share of FFN channels removed in every remaining layer
    score_texts: int = 512  # task texts the importance scores are measured on
    refit: bool = True  # refit the shrunk output projections on the kept inputs (least squares)

    def describe(self) -> str:
        parts = [
            f"-{self.layers} layers" if self.layers else "",
            f"heads -{100 * self.heads:.0f}%" if self.heads else "",
            f"ffn -{100 * self.ffn:.0f}%" if self.ffn else "",
        ]
        return ", ".join(p for p in parts if p) or "nothing"


def check_settings(
    settings: EncoderPruneSettings, config, labels: dict[str, str] | None = None, nothing: str | None = None
) -> None:
    """Refuse what the model cannot take, before any work, naming what is possible. `labels` name
    where a value came from (default: its option, "--layers"; a profile's table gives
    "FILE: [embedder_prune] layers ="), `nothing` what to say when nothing would be removed."""
    labels = {name: f"--{name}" for name in ("layers", "heads", "ffn")} | (labels or {})
    if config.model_type not in PRUNABLE:
        raise ModelError(
            f"encoder pruning handles the {' and '.join(PRUNABLE)} layouts; this model is {config.model_type}"
        )
    for name in ("heads", "ffn"):
        value = getattr(settings, name)
        if not 0 <= value < 1 or math.isnan(value):
            raise ModelError(
                f"{labels[name]} {value}: give the share to remove in every layer, above 0 and below 1 "
                "(0.25 removes a quarter)"
            )
    per_layer = {"heads": (heads_left(config), "attention heads"), "ffn": (config.intermediate_size, "FFN channels")}
    for name, (count, what) in per_layer.items():
        value = getattr(settings, name)
        if 0 < value < 1 / count:
            raise ModelError(
                f"{labels[name]} {value}: removes nothing (a layer has {count} {what}); "
                f"give at least {smallest_share(count):.3g}"
            )
    layers = config.num_hidden_layers
    if not 0 <= settings.layers < layers:
        raise ModelError(
            f"{labels['layers']} {settings.layers}: this model has {layers} layers; remove 0 to {layers - 1}"
        )
    if not (settings.layers or settings.heads or settings.ffn):
        raise ModelError(nothing or "nothing to prune: pass --layers, --heads and/or --ffn")


def smallest_share(count: int) -> float:
    """The smallest share, to three significant digits, that removes one of `count` (rounded up:
    1/12 is 0.0834, since 0.0833 of 12 heads is none)."""
    step = 10 ** (math.floor(math.log10(1 / count)) - 2)
    return math.ceil(1 / count / step) * step


def heads_left(config) -> int:
    """Attention heads in each layer: the config's, less those pruned before (the same in every layer)."""
    pruned = next(iter(config.pruned_heads.values()), ())
    return config.num_attention_heads - len(pruned)


def base_of(model):
    """The encoder inside a classifier (model.bert, model.roberta), or the model itself."""
    return model.base_model


def layer_influence(model, batches) -> list[float]:
    """1 - cos(input, output) of each layer, averaged over the texts' tokens."""
    import torch

    layers = base_of(model).encoder.layer
    sums, counts, hooks = [0.0] * len(layers), [0] * len(layers), []
    for index, layer in enumerate(layers):

        def hook(module, args, kwargs, output, index=index):
            inputs = args[0] if args else kwargs["hidden_states"]
            outputs = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(inputs.float(), outputs.float(), dim=-1)
            sums[index] += float((1 - cos).sum())
            counts[index] += cos.numel()

        hooks.append(layer.register_forward_hook(hook, with_kwargs=True))
    _run(model, batches, hooks)
    return [s / max(c, 1) for s, c in zip(sums, counts)]


def head_and_channel_scores(model, batches, grams: dict | None = None, parts=("attention", "ffn")) -> tuple[list, list]:
    """Per layer: each attention head's contribution and each FFN channel's, as tensors. With
    `grams`, also the Gram matrices of the two output projections' inputs with a constant 1
    appended (for the bias), keyed (layer, "attention" | "ffn"), for `refit_projection`: only
    for the `parts` that lose heads or channels."""
    import torch

    base = base_of(model)
    config = base.config
    heads_per_layer = [layer.attention.self.num_attention_heads for layer in base.encoder.layer]
    head_dim = config.hidden_size // config.num_attention_heads
    head_sums = [torch.zeros(n, dtype=torch.float64) for n in heads_per_layer]
    channel_sq = [torch.zeros(layer.output.dense.in_features, dtype=torch.float64) for layer in base.encoder.layer]
    hooks = []
    for index, layer in enumerate(base.encoder.layer):
        w_o = layer.attention.output.dense.weight

        def attn_hook(module, args, index=index, w_o=w_o):
            heads = heads_per_layer[index]
            a = args[0].reshape(-1, heads, head_dim)  # [tokens, head, head_dim]
            per_head = torch.einsum("thd,ohd->tho", a, w_o.reshape(w_o.shape[0], heads, head_dim))
            head_sums[index] += per_head.norm(dim=-1).sum(0).double()

        def ffn_hook(module, args, index=index):
            a = args[0].reshape(-1, args[0].shape[-1]).double()
            channel_sq[index] += (a * a).sum(0)

        hooks.append(layer.attention.output.dense.register_forward_pre_hook(attn_hook))
        hooks.append(layer.output.dense.register_forward_pre_hook(ffn_hook))
        if grams is not None:
            projections = (("attention", layer.attention.output.dense), ("ffn", layer.output.dense))
            for part, projection in (pair for pair in projections if pair[0] in parts):

                def gram_hook(module, args, key=(index, part)):
                    a = args[0].reshape(-1, args[0].shape[-1]).double()
                    a = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], 1)
                    grams[key] = grams.get(key, 0) + a.T @ a

                hooks.append(projection.register_forward_pre_hook(gram_hook))
    _run(model, batches, hooks)
    channel_scores = [
        sq.sqrt() * layer.output.dense.weight.double().norm(dim=0).detach()
        for sq, layer in zip(channel_sq, base.encoder.layer)
    ]
    return head_sums, channel_scores


def _run(model, batches, hooks) -> None:
    import torch

    try:
        with torch.no_grad():
            for batch in batches:
                model(**batch)
    finally:
        for h in hooks:
            h.remove()


def score_batches(tokenizer, texts: list[str], count: int, max_length: int) -> list:
    """One text per batch (no padding to skew the averages), evenly spread over the data."""
    step = max(1, len(texts) // count)
    return [tokenizer([t], truncation=True, max_length=max_length, return_tensors="pt") for t in texts[::step][:count]]


def prune_model(model, tokenizer, settings: EncoderPruneSettings, data: TaskData, progress=lambda m: None) -> dict:
    """Prune `model` in place: layers first (the heads and channels are then scored on what stays)."""
    import torch

    base = base_of(model)
    config = base.config
    batches = score_batches(tokenizer, data.texts, settings.score_texts, token_limit(model))
    before = sum(p.numel() for p in model.parameters())
    record: dict = {"settings": asdict(settings), "parameters_before": before, "layers_before": len(base.encoder.layer)}
    if settings.layers:
        influence = layer_influence(model, batches)
        removed = sorted(sorted(range(len(influence)), key=lambda i: influence[i])[: settings.layers])
        base.encoder.layer = torch.nn.ModuleList(x for i, x in enumerate(base.encoder.layer) if i not in removed)
        config.num_hidden_layers = len(base.encoder.layer)
        # transformers keys heads pruned before by layer index, and prunes them again at load: they
        # move down with their layers (else the folder no longer loads).
        pruned = {int(k): v for k, v in config.pruned_heads.items()}
        kept_layers = [i for i in range(len(influence)) if i not in removed]
        config.pruned_heads = {new: pruned[old] for new, old in enumerate(kept_layers) if old in pruned}
        record["layer_influence"] = [round(v, 5) for v in influence]
        record["removed_layers"] = removed
        progress(f"removed layers {removed} (block influence {', '.join(f'{v:.3f}' for v in influence)})")
    parts = {p for p, share in (("attention", settings.heads), ("ffn", settings.ffn)) if share}
    grams: dict | None = {} if settings.refit and parts else None
    head_scores, channel_scores = head_and_channel_scores(model, batches, grams, parts)
    if settings.heads:
        present = heads_left(config)
        count = min(int(settings.heads * present), present - 1)
        # Scores are by position among a layer's heads; `prune_heads` takes the original head ids,
        # which differ from the positions in a model whose heads were pruned before.
        positions = {i: sorted(int(h) for h in scores.argsort()[:count]) for i, scores in enumerate(head_scores)}
        gone = {int(k): set(v) for k, v in config.pruned_heads.items()}
        ids = [[h for h in range(config.num_attention_heads) if h not in gone.get(i, ())] for i in positions]
        drop = {i: [ids[i][p] for p in where] for i, where in positions.items()}
        head_dim = config.hidden_size // config.num_attention_heads
        full = [layer.attention.output.dense for layer in base.encoder.layer]  # prune_heads replaces them
        if count:
            base.prune_heads(drop)
        if count and grams is not None:
            for index, layer in enumerate(base.encoder.layer):
                kept = [h for h in range(present) if h not in positions[index]]
                columns = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in kept])
                refit_projection(layer.attention.output.dense, full[index], grams[(index, "attention")], columns)
        record["removed_heads"] = {str(i): heads for i, heads in drop.items()}
        progress(f"removed {count} of {present} attention heads in every layer")
    if settings.ffn:
        keep = config.intermediate_size - int(settings.ffn * config.intermediate_size)
        for index, (layer, scores) in enumerate(zip(base.encoder.layer, channel_scores)):
            kept = torch.sort(scores.argsort(descending=True)[:keep]).values
            full = layer.output.dense
            layer.intermediate.dense = _linear(layer.intermediate.dense, rows=kept)
            layer.output.dense = _linear(full, cols=kept)
            if grams is not None:
                refit_projection(layer.output.dense, full, grams[(index, "ffn")], kept)
        record["ffn_channels"] = {"before": config.intermediate_size, "after": keep}
        progress(f"kept {keep} of {config.intermediate_size} FFN channels in every layer")
        config.intermediate_size = keep
    record["parameters_after"] = sum(p.numel() for p in model.parameters())
    return record


def refit_projection(shrunk, full, gram, kept, damping: float = 0.1) -> None:
    """Set `shrunk` (the projection `full` with only the input columns `kept`) to the weights and
    bias that best reproduce `full`'s output W a + b from the kept inputs, over the scoring texts'
    tokens: least squares on [a_kept, 1], with a ridge pull towards the old weights of 0.1 of the
    Gram matrix's mean diagonal (lighter than the decoder's: 512 texts give thousands of tokens
    per projection, where a decoder's calibration text gives hundreds; 0.1 and 0.01 measured the
    same, 1.0 left more of the damage). `gram` is sum [a, 1][a, 1]^T over all of `full`'s inputs.
    Solves (G_kk + l I) W'^T = G_k: W^T + l W_:k^T with the bias as the last input column."""
    import torch

    w = torch.cat([full.weight.data.double(), full.bias.data.double()[:, None]], 1)
    index = torch.cat([torch.as_tensor(kept, dtype=torch.long), torch.tensor([w.shape[1] - 1])])
    g_kk = gram[index][:, index]
    ridge = damping * float(g_kk.diagonal().mean()) * torch.eye(len(index), dtype=torch.float64)
    solved = torch.linalg.solve(g_kk + ridge, gram[index] @ w.T + ridge @ w[:, index].T).T
    shrunk.weight.data = solved[:, :-1].to(full.weight.dtype).contiguous()
    shrunk.bias.data = solved[:, -1].to(full.weight.dtype).contiguous()


def _linear(old, rows=None, cols=None):
    """A copy of `old` keeping only the given output rows or input columns."""
    import torch

    weight = old.weight.data
    bias = old.bias.data if old.bias is not None else None
    if rows is not None:
        weight, bias = weight[rows], (bias[rows] if bias is not None else None)
    if cols is not None:
        weight = weight[:, cols]
    new = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    new.weight.data.copy_(weight)
    if bias is not None:
        new.bias.data.copy_(bias)
    return new


def measure(student, teacher, tokenizer, task: str, eval_examples, labels) -> dict:
    """The torch models on held-out data: a classifier's accuracy (and agreement with the teacher);
    an embedder's cosine to the teacher and recall@1 on the shipped retrieval check."""
    import numpy as np

    from edge_slm.runtime.encoder_eval import best_passages, unit

    def run(model, texts):
        return encode(model, tokenizer, texts).numpy()

    if task == "classification":
        texts = [e.text for e in eval_examples]
        truth = np.array([labels.index(e.label) for e in eval_examples])
        got, want = run(student, texts).argmax(1), run(teacher, texts).argmax(1)
        return {
            "texts": len(texts),
            "accuracy": float((got == truth).mean()),
            "teacher_accuracy": float((want == truth).mean()),
            "label_agreement": float((got == want).mean()),
        }
    check = read_retrieval()
    texts = check.queries + check.passages + [e.text for e in eval_examples]
    cosine = (unit(run(student, texts)) * unit(run(teacher, texts))).sum(1)
    truth = np.arange(len(check.queries))
    n = len(check.queries)

    def recall(model):
        vectors = run(model, check.queries + check.passages)
        return float((best_passages(vectors[:n], vectors[n:])[:, 0] == truth).mean())

    return {
        "texts": len(texts),
        "mean_cosine": float(cosine.mean()),
        "min_cosine": float(cosine.min()),
        "recall_at_1": recall(student),
        "teacher_recall_at_1": recall(teacher),
    }


def token_limit(model, max_length: int = 128) -> int:
    """`max_length`, or fewer when the model has fewer positions."""
    config = model.config
    return min(max_length, config.max_position_embeddings - (2 if config.model_type == "roberta" else 0))


def encode(head, tokenizer, texts: list[str], batch_size: int = 64, max_length: int = 128):
    """The head's outputs (logits or pooled embeddings) for `texts`, in batches, without gradients."""
    import torch

    max_length = token_limit(head.model, max_length)

    outputs = []
    with torch.no_grad():
        for first in range(0, len(texts), batch_size):
            inputs = tokenizer(
                texts[first : first + batch_size],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            outputs.append(head(**inputs))
    return torch.cat(outputs)


def check_prune_output(out: Path) -> None:
    check_output_folder(out)


def prune_encoder_directory(
    model_ref: str,
    settings: EncoderPruneSettings,
    out: Path,
    data_path: Path | None = None,
    eval_path: Path | None = None,
    recovery=None,
    progress=lambda msg: None,
    labels: dict[str, str] | None = None,
    nothing: str | None = None,
) -> dict:
    """`edge-slm prune` for encoders: load, score, prune, measure, distil, measure, write `out`.
    `labels` and `nothing`: how a refusal names the settings (`check_settings`)."""
    import copy

    from edge_slm.builder.encoder.export import load_torch_encoder
    from edge_slm.builder.encoder.source import load_encoder

    out = Path(out)
    check_prune_output(out)
    source = load_encoder(model_ref)
    teacher = load_torch_encoder(source)
    check_settings(settings, teacher.model.config, labels, nothing)
    data = read_task_data(data_path, source.task, source.labels)
    eval_examples = read_held_out(eval_path, source)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source.path))
    student = copy.deepcopy(teacher)
    record = prune_model(student.model, tokenizer, settings, data, progress)
    record.update(
        {
            "family": "encoder",
            "task": source.task,
            "source": source.source,
            "data": data.where,
            "eval_data": eval_examples[1],
            "pooling": {"mode": source.pooling, "normalize": source.normalize},
        }
    )
    key = "accuracy" if source.task == "classification" else "mean_cosine"
    measured = {"pruned": measure(student, teacher, tokenizer, source.task, eval_examples[0], list(source.labels))}
    progress(f"after pruning: {_line(measured['pruned'], source.task)}")
    checkpoints = checkpoint_dir(out)
    if recovery is not None and recovery.steps > 0:
        from edge_slm.builder.prune.encoder_recover import distill, teacher_layers

        layer_map = teacher_layers(
            student.model.config.num_hidden_layers, record["layers_before"], record.get("removed_layers", [])
        )
        # The teacher and the pruning are part of what a checkpoint belongs to: the same --out,
        # settings and data with another model (of the same shape) must not resume its run.
        run = {"teacher": source.source.get("sha256"), "prune": asdict(settings)}
        record["recovery"] = distill(
            student, teacher, tokenizer, data, source.task, recovery, checkpoints, progress, layer_map, run
        )
        measured["recovered"] = measure(student, teacher, tokenizer, source.task, eval_examples[0], list(source.labels))
        progress(f"after recovery: {_line(measured['recovered'], source.task)}")
    record["measured"] = measured
    final = measured.get("recovered", measured["pruned"])
    record["final"] = {key: final[key], **({"recall_at_1": final["recall_at_1"]} if key == "mean_cosine" else {})}
    with output_folder(out, "edge-slm prune") as staging:  # checks `out` again: it may have changed meanwhile
        student.model.save_pretrained(str(staging), safe_serialization=True)
        tokenizer.save_pretrained(str(staging))
        (staging / PRUNE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    remove_checkpoints(out)
    return record


def _line(measured: dict, task: str) -> str:
    if task == "classification":
        return (
            f"accuracy {100 * measured['accuracy']:.1f}% (unpruned {100 * measured['teacher_accuracy']:.1f}%), "
            f"labels agree with the unpruned model on {100 * measured['label_agreement']:.1f}%"
        )
    return (
        f"mean cosine to the unpruned model {measured['mean_cosine']:.4f} (min {measured['min_cosine']:.4f}), "
        f"recall@1 {100 * measured['recall_at_1']:.1f}% (unpruned {100 * measured['teacher_recall_at_1']:.1f}%)"
    )
