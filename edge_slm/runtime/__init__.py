"""The on-device runtime: load a bundle and generate text with onnxruntime, numpy and tokenizers.

Never imports torch, transformers or onnx, nor the build or harness halves of edge-slm (tests
prove both). Used by `edge-slm generate | chat | eval` and from Python:

    from edge_slm import runtime
    model = runtime.load("export/rpi5")
    print(model.generate("What is the capital of France?", chat=True).text)
    for response in model.stream("Write a haiku about the sea.", chat=True):
        print(response.text, end="", flush=True)
    call = model.generate("It's too dark in the kitchen", chat=True, schema=runtime.tool_call_schema(tools))

    classifier = runtime.load("export/x86-laptop-classifier")
    print(classifier.classify(["turn off the kitchen lights"])[0].label)

    runtime.build_index("manuals/", "export/x86-laptop-embedder", "manuals.index")
    print(runtime.ask("manuals.index", "How many user codes can the lock store?").answer)
"""

import importlib

# Names resolved on first use (PEP 562), so that the benchmark worker (`edge_slm.runtime.bench:measure`)
# can measure what importing onnxruntime, numpy and tokenizers costs, and `edge-slm --help` stays quick.
_EXPORTS = {
    "load": "edge_slm.runtime.model",
    "Model": "edge_slm.runtime.model",
    "Generation": "edge_slm.runtime.model",
    "GenerationResponse": "edge_slm.runtime.model",
    "Encoder": "edge_slm.runtime.encoder",
    "Classification": "edge_slm.runtime.encoder",
    "SamplingConfig": "edge_slm.runtime.sampling",
    "Constraint": "edge_slm.runtime.grammar",
    "GrammarError": "edge_slm.runtime.grammar",
    "compile_constraint": "edge_slm.runtime.grammar",
    "tool_call_schema": "edge_slm.runtime.grammar",
    "ContextFullError": "edge_slm.runtime.session",
    "peak_rss_mb": "edge_slm.core.system",
    # Questions answered from documents (`edge-slm index`, `edge-slm ask`). The module is `qa`, not
    # `ask`: importing a submodule named `ask` would replace the `runtime.ask` function with it.
    "ask": "edge_slm.runtime.qa",
    "open_index": "edge_slm.runtime.qa",
    "DocumentQA": "edge_slm.runtime.qa",
    "Answer": "edge_slm.runtime.qa",
    "Source": "edge_slm.runtime.qa",
    "build_index": "edge_slm.runtime.index",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'edge_slm.runtime' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
