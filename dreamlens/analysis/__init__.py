"""Reading a model against data: corpus scans, dreams compared with dataset examples, dataset metrics,
token attribution. Names load lazily; the functions `scan` and `compare` live in the submodules of those names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import exports

# public name -> submodule that defines it. `scan` and `compare` are not here: `dreamlens.analysis.scan`
# and `dreamlens.analysis.compare` are the submodules (use `dreamlens.scan`, `dreamlens.analysis.scan.scan`).
_EXPORTS: dict[str, str] = {
    "ScanError": "errors",
    "ScanLookupError": "errors",
    "ScanCacheError": "errors",
    "CompareError": "errors",
    "QuantileSketch": "sketch",
    "STAT_QUANTILES": "scan",
    "ScanResult": "scan",
    "ScanConfig": "scan_config",
    "SWEEP_SCAN": "scan_config",
    "per_position": "scan",
    "position_values": "scan",
    "score_windows": "scan",
    "example_spans": "scan",
    "activation_patterns": "patterns",
    "readouts": "patterns",
    "pattern_similarity": "patterns",
    "nearest_examples": "patterns",
    "merge_scans": "merge",
    "model_fingerprint": "scan_cache",
    "objective_fingerprint": "scan_cache",
    "corpus_fingerprint": "scan_cache",
    "cache_key": "scan_cache",
    "cache_folder": "scan_cache",
    "Comparison": "compare",
    "dataset_max": "metrics",
    "median_top_xe": "metrics",
    "activation_ratio": "metrics",
    "dataset_percentile": "metrics",
    "beats_dataset": "metrics",
    "dream_summary": "metrics",
    "Attribution": "attribution",
    "AttributionError": "errors",
    "attribute": "attribution",
    "attribute_many": "attribution",
    "attribute_frontier": "attribution",
}
_SUBMODULES = {"errors", "sketch", "scan", "scan_config", "scan_cache", "merge", "compare", "metrics", "attribution", "patterns"}

__all__ = [
    "ScanError",
    "ScanLookupError",
    "ScanCacheError",
    "CompareError",
    "QuantileSketch",
    "STAT_QUANTILES",
    "ScanResult",
    "ScanConfig",
    "SWEEP_SCAN",
    "per_position",
    "position_values",
    "score_windows",
    "example_spans",
    "activation_patterns",
    "readouts",
    "pattern_similarity",
    "nearest_examples",
    "merge_scans",
    "model_fingerprint",
    "objective_fingerprint",
    "corpus_fingerprint",
    "cache_key",
    "cache_folder",
    "Comparison",
    "dataset_max",
    "median_top_xe",
    "activation_ratio",
    "dataset_percentile",
    "beats_dataset",
    "dream_summary",
    "Attribution",
    "AttributionError",
    "attribute",
    "attribute_many",
    "attribute_frontier",
]

if TYPE_CHECKING:  # the same names for a type checker
    from .attribution import (
        Attribution,
        attribute,
        attribute_frontier,
        attribute_many,
    )
    from .compare import Comparison
    from .errors import AttributionError, CompareError, ScanCacheError, ScanError, ScanLookupError
    from .merge import merge_scans
    from .metrics import activation_ratio, beats_dataset, dataset_max, dataset_percentile, dream_summary, median_top_xe
    from .patterns import activation_patterns, nearest_examples, pattern_similarity, readouts
    from .scan import STAT_QUANTILES, ScanResult, example_spans, per_position, position_values, score_windows
    from .scan_cache import cache_folder, cache_key, corpus_fingerprint, model_fingerprint, objective_fingerprint
    from .scan_config import SWEEP_SCAN, ScanConfig
    from .sketch import QuantileSketch


__getattr__ = exports(__name__, _EXPORTS, _SUBMODULES)


def __dir__() -> list[str]:
    return sorted([*_EXPORTS, *_SUBMODULES])

