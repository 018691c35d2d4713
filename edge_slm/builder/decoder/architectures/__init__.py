"""The decoder families the fused graph knows, one module per layout (`base.Layout`).

Each module in this package that defines `MODEL_TYPES` ({model_type: the families it covers}),
`GENAI_MODEL_TYPES` ({model_type: onnxruntime-genai's model type}) and `layout(config) -> Layout`
is found here: adding an architecture adds a file.
"""

from __future__ import annotations

import importlib
import pkgutil

from edge_slm.builder.decoder.architectures.base import Layout


def _registry() -> tuple[dict, dict, dict]:
    builders, names, genai_types = {}, {}, {}
    # Llama first: the refusal message lists the families in this order.
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: (m.name != "llama", m.name)):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for model_type, families in getattr(module, "MODEL_TYPES", {}).items():
            builders[model_type], names[model_type] = module.layout, families
            genai_types[model_type] = getattr(module, "GENAI_MODEL_TYPES", {}).get(model_type, "llama")
    return builders, names, genai_types


_BUILDERS, FUSED_FAMILIES, _GENAI_TYPES = _registry()


def genai_model_type(model_type: str) -> str:
    """onnxruntime-genai's model type for a transformers model_type (its module's
    `GENAI_MODEL_TYPES`); "llama" for a family without a fused layout, whose graph has the same
    decoder-only signature."""
    return _GENAI_TYPES.get(model_type, "llama")


def layout_for(config) -> Layout | None:
    """The fused layout of `config`'s model_type, or None when the fused graph has none."""
    build = _BUILDERS.get(config.model_type)
    return build(config) if build else None
