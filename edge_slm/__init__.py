"""edge-slm: prune, quantize and export small language models into ONNX bundles for edge devices.

The build side (`edge_slm.builder.pipeline`) needs torch; the device side (`edge_slm.runtime`) needs only
onnxruntime, numpy and tokenizers. Run `edge-slm --help` for the commands.
"""

__version__ = "0.1.0"
