"""The build host's half (torch, transformers, onnx allowed): load a model, optionally prune it,
export it to ONNX, validate it against torch, quantize it for a target, gate its accuracy and
write the bundle. `pipeline.build` is the ordered list of these stages."""
