"""Deprecated: moved to `dreamlens.analysis.metrics`.
Old imports keep working: each public name resolves here with a DeprecationWarning naming its new module.
"""

from __future__ import annotations

from .lazy import moved

__getattr__ = moved("dreamlens.metrics", {
    "dataset_max": "dreamlens.analysis.metrics",
    "median_top_xe": "dreamlens.analysis.metrics",
    "activation_ratio": "dreamlens.analysis.metrics",
    "dataset_percentile": "dreamlens.analysis.metrics",
    "beats_dataset": "dreamlens.analysis.metrics",
    "dream_summary": "dreamlens.analysis.metrics",
})
