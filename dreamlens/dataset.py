"""Deprecated: moved to `dreamlens.analysis` (scan, sketch, scan_cache, compare, errors).
Old imports keep working: each public name resolves here with a DeprecationWarning naming its new module.
"""

from __future__ import annotations

from .lazy import moved

__getattr__ = moved("dreamlens.dataset", {
    "ScanError": "dreamlens.analysis.errors",
    "ScanLookupError": "dreamlens.analysis.errors",
    "CompareError": "dreamlens.analysis.errors",
    "ScanCacheError": "dreamlens.analysis.errors",
    "STAT_QUANTILES": "dreamlens.analysis.scan",
    "QuantileSketch": "dreamlens.analysis.sketch",
    "per_position": "dreamlens.analysis.scan",
    "position_values": "dreamlens.analysis.scan",
    "score_windows": "dreamlens.analysis.scan",
    "ScanResult": "dreamlens.analysis.scan",
    "scan": "dreamlens.analysis.scan",
    "model_fingerprint": "dreamlens.analysis.scan_cache",
    "objective_fingerprint": "dreamlens.analysis.scan_cache",
    "corpus_fingerprint": "dreamlens.analysis.scan_cache",
    "Comparison": "dreamlens.analysis.compare",
    "compare": "dreamlens.analysis.compare",
})
