"""Dataset-grounded metrics, so features of different scales compare: activation as a share of the dataset
max, its percentile in the dataset, whether a dream beats it; each takes a `ScanResult` and an objective.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ..objectives import Objective
    from .scan import ScanResult

    ObjectiveKey = int | str | Objective


def dataset_max(scan: ScanResult, objective: ObjectiveKey = 0) -> float:
    """The highest activation seen in the dataset: the scan's max, or a top example's re-scored
    activation if that is higher (an example's window can give more context than the scan had)."""
    i = scan.index(objective)
    best = float(scan.stats["max"].iloc[i])
    top = scan.top(i)["activation"].to_numpy(dtype=float)
    top = top[np.isfinite(top)]
    return max(best, float(top.max())) if len(top) else best


def median_top_xe(scan: ScanResult, objective: ObjectiveKey = 0) -> float:
    """Median cross-entropy of the objective's top dataset examples (NaN if they were not scored)."""
    xe = scan.top(objective)["xe"].to_numpy(dtype=float)
    xe = xe[np.isfinite(xe)]
    return float(np.median(xe)) if len(xe) else math.nan


def activation_ratio(activation: Any, scan: ScanResult, objective: ObjectiveKey = 0) -> Any:
    """Activation divided by the dataset max (1.0 = as high as the best dataset example). NaN when the
    dataset max is not positive, where a ratio means nothing."""
    m = dataset_max(scan, objective)
    a = np.asarray(activation, dtype=float)
    out = a / m if m > 0 else np.full_like(a, math.nan)
    return float(out) if out.ndim == 0 else out


def dataset_percentile(activation: Any, scan: ScanResult, objective: ObjectiveKey = 0) -> Any:
    """Percent of dataset positions at or below the activation (0-100), from the scan's quantile
    sketch (values resolved to bfloat16, 0.4%)."""
    i = scan.index(objective)
    a = np.asarray(activation, dtype=float)
    out = np.array([scan.sketch.percentile(i, float(v)) if np.isfinite(v) else math.nan for v in a.ravel()]).reshape(a.shape)
    return float(out) if out.ndim == 0 else out


def beats_dataset(activation: Any, xe: Any, scan: ScanResult, objective: ObjectiveKey = 0) -> Any:
    """Whether a prompt beats the dataset: activation above the dataset max, at a cross-entropy no worse
    than the median top example's."""
    m, x_med = dataset_max(scan, objective), median_top_xe(scan, objective)
    a, x = np.asarray(activation, dtype=float), np.asarray(xe, dtype=float)
    out = (a > m) & (x <= x_med)
    return bool(out) if out.ndim == 0 else out


def dream_summary(dream: Any, scan: ScanResult, objective: ObjectiveKey = 0) -> dict[str, Any]:
    """The dataset-grounded metrics of a dream's frontier (`dream.frontier`: activation, xe): its best
    activation overall and at an xe no worse than the median top example's, each as a ratio and a
    percentile, and whether it beats the dataset."""
    f = dream.frontier
    a, x = f["activation"].to_numpy(dtype=float), f["xe"].to_numpy(dtype=float)
    m, x_med = dataset_max(scan, objective), median_top_xe(scan, objective)
    fluent = a[x <= x_med] if np.isfinite(x_med) else a[:0]
    best = float(a.max()) if len(a) else math.nan
    best_fluent = float(fluent.max()) if len(fluent) else math.nan
    return {
        "objective": scan.objectives[scan.index(objective)],
        "dataset_max": m,
        "median_top_xe": x_med,
        "dream_best": best,
        "dream_best_ratio": activation_ratio(best, scan, objective),
        "dream_best_percentile": dataset_percentile(best, scan, objective),
        "dream_best_at_median_xe": best_fluent,
        "dream_best_at_median_xe_ratio": activation_ratio(best_fluent, scan, objective),
        "beats_dataset": bool(np.any(beats_dataset(a, x, scan, objective))) if len(a) else False,
    }
