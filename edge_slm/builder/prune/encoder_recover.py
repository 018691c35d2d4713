"""Recovery of a pruned encoder: distillation from the unpruned model on the task's own data, on CPU.

  classifier  KL divergence to the teacher's temperature-softened logits (Hinton et al.), plus
              cross-entropy on the true labels: the teacher says how the classes relate, the
              labels keep the student honest where the teacher is wrong
  embedder    1 - cosine to the teacher's sentence embedding, plus their mean squared error
              (the cosine alone leaves the length free when the model does not normalize),
              plus the hidden states of every layer and the token embeddings before pooling
              matched to the teacher's (TinyBERT's intermediate-layer distillation: a squared
              error relative to the teacher's, each student layer against the teacher layer it
              was cut from). The pooled vector alone is a weak signal: one 384-number target per
              text for a 6-layer student; the per-token states give every layer its own.

With `int8_share`, the end of the run distils through simulated dynamic int8
(`int8_simulation.simulated_int8`): the student's weights move to where the int8 bundle's rounding
costs least, the teacher stays float.

The teacher's pooled outputs are computed once and kept with the checkpoints; with hidden-state
matching a step also runs the teacher forward (no gradients) on the batch. Progress is a line every few steps; a checkpoint every
`checkpoint_every` steps lets an interrupted run resume where it stopped (same settings, data and
student shape); a time budget stops it early, cleanly. Run by `prune.encoder.prune_encoder_directory`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from edge_slm.builder.prune.checkpoints import load_checkpoint
from edge_slm.builder.prune.int8_simulation import simulated_int8
from edge_slm.core.atomic import atomic_file

# What distillation does beyond its settings (how inputs vary, how int8 is simulated): part of
# every cache and checkpoint key, and raised when that changes, so that a run made by other code
# is not taken for this one's.
RECOVERY_RECIPE = 4

# The simulated int8 rounds weights to 7 bits, as the CPU profiles' [encoder] reduce_range builds
# them: one cached run serves every target, so it follows the int8 bundles whatever the target.
SIMULATED_REDUCE_RANGE = True


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
    hidden_weight: float = 1.0  # embedder: weight of the per-layer hidden-state term (0: pooled vectors only)
    freeze_embeddings: bool = True  # embedder: the token embeddings stay the teacher's (see distill)
    bf16: bool | None = None  # bfloat16 autocast for the forward passes; None: where the CPU has bf16 arithmetic
    int8_share: float = 0.0  # the last share of the run (steps or time) distils through simulated dynamic int8


def native_bf16() -> bool:
    """Whether the CPU multiplies bfloat16 in hardware (x86 AVX512_BF16 or AMX, ARM's BF16 extension):
    there, autocast makes a distillation step 1.5-1.9x quicker (measured 0.40 s against 0.60-0.78 s
    for a batch of 32 on a 2-core AVX512_BF16 host) and a time-budgeted recovery gets that many more steps;
    elsewhere bfloat16 is emulated and slower than float32."""
    from edge_slm.core.system import cpu_flags

    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})


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


def hidden_state_loss(student_states, teacher_states, attention_mask, layer_map: list[int]):
    """Squared error of each student layer's token states (and of the embedding layer's) against
    the teacher layer it came from, relative to the teacher's squared size, over real tokens only;
    the mean over layers. Relative: BERT's layers differ in scale, and an absolute error would let
    the largest one dominate."""
    mask = attention_mask.unsqueeze(-1).to(student_states[0].dtype)
    pairs = [(student_states[0], teacher_states[0])] + [
        (student_states[i + 1], teacher_states[t + 1]) for i, t in enumerate(layer_map)
    ]
    losses = [(((s - t) ** 2) * mask).sum() / ((t**2) * mask).sum().clamp(min=1e-9) for s, t in pairs]
    return sum(losses) / len(losses)


def teacher_layers(student_layers: int, teacher_layers: int, removed: list[int] | None = None) -> list[int]:
    """For each student layer, the teacher layer it was cut from: the ones not `removed`, else
    (unknown) evenly spread over the teacher's depth, as TinyBERT maps a shallower student."""
    if removed is not None:
        return [i for i in range(teacher_layers) if i not in set(removed)]
    if student_layers == teacher_layers:
        return list(range(teacher_layers))
    return [round((i + 1) * teacher_layers / student_layers) - 1 for i in range(student_layers)]


class _HiddenStates:
    """The hidden states of a head's transformers model, caught on its way out: the heads return
    one tensor, and the model returns its per-layer states only when its config asks for them."""

    def __init__(self, head):
        self.config, self.states = head.model.config, None
        self.was = self.config.output_hidden_states
        self.config.output_hidden_states = True
        self.hook = head.model.register_forward_hook(self._catch)

    def _catch(self, module, args, output):
        self.states = output.hidden_states

    def close(self) -> None:
        self.hook.remove()
        self.config.output_hidden_states = self.was


