"""Pruning stages, HF model dir in -> HF model dir out: structured removal of layers, GQA groups and
FFN channels (`structured`), unstructured and 2:4 sparsity (`sparsify`), distillation from the
unpruned model (`recover`), and the calibration passes they share (`calibration`)."""
