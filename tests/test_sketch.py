"""The quantile sketch against numpy's exact quantiles and percentiles, across merges."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dreamlens.analysis.sketch import QuantileSketch


def test_sketch_quantiles_match_numpy():
    g = np.random.default_rng(0)
    data = np.concatenate([
        g.normal(0, 3, 40_000), np.zeros(5_000), g.exponential(50, 20_000), -g.exponential(0.01, 5_000),
        np.full(100, 1e-9),
    ]).astype(np.float32)
    g.shuffle(data)
    a, b = QuantileSketch(2), QuantileSketch(2)
    for part in np.array_split(data, 7)[:4]:
        a.update(torch.from_numpy(np.stack([part, -part])))
    for part in np.array_split(data, 7)[4:]:
        b.update(torch.from_numpy(np.stack([part, -part])))
    a.merge(b)
    for q in (0.0, 0.001, 0.1, 0.5, 0.9, 0.99, 0.999, 1.0):
        got = a.quantile(q)
        for row, x in enumerate((data, -data)):
            exact = float(np.quantile(x.astype(np.float64), q, method="lower"))
            assert abs(got[row] - exact) <= 0.005 * abs(exact) + 1e-6, (q, row, got[row], exact)
    for v in (-1.0, 0.0, 0.5, 3.0, 80.0):
        assert a.percentile(0, v) == pytest.approx(100 * np.mean(data <= v), abs=0.2)  # 1e-9 values sit in the zero bucket
    assert a.percentile(0, 1e9) == 100.0 and a.percentile(0, -1e9) == 0.0
