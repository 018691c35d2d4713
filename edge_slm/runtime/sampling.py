"""Next-token choice from logits in numpy: greedy, temperature, top-k, top-p, repetition penalty,
and a grammar's mask of allowed tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means no limit
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def check(self) -> None:
        from edge_slm.core.errors import EdgeSlmError

        for name, value in (
            ("temperature", self.temperature),
            ("top-p", self.top_p),
            ("repetition-penalty", self.repetition_penalty),
        ):
            if not math.isfinite(value):
                raise EdgeSlmError(f"--{name} is {value}; give a finite number")
        if self.seed is not None and self.seed < 0:
            raise EdgeSlmError(f"--seed is {self.seed}; use 0 or a positive integer")
        if self.temperature < 0:
            raise EdgeSlmError(f"--temperature is {self.temperature}; use 0 (greedy) or a positive value")
        if self.top_k < 0:
            raise EdgeSlmError(f"--top-k is {self.top_k}; use 0 (no limit) or a positive count")
        if not 0 < self.top_p <= 1:
            raise EdgeSlmError(f"--top-p is {self.top_p}; it must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise EdgeSlmError(f"--repetition-penalty is {self.repetition_penalty}; it must be positive")


class Sampler:
    def __init__(self, config: SamplingConfig):
        config.check()
        self.config = config
        self.rng = np.random.default_rng(config.seed)

    def __call__(self, logits: np.ndarray, history: list[int], allowed: np.ndarray | None = None) -> int:
        """The next token; with `allowed` (a boolean mask over the vocabulary, from a grammar) only
        among the allowed tokens: the others are set to -inf before the penalty, temperature, top-k
        and top-p, so greedy is the argmax of the masked logits and sampling renormalises over them."""
        cfg = self.config
        if allowed is not None:
            logits = np.where(allowed, logits[: allowed.shape[0]], np.float32(-np.inf))
        if cfg.repetition_penalty != 1.0 and history:
            logits = logits.copy()
            seen = np.unique(np.asarray(history, dtype=np.int64))
            values = logits[seen]
            # CTRL-style penalty, as transformers applies it: shrink positive logits, grow negative ones.
            logits[seen] = np.where(values > 0, values / cfg.repetition_penalty, values * cfg.repetition_penalty)
        if cfg.temperature == 0:
            return int(np.argmax(logits))
        scaled = logits.astype(np.float64) / cfg.temperature
        if 0 < cfg.top_k < scaled.shape[0]:
            kth = np.partition(scaled, -cfg.top_k)[-cfg.top_k]
            scaled = np.where(scaled < kth, -np.inf, scaled)
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        if cfg.top_p < 1.0:
            order = np.argsort(-probs)
            cumulative = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cumulative, cfg.top_p)) + 1]
            mask = np.zeros_like(probs)
            mask[keep] = probs[keep]
            probs = mask / mask.sum()
        return int(self.rng.choice(probs.shape[0], p=probs))


def token_logprob(logits: np.ndarray, token: int) -> float:
    """log softmax(logits)[token] over the raw logits: the model's own probability of the token,
    before the repetition penalty, temperature, top-k and top-p (what OpenAI's `logprobs` report).
    In float32: 0.05 ms a token for a 49k vocabulary (float64 takes 0.45 ms, about 4% of a decode
    step) and within 1e-5 of it, numpy's pairwise summation keeping the sum's error small."""
    row = np.asarray(logits, dtype=np.float32)
    top = row.max()
    return float(row[token] - top - np.log(np.exp(row - top).sum()))
