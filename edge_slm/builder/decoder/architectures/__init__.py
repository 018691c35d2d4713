"""The decoder families the fused graph knows, one module per layout (`base.Layout`).

Each module in this package that defines `MODEL_TYPES` ({model_type: the families it covers}) and
`layout(config) -> Layout` is found here: adding an architecture adds a file.
"""

from __future__ import annotations

import importlib
import pkgutil

from edge_slm.builder.decoder.architectures.base import Layout


def _registry() -> tuple[dict, dict]:
    builders, names = {}, {}
    # Llama first: the refusal message lists the families in this order.
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: (m.name != "llama", m.name)):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for model_type, families in getattr(module, "MODEL_TYPES", {}).items():
            builders[model_type], names[model_type] = module.layout, families
    return builders, names


_BUILDERS, FUSED_FAMILIES = _registry()


def layout_for(config) -> Layout | None:
    """The fused layout of `config`'s model_type, or None when the fused graph has none."""
    build = _BUILDERS.get(config.model_type)
    return build(config) if build else None
