"""The texts that ship with edge-slm, from one place: the evaluation text (accuracy gates,
`edge-slm bench`'s prompts and perplexity) and the calibration text (smoothing, static int8,
pruning scores). Neither is read at import time."""

from __future__ import annotations

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
EVAL_TEXT = DATA_DIR / "eval.txt"
CALIBRATION_TEXT = DATA_DIR / "calibration.txt"
# English sentences and their German translations, tab-separated: the translation gate's text.
PARALLEL_EN_DE = DATA_DIR / "parallel-en-de.txt"
# General English on everyday topics, written by the default decoder (benchmarks/write_embedder_texts.py):
# inputs for distilling a pruned sentence embedder beyond the shipped commands and manuals.
GENERAL_TEXT = DATA_DIR / "general-texts.txt"
