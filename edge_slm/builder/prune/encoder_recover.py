"""Recovery of a pruned encoder: distillation from the unpruned model on the task's own data, on CPU.

  classifier  KL divergence to the teacher's temperature-softened logits (Hinton et al.), plus
              cross-entropy on the true labels: the teacher says how the classes relate, the
              labels keep the student honest where the teacher is wrong
  embedder    1 - cosine to the teacher's sentence embedding, plus their mean squared error
              (the cosine alone leaves the length free when the model does not normalize)

The teacher's outputs are computed once and kept with the checkpoints, so a step costs one
student forward and backward pass. Progress is a line every few steps; a checkpoint every
`checkpoint_every` steps lets an interrupted run resume where it stopped (same settings, data and
student shape); a time budget stops it early, cleanly. Run by `prune.encoder.prune_encoder_directory`.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from edge_slm.core.atomic import atomic_file


@dataclass(frozen=True)
class EncoderRecoverySettings:
    steps: int = 400
    batch_size: int = 32
    learning_rate: float = 1e-4  # ten times fine-tuning's: the student starts near, not at, a solution
    temperature: float = 2.0  # classifier: softened logits carry the teacher's ranking of the other labels
    label_weight: float = 0.5  # classifier: the cross-entropy's share of the loss (the rest is the KL term)
    max_length: int = 128  # training inputs are truncated to this many tokens
    time_budget_s: float = 0.0  # 0: no limit; else stop after this many seconds of training
    checkpoint_every: int = 50
    seed: int = 0


def distillation_loss(student_out, teacher_out, labels, task: str, settings: EncoderRecoverySettings):
    import torch.nn.functional as F

    if task == "classification":
        t = settings.temperature
        kl = F.kl_div(
            F.log_softmax(student_out / t, dim=-1),
            F.log_softmax(teacher_out / t, dim=-1),
            log_target=True,
            reduction="batchmean",
        ) * (t * t)  # keeps the gradient's size independent of the temperature
        ce = F.cross_entropy(student_out, labels)
        return (1 - settings.label_weight) * kl + settings.label_weight * ce
    cosine = F.cosine_similarity(student_out, teacher_out, dim=-1)
    return (1 - cosine).mean() + F.mse_loss(student_out, teacher_out)


def distill(
    student,
    teacher,
    tokenizer,
    data,
    task: str,
    settings: EncoderRecoverySettings,
    checkpoint_dir: Path,
    progress=lambda msg: None,
) -> dict:
    """Distil `teacher` into `student` (both heads from `encoder.export.EncoderHead`) in place."""
    import torch

    from edge_slm.builder.prune.encoder import encode, token_limit

    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    shape = {
        k: v
        for k, v in student.model.config.to_dict().items()
        if k in ("num_hidden_layers", "intermediate_size", "pruned_heads")
    }
    key = hashlib.sha256(
        json.dumps([asdict(settings), shape, data.texts, data.labels], sort_keys=True, default=str).encode()
    ).hexdigest()[:16]
    targets_path, state_path = checkpoint_dir / f"teacher-{key}.pt", checkpoint_dir / f"state-{key}.pt"
    if targets_path.is_file():
        targets = torch.load(targets_path)
        progress(f"the teacher's outputs from the checkpoint ({len(targets)} texts)")
    else:
        progress(f"the teacher's outputs on {len(data.texts)} texts")
        targets = encode(teacher, tokenizer, data.texts, max_length=settings.max_length)
        _atomic_save(targets, targets_path)
    labels = torch.tensor(data.labels) if data.labels is not None else None
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # short warm-up, then cosine to 10%
        optimizer,
        lambda s: min(1.0, (s + 1) / 20) * (0.55 + 0.45 * math.cos(math.pi * min(s, settings.steps) / settings.steps)),
    )
    step, losses = 0, []
    if state_path.is_file():
        state = torch.load(state_path, weights_only=False)
        student.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        step, losses = state["step"], state["losses"]
        progress(f"resuming recovery at step {step}/{settings.steps}")
    generator = torch.Generator().manual_seed(settings.seed + step)
    teacher.eval()
    # Dropout stays off: the targets are the teacher's deterministic outputs, and a few hundred
    # steps leave its regularisation no time to pay for the noise it adds.
    student.eval()
    started, first_step, stopped = time.monotonic(), step, "steps"
    while step < settings.steps:
        if settings.time_budget_s and time.monotonic() - started > settings.time_budget_s:
            stopped = "time budget"
            break
        rows = torch.randint(len(data.texts), (settings.batch_size,), generator=generator)
        inputs = tokenizer(
            [data.texts[i] for i in rows],
            padding=True,
            truncation=True,
            max_length=token_limit(student.model, settings.max_length),
            return_tensors="pt",
        )
        loss = distillation_loss(
            student(**inputs), targets[rows], labels[rows] if labels is not None else None, task, settings
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        step += 1
        losses.append(round(float(loss.detach()), 5))
        if step % 10 == 0 or step == settings.steps:
            elapsed = time.monotonic() - started
            left = elapsed / (step - first_step) * (settings.steps - step)
            progress(
                f"recovery step {step}/{settings.steps}  loss {sum(losses[-10:]) / len(losses[-10:]):.4f}  "
                f"{elapsed:.0f}s elapsed, about {left:.0f}s left"
            )
        if step % settings.checkpoint_every == 0 and step < settings.steps:
            _atomic_save(
                {
                    "model": student.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(),
                    "step": step,
                    "losses": losses,
                },
                state_path,
            )
    student.eval()
    return {
        "settings": asdict(settings),
        "steps_done": step,
        "stopped_by": stopped,
        "seconds": round(time.monotonic() - started, 1),
        "texts": len(data.texts),
        "loss_first": losses[0] if losses else None,
        "loss_last": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
    }


def _atomic_save(obj, path: Path) -> None:
    import torch

    with atomic_file(path) as tmp:
        torch.save(obj, tmp)
