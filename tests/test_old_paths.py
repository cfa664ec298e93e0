"""The modules moved by the reorganization still import from their old paths, with a DeprecationWarning
that names the new module, and give the very same objects; private and unknown names are not forwarded."""

from __future__ import annotations

import importlib

import pytest

MOVED = [
    # old module, public name, new module
    ("dreamlens.dataset", "scan", "dreamlens.analysis.scan"),
    ("dreamlens.dataset", "ScanResult", "dreamlens.analysis.scan"),
    ("dreamlens.dataset", "STAT_QUANTILES", "dreamlens.analysis.scan"),
    ("dreamlens.dataset", "position_values", "dreamlens.analysis.scan"),
    ("dreamlens.dataset", "score_windows", "dreamlens.analysis.scan"),
    ("dreamlens.dataset", "QuantileSketch", "dreamlens.analysis.sketch"),
    ("dreamlens.dataset", "ScanError", "dreamlens.analysis.errors"),
    ("dreamlens.dataset", "ScanCacheError", "dreamlens.analysis.errors"),
    ("dreamlens.dataset", "corpus_fingerprint", "dreamlens.analysis.scan_cache"),
    ("dreamlens.dataset", "compare", "dreamlens.analysis.compare"),
    ("dreamlens.dataset", "Comparison", "dreamlens.analysis.compare"),
    ("dreamlens.metrics", "dataset_max", "dreamlens.analysis.metrics"),
    ("dreamlens.metrics", "dream_summary", "dreamlens.analysis.metrics"),
    ("dreamlens.attribution", "attribute", "dreamlens.analysis.attribution"),
    ("dreamlens.attribution", "Attribution", "dreamlens.analysis.attribution"),
    ("dreamlens.attribution", "js_literal", "dreamlens.analysis.attribution"),
    ("dreamlens.report", "build_report", "dreamlens.viz.report"),
    ("dreamlens.report", "write_report", "dreamlens.viz.report"),
    ("dreamlens.report", "load_result", "dreamlens.viz.report"),
]


@pytest.mark.parametrize(("old", "name", "new"), MOVED, ids=[f"{o}.{n}" for o, n, _ in MOVED])
def test_old_path_warns_and_gives_the_new_object(old, name, new):
    module = importlib.import_module(old)
    with pytest.warns(DeprecationWarning, match=rf"^{old}.{name} is deprecated; use {new}.{name}$"):
        got = getattr(module, name)
    assert got is getattr(importlib.import_module(new), name)


def test_from_import_of_an_old_path():
    with pytest.warns(DeprecationWarning, match="dreamlens.dataset.ScanResult is deprecated; use dreamlens.analysis.scan.ScanResult"):
        from dreamlens.dataset import ScanResult
    from dreamlens.analysis.scan import ScanResult as new

    assert ScanResult is new


@pytest.mark.parametrize("old", ["dreamlens.dataset", "dreamlens.metrics", "dreamlens.attribution", "dreamlens.report"])
def test_private_and_unknown_names_are_not_forwarded(old):
    module = importlib.import_module(old)
    for name in ("_scan", "_banned", "_digest", "no_such_name"):
        with pytest.raises(AttributeError, match=name):
            getattr(module, name)


def test_viz_keeps_its_names():
    from dreamlens import viz

    for name in ("plot_frontier", "plot_evolution", "plot_thresholds", "frontier_at", "best_under_thresholds",
                 "save_plots", "save_png", "to_png", "DreamFigure"):
        assert callable(getattr(viz, name))
    assert viz.write_report is importlib.import_module("dreamlens.viz.report").write_report
