"""Precision stages, ONNX in -> ONNX out: weight-only block quantization (`blockwise`), SmoothQuant
folding (`smooth`), TensorRT's static S8S8 QDQ (`qdq`) and fp16 (`fp16`)."""
