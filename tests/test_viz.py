"""Plots of a dream: figures (no pyplot), the data behind them, PNG output, bad input."""

import numpy as np
import pytest
from matplotlib.figure import Figure

from dreamlens import viz
from dreamlens.errors import DreamlensError
from dreamlens.results import DreamResult


def synthetic(n_iters: int = 12, per_iter: int = 8, seed: int = 0) -> DreamResult:
    rng = np.random.default_rng(seed)
    it = np.repeat(np.arange(n_iters), per_iter)
    n = len(it)
    xe = rng.uniform(2, 11, n)
    act = rng.normal(0, 1, n) + 0.2 * it + 0.3 * xe
    text = [f"dream {i} costs $5 <b>{'&' * (i % 3)}</b>\n" for i in range(n)]
    return DreamResult(
        objective="blocks.1.mlp.hook_post[3]", method="epo", config={"length": 4}, ids=rng.integers(300, 3000, (n, 4)),
        activation=act, xe=xe, iteration=it, text=text, iterations=n_iters - 1, bos_token_id=0, model_name="tiny-llama",
    )


@pytest.fixture(scope="module")
def result():
    return synthetic()


@pytest.mark.parametrize("plot", [viz.plot_frontier, viz.plot_evolution, viz.plot_thresholds])
def test_plots_are_figures_that_jupyter_shows_as_png(result, plot):
    fig = plot(result)
    assert isinstance(fig, Figure)
    png = fig._repr_png_()  # what Jupyter displays inline, without pyplot
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_frontier_plot_lists_the_frontier_texts(result):
    fig = viz.plot_frontier(result, max_labels=50)
    texts = "\n".join(t.get_text() for ax in fig.axes for t in ax.texts)
    for t in result.frontier["text"]:
        assert repr(t)[:40] in texts  # "$" is not read as math, newlines are shown escaped


def test_frontier_at_each_iteration(result):
    last = viz.frontier_at(result, int(result.iteration.max()))
    assert last["text"].tolist() == result.frontier["text"].tolist()
    first = viz.frontier_at(result, 0)
    assert (first["iteration"] == 0).all() and len(first) >= 1


def test_best_under_thresholds_matches_brute_force(result):
    table = viz.best_under_thresholds(result, (4, 6, 8))
    assert list(table.index) == list(range(int(result.iteration.max()) + 1))
    for t in (4, 6, 8):
        col = table[f"xe <= {t:g}"]
        for i in table.index:
            ok = (result.iteration <= i) & (result.xe <= t)
            expect = result.activation[ok].max() if ok.any() else np.nan
            assert col[i] == pytest.approx(expect, nan_ok=True)
        assert np.all(np.diff(col.dropna()) >= 0)


def test_save_plots_writes_pngs(result, tmp_path):
    paths = viz.save_plots(result, tmp_path / "plots")
    assert [p.name for p in paths] == ["frontier.png", "evolution.png", "thresholds.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)


def test_bad_input():
    empty = DreamResult(objective="x[0]", method="epo", config={"length": 2}, ids=np.zeros((0, 2), int),
                        activation=np.zeros(0), xe=np.zeros(0), iteration=np.zeros(0, int), text=[])
    with pytest.raises(ValueError, match="no evaluated prompts") as caught:
        viz.plot_frontier(empty)
    assert isinstance(caught.value, viz.PlotError) and isinstance(caught.value, DreamlensError)
    with pytest.raises(TypeError, match="DreamResult") as caught:
        viz.plot_evolution({"frontier": []})
    assert isinstance(caught.value, DreamlensError)
    with pytest.raises(ValueError, match="at least one") as caught:
        viz.plot_thresholds(synthetic(), thresholds=())
    assert isinstance(caught.value, viz.PlotError)
