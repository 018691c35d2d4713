"""The decoder family's build (host half): load a GGUF or HF model, export the fused graph,
validate it against torch, gate the quantized graph, and write the bundle."""
