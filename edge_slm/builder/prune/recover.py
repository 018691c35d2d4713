"""Recovery after structured pruning: a short knowledge-distillation fine-tune on CPU, with the
unpruned model as teacher. Model in, model out.

No dataset can be downloaded, so the student learns from the teacher's own distribution on two
kinds of text: the shipped calibration text (or `--calibration FILE`) and text the teacher writes
itself from varied prompts (sampled, so it covers more than the calibration topics). The loss
is the KL divergence from the teacher's next-token distribution at every position. The
embedding (tied to the LM head) stays frozen: it is a fifth of the parameters and pruning did
not touch it. Progress is a line per few steps on stderr; a checkpoint every `checkpoint_every`
steps lets an interrupted run resume where it stopped; a time budget stops it early, cleanly.
Run by `edge-slm prune --recover-steps N` and by `edge-slm build` for profiles with [prune].
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from edge_slm.builder.prune.checkpoints import load_checkpoint
from edge_slm.core.atomic import atomic_file

PROMPTS = (  # varied openings for the teacher to continue: prose, instructions, dialogue, facts
    "The history of the printing press",
    "How to make a simple vegetable soup:",
    "Dear Sam, thank you for",
    "In computer science, a hash table is",
    "The old fisherman looked at the sky and",
    "Photosynthesis is the process",
    "Here are five tips for better sleep:",
    "The city council met on Tuesday to discuss",
    "Once upon a time, in a village",
    "The main causes of the French Revolution were",
    "To install the software, first",
    "My favourite season is autumn because",
    "Question: Why is the sky blue?\nAnswer:",
    "The recipe calls for two cups of flour,",
    "Volcanoes form when",
    "A good manager listens to",
    "The train was late again, and",
    "Water boils at 100 degrees Celsius",
    "In 1969,",
    "The best way to learn a new language is",
    "Electric cars differ from petrol cars in",
    "She opened the letter and read:",
    "The human heart has four chambers:",
    "Chapter 1\n\nThe house at the end of the lane",
    "Summary of the meeting:",
)


@dataclass(frozen=True)
class RecoverySettings:
    steps: int = 200
    sequence_length: int = 128
    batch_size: int = 4
    learning_rate: float = 1e-4
    generated_sequences: int = 96  # teacher-written samples of `sequence_length` tokens (48 overfitted in 110 steps)
    time_budget_s: float = 0.0  # 0: no limit; else stop after this many seconds of training
    checkpoint_every: int = 25
    seed: int = 0


def distillation_data(teacher, tokenizer, calibration_text: str, settings: RecoverySettings, progress) -> list:
    """[n, sequence_length] token windows: calibration text plus teacher-generated text."""
    import torch

    torch.manual_seed(settings.seed)
    windows = []
    ids = tokenizer(calibration_text).input_ids
    length = settings.sequence_length
    windows += [ids[i : i + length] for i in range(0, len(ids) - length + 1, length // 2)]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(settings.generated_sequences)]
    started = time.monotonic()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        for start in range(0, len(prompts), 8):
            encoded = [tokenizer(p).input_ids for p in prompts[start : start + 8]]
            width = max(len(e) for e in encoded)  # left-padded, so every row continues at the same step
            input_ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
            mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
            out = teacher.generate(
                input_ids=input_ids,
                attention_mask=mask,
                do_sample=True,
                temperature=1.0,
                top_p=0.95,
                max_new_tokens=length,
                min_new_tokens=length,
                pad_token_id=pad,
            )
            for row, e in zip(out, encoded):
                windows.append(row[width - len(e) :].tolist()[:length])
            progress(
                f"teacher wrote {min(start + 8, len(prompts))}/{len(prompts)} samples "
                f"({time.monotonic() - started:.0f}s)"
            )
    return [w for w in windows if len(w) == length]


def recover(
    student,
    teacher,
    tokenizer,
    calibration_text: str,
    settings: RecoverySettings,
    checkpoint_dir: Path,
    progress=lambda msg: None,
    data_dir: Path | None = None,
    teacher_id: str = "",
    run: dict | None = None,
) -> dict:
    """Distil `teacher` into `student` in place; resumes from `checkpoint_dir` when it holds a
    checkpoint of the same run: the same settings, teacher, calibration text, student shape and
    `run` (the pruning that made the student). Returns steps done, time taken and the loss curve."""
    import torch

    torch.manual_seed(settings.seed)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    shape = {k: v for k, v in student.config.to_dict().items() if k in ("num_hidden_layers", "intermediate_size")}
    calibration_id = hashlib.sha256(calibration_text.encode()).hexdigest()
    key = hashlib.sha256(
        json.dumps([asdict(settings), teacher_id, calibration_id, shape, run], sort_keys=True, default=str).encode()
    ).hexdigest()[:16]
    # The teacher's data depends only on the teacher, the text and these settings: shared by every
    # pruning setting of one model (`data_dir`), it is written once.
    data_key = hashlib.sha256(
        json.dumps(
            [teacher_id, calibration_text, settings.sequence_length, settings.generated_sequences, settings.seed]
        ).encode()
    ).hexdigest()[:16]
    (data_dir or checkpoint_dir).mkdir(parents=True, exist_ok=True)
    data_path = (data_dir or checkpoint_dir) / f"distill-{data_key}.pt"
    state_path = checkpoint_dir / f"state-{key}.pt"
    data = load_checkpoint(data_path, progress)
    if data is not None:
        windows, targets = data["windows"], data["targets"]
        progress(f"distillation data from the checkpoint ({len(windows)} windows)")
    else:
        windows = torch.tensor(distillation_data(teacher, tokenizer, calibration_text, settings, progress))
        # The teacher's final hidden states, once: its logits are these times the (frozen, shared)
        # embedding, so no step pays for a teacher forward pass.
        with torch.no_grad():
            targets = torch.cat(
                [teacher.model(windows[i : i + 8]).last_hidden_state for i in range(0, len(windows), 8)]
            )
        _atomic_save({"windows": windows, "targets": targets}, data_path)
    for p in list(student.model.embed_tokens.parameters()) + list(student.lm_head.parameters()):
        p.requires_grad_(False)
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # short warm-up, then cosine to 10%
        optimizer, lambda s: min(1.0, (s + 1) / 10) * (0.55 + 0.45 * math.cos(math.pi * s / settings.steps))
    )
    step, losses = 0, []
    state = load_checkpoint(state_path, progress)  # tensors and numbers: no pickled code runs
    if state is not None:
        student.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        step, losses = state["step"], state["losses"]
        progress(f"resuming recovery at step {step}/{settings.steps}")
    generator = torch.Generator().manual_seed(settings.seed + step)
    teacher.eval()
    student.train()
    started, first_step = time.monotonic(), step
    stopped = "steps"
    while step < settings.steps:
        if settings.time_budget_s and time.monotonic() - started > settings.time_budget_s:
            stopped = "time budget"
            break
        rows = torch.randint(len(windows), (settings.batch_size,), generator=generator)
        head = student.lm_head.weight  # the frozen tied embedding (a copy when untied: frozen too)
        with torch.no_grad():
            target = torch.log_softmax(targets[rows] @ teacher.lm_head.weight.T, dim=-1)
        logits = student.model(windows[rows]).last_hidden_state @ head.T
        loss = (
            torch.nn.functional.kl_div(
                torch.log_softmax(logits, dim=-1), target, log_target=True, reduction="batchmean"
            )
            / logits.shape[1]
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        step += 1
        losses.append(round(float(loss.detach()), 5))
        elapsed = time.monotonic() - started
        if step % 5 == 0 or step == settings.steps:
            per_step = elapsed / (step - first_step)
            progress(
                f"recovery step {step}/{settings.steps}  KL {sum(losses[-5:]) / len(losses[-5:]):.4f}  "
                f"{elapsed:.0f}s elapsed, about {per_step * (settings.steps - step):.0f}s left"
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
    for p in student.parameters():
        p.requires_grad_(True)
    return {
        "settings": asdict(settings),
        "steps_done": step,
        "stopped_by": stopped,
        "seconds": round(time.monotonic() - started, 1),
        "windows": len(windows),
        "kl_first": losses[0] if losses else None,
        "kl_last": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
    }


def _atomic_save(obj, path: Path) -> None:
    import torch

    with atomic_file(path) as tmp:
        torch.save(obj, tmp)
