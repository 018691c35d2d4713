"""The build host's half (torch, transformers, onnx allowed): one sub-package per model family
(`decoder/`, `encoder/`), each with its load, export, validate and gate stages, and the stages they
share: `quantize/`, `prune/`, `runner` (the stage contract and its loop) and `manifest`.
`pipeline.build` hands a model to the family that claims it. The device half never imports this."""
