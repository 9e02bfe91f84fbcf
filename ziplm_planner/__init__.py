"""ziplm-planner: latency-aware structured compression of transformer language models.

After ZipLM (Kurtic, Frantar, Alistarh, NeurIPS 2023): profile the deployment machine,
remove the structures with the worst loss-to-runtime trade-off using second-order (OBS)
estimates and weight updates, and output a family of smaller models, one per speedup target.
"""

from __future__ import annotations

import importlib

# Public name -> the module that defines it. They are imported on first use (PEP 562), because
# torch and transformers take seconds to load and `ziplm-planner --help` needs neither.
_PUBLIC = {
    "AttentionLevel": "adapters",
    "CompressSettings": "settings",
    "FamilyReport": "family",
    "GeneratedText": "synthetic",
    "GenerationSettings": "settings",
    "InferenceSpec": "spec",
    "LatencyTable": "table",
    "LoadedModel": "models",
    "LossWeights": "settings",
    "ProfileSettings": "settings",
    "RecoverySettings": "settings",
    "TrainSettings": "settings",
    "compress": "api",
    "evaluate_family": "api",
    "export_gguf": "api",
    "generate_text": "api",
    "load_model": "models",
    "load_pruned": "export",
    "load_pruned_tokenizer": "export",
    "ort_generate": "export",
    "plot_families": "api",
    "profile": "api",
    "verify_family": "api",
}

__all__ = sorted(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value  # later lookups find it without coming here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
