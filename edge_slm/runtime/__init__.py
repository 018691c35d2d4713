"""The on-device runtime: load a bundle and generate text with onnxruntime, numpy and tokenizers.

Never imports torch, transformers or onnx, nor the build or harness halves of edge-slm (tests
prove both). Used by `edge-slm generate | chat | eval` and from Python:

    from edge_slm import runtime
    model = runtime.load("export/rpi5")
    print(model.generate("What is the capital of France?", chat=True).text)

    classifier = runtime.load("export/x86-laptop-classifier")
    print(classifier.classify(["turn off the kitchen lights"])[0].label)
"""

from edge_slm.core.system import peak_rss_mb
from edge_slm.runtime.encoder import Classification, Encoder
from edge_slm.runtime.model import Generation, Model, load
from edge_slm.runtime.sampling import SamplingConfig
from edge_slm.runtime.session import ContextFullError

__all__ = [
    "load",
    "Model",
    "Encoder",
    "Classification",
    "Generation",
    "SamplingConfig",
    "ContextFullError",
    "peak_rss_mb",
]