def distill(
    student,
    teacher,
    tokenizer,
    data,
    task: str,
    settings: EncoderRecoverySettings,
    checkpoint_dir: Path,
    progress=lambda msg: None,
    layer_map: list[int] | None = None,
    run: dict | None = None,
) -> dict:
    """Distil `teacher` into `student` (both heads from `encoder.export.EncoderHead`) in place.
    `layer_map`: the teacher layer each student layer was cut from (hidden-state matching);
    `run`: what else a checkpoint must match to be resumed (the teacher's hash, the pruning)."""
    import torch

    from edge_slm.builder.prune.encoder import encode, token_limit

    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    shape = {
        k: v
        for k, v in student.model.config.to_dict().items()
        if k in ("num_hidden_layers", "intermediate_size", "pruned_heads")
    }
    key = hashlib.sha256(
        json.dumps(
            [asdict(settings), shape, data.texts, data.labels, run, RECOVERY_RECIPE], sort_keys=True, default=str
        ).encode()
    ).hexdigest()[:16]
    targets_path, state_path = checkpoint_dir / f"teacher-{key}.pt", checkpoint_dir / f"state-{key}.pt"
    # An embedder matching hidden states runs the teacher on every batch anyway: its targets are
    # taken live, which lets the batch's texts vary (`_varied`) beyond the fixed list.
    live = task != "classification" and settings.hidden_weight > 0
    targets = None if live else load_checkpoint(targets_path, progress)
    if targets is not None:
        progress(f"the teacher's outputs from the checkpoint ({len(targets)} texts)")
    elif not live:
        progress(f"the teacher's outputs on {len(data.texts)} texts")
        targets = encode(teacher, tokenizer, data.texts, max_length=settings.max_length)
        _atomic_save(targets, targets_path)
    labels = torch.tensor(data.labels) if data.labels is not None else None
    if task != "classification" and settings.freeze_embeddings:
        # A few thousand texts touch a fraction of the 30k-token vocabulary: trained, their rows
        # would drift from the untouched ones, which held-out texts then mix with.
        for parameter in student.model.base_model.embeddings.parameters():
            parameter.requires_grad_(False)
    trainable = [p for p in student.parameters() if p.requires_grad]
    # torch's fused CPU kernel: one pass over the weights instead of a dozen (measured 10 ms a step
    # against 114 ms for the pruned MiniLM's 6.5M trainable parameters on a 2-core AVX2 host).
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=0.01, fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # short warm-up, then cosine to 10%
        optimizer,
        lambda s: min(1.0, (s + 1) / 20) * (0.55 + 0.45 * math.cos(math.pi * min(s, settings.steps) / settings.steps)),
    )
    # An embedder's schedule also follows the clock: when the time budget ends the run before
    # `steps`, the learning rate has still decayed (a run cut at full rate ends on a noisy model).
    by_time = task != "classification" and settings.time_budget_s > 0
    step, losses, seconds_before, int8_from = 0, [], 0.0, None
    state = load_checkpoint(state_path, progress)
    if state is not None:
        student.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        step, losses = state["step"], state["losses"]
        # The clock goes on from where it stopped: the time budget, the learning rate that follows
        # it and the switch to simulated int8 are the run's, not this call's.
        seconds_before, int8_from = state.get("seconds", 0.0), state.get("int8_from")
        progress(f"resuming recovery at step {step}/{settings.steps}")
    generator = torch.Generator().manual_seed(settings.seed + step)
    if live:
        batches = _varied_batches(data.texts, settings.batch_size, generator, random.Random(settings.seed + step))
    else:
        lengths = [len(t) for t in data.texts] if task != "classification" else None
        batches = _batches(len(data.texts), settings.batch_size, generator, lengths)
    teacher.eval()
    # Dropout stays off: the targets are the teacher's deterministic outputs, and a few hundred
    # steps leave its regularisation no time to pay for the noise it adds.
    student.eval()
    if live and layer_map is None:
        layer_map = teacher_layers(student.model.config.num_hidden_layers, teacher.model.config.num_hidden_layers)
    caught = (_HiddenStates(student), _HiddenStates(teacher)) if live else ()
    bf16 = native_bf16() if settings.bf16 is None else settings.bf16
    if bf16:
        progress("bfloat16 autocast (the CPU has bf16 arithmetic); master weights and the optimizer stay float32")
    started, stopped = time.monotonic() - seconds_before, "steps"
    rounding = contextlib.ExitStack()
    if int8_from is not None:
        rounding.enter_context(simulated_int8(student, reduce_range=SIMULATED_REDUCE_RANGE))
        progress(f"distilling through simulated int8 since step {int8_from}")
    try:
        while step < settings.steps:
            if settings.time_budget_s and time.monotonic() - started > settings.time_budget_s:
                stopped = "time budget"
                break
            if (
                int8_from is None
                and settings.int8_share > 0
                and _done(step, started, settings) >= 1 - settings.int8_share
            ):
                # The student learns the int8 bundle's rounding last: from the float optimum, a few
                # hundred steps move its weights to where rounding them costs least.
                count = rounding.enter_context(simulated_int8(student, reduce_range=SIMULATED_REDUCE_RANGE))
                int8_from = step
                progress(
                    f"from step {step}: distilling through simulated int8 ({count} linear layers, rounded as the bundle rounds its MatMuls)"
                )
            if live:
                rows, texts = None, next(batches)
            else:
                rows = next(batches)
                texts = [data.texts[i] for i in rows]
            inputs = tokenizer(
                texts,
                padding=True,
                truncation=True,
                max_length=token_limit(student.model, settings.max_length),
                return_tensors="pt",
            )
            if by_time:
                done = _done(step, started, settings)
                for group in optimizer.param_groups:
                    group["lr"] = (
                        settings.learning_rate
                        * min(1.0, (step + 1) / 20)
                        * (0.55 + 0.45 * math.cos(math.pi * min(done, 1.0)))
                    )
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                if live:
                    with torch.no_grad():
                        target = teacher(**inputs)
                else:
                    target = targets[rows]
                output = student(**inputs)
            # The losses in float32: a cosine near 1 and small relative errors are below bf16's resolution.
            loss = distillation_loss(
                output.float(), target.float(), labels[rows] if labels is not None else None, task, settings
            )
            if live:
                student_states = [h.float() for h in caught[0].states]
                teacher_states = [h.float() for h in caught[1].states]
                hidden = hidden_state_loss(student_states, teacher_states, inputs["attention_mask"], layer_map)
                loss = loss + settings.hidden_weight * hidden
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            losses.append(round(float(loss.detach()), 5))
            if step % 10 == 0 or step == settings.steps:
                elapsed = time.monotonic() - started
                left = elapsed / step * (settings.steps - step)  # elapsed counts the steps before a resume too
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
                        "seconds": time.monotonic() - started,
                        "int8_from": int8_from,
                    },
                    state_path,
                )
    finally:
        rounding.close()
        for c in caught:
            c.close()
    student.eval()
    return {
        "settings": asdict(settings),
        "steps_done": step,
        "stopped_by": stopped,
        "bf16": bf16,
        "int8_from_step": int8_from,
        "seconds": round(time.monotonic() - started, 1),
        "texts": len(data.texts),
        "loss_first": losses[0] if losses else None,
        "loss_last": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
    }


