"""dreamlens: dream fluent prompts that maximally activate a feature of a TransformerLens model.

Names are imported lazily, so `import dreamlens` does no work and loads no model.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "load_model": "models",
    "bos_token_id": "models",
    "set_bos_token_id": "models",
    "ModelLoadError": "models",
    "encode": "models",
    "decode": "models",
    "load_sae": "sae",
    "objective": "objectives",
    "Objective": "objectives",
    "Neuron": "objectives",
    "SAELatent": "objectives",
    "Direction": "objectives",
    "Logit": "objectives",
    "LogitDiff": "objectives",
    "Combination": "objectives",
    "ObjectiveError": "objectives",
    "run_objectives": "objectives",
    "scan": "dataset",
    "ScanResult": "dataset",
    "compare": "dataset",
    "epo": "optim.epo",
    "EPOConfig": "optim.epo",
    "adapt": "optim.adapt",
    "ADAPTConfig": "optim.adapt",
    "gcg": "optim.gcg",
    "GCGConfig": "optim.gcg",
    "dream": "optim.dream",
    "DreamResult": "results",
    "DreamError": "optim.core",
    "DreamlensError": "errors",
    "attribute": "attribution",
    "attribute_frontier": "attribution",
    "Attribution": "attribution",
    "plot_frontier": "viz",
    "plot_evolution": "viz",
    "plot_thresholds": "viz",
    "build_report": "report",
    "write_report": "report",
}
_SUBMODULES = {"errors", "attribution", "viz", "report", "dataset", "metrics", "models", "corpus", "objectives", "results", "optim", "sae"}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'dreamlens' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*_EXPORTS, *_SUBMODULES, "__version__"])


__all__ = list(_EXPORTS)
