"""Dataset-grounded metrics on a hand-made scan whose numbers are known."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from dreamlens.analysis import metrics
from dreamlens.analysis.scan import ScanResult
from dreamlens.analysis.sketch import QuantileSketch


@pytest.fixture
def scan_result():
    values = torch.arange(1000, dtype=torch.float32)[None] / 100  # 0.00 .. 9.99
    sketch = QuantileSketch(1)
    sketch.update(values)
    stats = pd.DataFrame({"objective": ["n[1]"], "max": [9.99], "mean": [4.995], "frac_active": [0.999]})
    examples = pd.DataFrame({
        "objective": [0, 0, 0], "rank": [0, 1, 2], "text": ["a", "b", "c"], "ids": [[1], [2], [3]],
        "activation": [10.0, 9.0, 8.0], "xe": [5.0, 3.0, 4.0], "scan_activation": [9.99, 9.9, 9.8],
        "doc": [0, 1, 2], "pos": [5, 6, 7],
    })
    return ScanResult(["n[1]"], stats, examples, sketch)


def test_dataset_max_and_median_xe(scan_result):
    # a re-scored example (10.0) can beat the scan's max (9.99): the larger is the dataset max
    assert metrics.dataset_max(scan_result) == 10.0
    assert metrics.dataset_max(scan_result, "n[1]") == 10.0
    assert metrics.median_top_xe(scan_result) == 4.0


def test_ratio_and_percentile(scan_result):
    assert metrics.activation_ratio(5.0, scan_result) == pytest.approx(0.5)
    np.testing.assert_allclose(metrics.activation_ratio(np.array([0.0, 20.0]), scan_result), [0.0, 2.0])
    assert metrics.dataset_percentile(4.995, scan_result) == pytest.approx(50.0, abs=0.6)
    assert metrics.dataset_percentile(100.0, scan_result) == 100.0
    assert metrics.dataset_percentile(-1.0, scan_result) == 0.0
    assert np.isnan(metrics.dataset_percentile(float("nan"), scan_result))


def test_beats_dataset(scan_result):
    assert metrics.beats_dataset(11.0, 4.0, scan_result)  # higher than the max, xe at the median
    assert not metrics.beats_dataset(11.0, 4.5, scan_result)  # less fluent than the median top example
    assert not metrics.beats_dataset(9.5, 2.0, scan_result)  # fluent but not above the max
    np.testing.assert_array_equal(metrics.beats_dataset([11.0, 9.0], [3.0, 3.0], scan_result), [True, False])


def test_dream_summary(scan_result):
    frontier = pd.DataFrame({"activation": [2.0, 6.0, 12.0], "xe": [2.0, 3.5, 6.0]})
    s = metrics.dream_summary(SimpleNamespace(frontier=frontier, objective="n[1]"), scan_result)
    assert s["dream_best"] == 12.0 and s["dream_best_ratio"] == pytest.approx(1.2)
    assert s["dream_best_percentile"] == 100.0
    assert s["dream_best_at_median_xe"] == 6.0 and s["dream_best_at_median_xe_ratio"] == pytest.approx(0.6)
    assert s["beats_dataset"] is False  # 12.0 beats the max only at xe 6.0, above the median 4.0


def test_non_positive_max_gives_nan_ratio(scan_result):
    scan_result.stats.loc[0, "max"] = -1.0
    scan_result.examples["activation"] = -2.0
    assert np.isnan(metrics.activation_ratio(1.0, scan_result))