def _done(step: int, started: float, settings: EncoderRecoverySettings) -> float:
    """How far the run is, 0 to 1: by steps, or by the clock when its time budget ends it sooner."""
    done = step / settings.steps
    if settings.time_budget_s > 0:
        done = max(done, (time.monotonic() - started) / settings.time_budget_s)
    return min(done, 1.0)


def _varied(texts: list[str], pool: list[str], rng: random.Random) -> list[str]:
    """A quarter of the texts (of two words or more) cut to a random run of their words, half of
    those to at most three words (replies like "well done" are the inputs a student matched least
    well), the other half to any shorter run; a quarter joined with another text: inputs the fixed
    list does not have, so that a few thousand texts seen for many epochs do not become the only
    inputs the student matches the teacher on."""
    out = []
    for text in texts:
        words, draw = text.split(), rng.random()
        if draw < 0.25 and len(words) > 1:
            longest = min(3, len(words) - 1) if draw < 0.125 else len(words) - 1
            length = rng.randint(1, longest)
            first = rng.randint(0, len(words) - length)
            text = " ".join(words[first : first + length])
        elif draw < 0.5:
            text = f"{text} {rng.choice(pool)}"
        out.append(text)
    return out


def _varied_batches(texts: list[str], batch_size: int, generator, rng: random.Random, pool: int = 8):
    """Batches of varied texts (`_varied`), endlessly: `pool` batches' worth drawn at once, varied,
    then cut by length, so that a text joined with another does not widen a batch of short ones
    (varied after the cut, the joined texts made the mean batch 52 tokens wide against 28, and a
    step twice as slow)."""
    import torch

    while True:
        rows = torch.randint(len(texts), (batch_size * pool,), generator=generator)
        drawn = sorted(_varied([texts[i] for i in rows], texts, rng), key=len)
        for index in torch.randperm(pool, generator=generator):
            yield drawn[index * batch_size : (index + 1) * batch_size]


def _batches(count: int, batch_size: int, generator, lengths: list[int] | None = None, pool: int = 8):
    """Random batches of row indices, endlessly. With `lengths`, `pool` batches are drawn at once
    and cut by text length, so that a batch of short commands is not padded to the length of the
    one paragraph in it (a batch costs as much as its longest text; the embedder's texts run from
    three words to a paragraph)."""
    import torch

    while True:
        if lengths is None:
            yield torch.randint(count, (batch_size,), generator=generator)
            continue
        rows = torch.randint(count, (batch_size * pool,), generator=generator)
        rows = rows[torch.argsort(torch.tensor([lengths[i] for i in rows]), stable=True)]
        for index in torch.randperm(pool, generator=generator):
            yield rows[index * batch_size : (index + 1) * batch_size]


def _atomic_save(obj, path: Path) -> None:
    import torch

    with atomic_file(path) as tmp:
        torch.save(obj, tmp)
