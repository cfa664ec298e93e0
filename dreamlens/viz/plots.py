"""Plots of a dream as matplotlib Figures (no pyplot, nothing global): its Pareto frontier with the texts,
the frontier over iterations, the best activation under cross-entropy limits; `save_png` writes one.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..errors import NotAResultError
from ..results import DreamResult, pareto_front
from .errors import PlotError


class DreamFigure(Figure):
    """A matplotlib Figure that Jupyter shows inline (as a PNG) without pyplot."""

    def _repr_png_(self) -> bytes:
        return to_png(self)


def _figure(figsize: tuple[float, float]) -> DreamFigure:
    fig = DreamFigure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def to_png(fig: Figure, dpi: int = 110) -> bytes:
    """The figure as PNG bytes, drawn with the Agg backend."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def save_png(fig: Figure, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Write the figure as a PNG file (drawn with the Agg backend); returns its path."""
    path = Path(path)
    path.write_bytes(to_png(fig, dpi))
    return path


def _check(result: Any) -> DreamResult:
    if not isinstance(result, DreamResult):
        raise NotAResultError(f"expected a DreamResult (from dreamlens.epo or DreamResult.load), got {type(result).__name__}")
    if len(result) == 0:
        raise PlotError(f"the result of {result.objective!r} holds no evaluated prompts: nothing to plot")
    return result


def _short(text: str, width: int) -> str:
    r = repr(text)
    return r if len(r) <= width else r[: width - 1] + "\u2026"


def _title(result: DreamResult) -> str:
    return f"{result.objective}  ({result.method}, {result.iterations} iterations, {len(result)} prompts)"


def plot_frontier(result: DreamResult, *, max_labels: int = 12, width: int = 60) -> Figure:
    """Every evaluated prompt (grey) and the Pareto frontier (activation against cross-entropy), the
    frontier's texts listed beside it, numbered as on the plot (up to `max_labels`, spread along it)."""
    r = _check(result)
    front = r.frontier
    fig = _figure((12.5, 4.8))
    ax, side = fig.subplots(1, 2, width_ratios=[1.15, 1])
    ax.scatter(r.xe, r.activation, s=6, c="0.75", alpha=0.6, lw=0, label=f"all {len(r)} prompts")
    ax.plot(front["xe"], front["activation"], "-o", c="tab:orange", ms=4, lw=1.5, label=f"frontier ({len(front)})")
    pick = np.unique(np.linspace(0, len(front) - 1, min(max_labels, len(front))).round().astype(int))
    lines = []
    for n, i in enumerate(pick, 1):
        row = front.iloc[i]
        ax.annotate(str(n), (row["xe"], row["activation"]), xytext=(4, 4), textcoords="offset points", fontsize=8)
        lines.append(f"{n:>2}. {row['activation']:8.3g}  xe {row['xe']:5.2f}  {_short(row['text'], width)}")
    ax.set_xlabel("cross-entropy (nats/token)")
    ax.set_ylabel("activation")
    ax.set_title(_title(r), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    side.axis("off")
    side.text(0, 1, "frontier prompts (activation, xe, text)\n\n" + "\n".join(lines), va="top", ha="left",
              family="monospace", fontsize=7.5, transform=side.transAxes, parse_math=False)
    return fig


def frontier_at(result: DreamResult, iteration: int) -> pd.DataFrame:
    """The Pareto frontier of the prompts evaluated up to and including `iteration`."""
    keep = np.flatnonzero(result.iteration <= iteration)
    idx = keep[pareto_front(result.activation[keep], result.xe[keep])]
    return result.history.iloc[idx].reset_index(drop=True)


def plot_evolution(result: DreamResult, *, snapshots: int = 6) -> Figure:
    """The frontier after several iterations (dark to light: early to late)."""
    r = _check(result)
    last = int(r.iteration.max())
    its = np.unique(np.linspace(0, last, min(snapshots, last + 1)).round().astype(int))
    fig = _figure((6.8, 4.6))
    ax = fig.subplots()
    cmap = matplotlib.colormaps["viridis"]
    for j, it in enumerate(its):
        f = frontier_at(r, int(it))
        color = cmap(j / max(len(its) - 1, 1))
        ax.plot(f["xe"], f["activation"], "-o", ms=3, lw=1.3, c=color, label=f"iteration {it}")
    ax.set_xlabel("cross-entropy (nats/token)")
    ax.set_ylabel("activation")
    ax.set_title("Pareto frontier over iterations\n" + _title(r), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return fig


def best_under_thresholds(result: DreamResult, thresholds: Sequence[float] = (4, 6, 8)) -> pd.DataFrame:
    """Per iteration (rows) and cross-entropy limit (columns): the best activation of the prompts
    evaluated so far with xe <= the limit (NaN until one is found)."""
    r = _check(result)
    its = np.arange(int(r.iteration.max()) + 1)
    out = {}
    for t in thresholds:
        ok = r.xe <= t
        per_it = pd.Series(r.activation[ok]).groupby(r.iteration[ok]).max()
        out[f"xe <= {t:g}"] = per_it.reindex(its).cummax().ffill().to_numpy()
    return pd.DataFrame(out, index=pd.Index(its, name="iteration"))


def plot_thresholds(result: DreamResult, thresholds: Sequence[float] = (4, 6, 8)) -> Figure:
    """The best activation found so far under each cross-entropy limit, against iterations."""
    if not thresholds:
        raise PlotError("give at least one cross-entropy threshold, e.g. thresholds=(4, 6, 8)")
    table = best_under_thresholds(result, thresholds)
    fig = _figure((6.8, 4.2))
    ax = fig.subplots()
    for col in table.columns:
        found = table[col].notna().any()
        ax.plot(table.index, table[col], drawstyle="steps-post", lw=1.6, label=col if found else f"{col} (none found)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("best activation so far")
    ax.set_title("best activation under cross-entropy limits\n" + _title(result), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return fig


def save_plots(result: DreamResult, folder: str | os.PathLike, thresholds: Sequence[float] = (4, 6, 8)) -> list[Path]:
    """Write frontier.png, evolution.png and thresholds.png into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return [
        save_png(plot_frontier(result), folder / "frontier.png"),
        save_png(plot_evolution(result), folder / "evolution.png"),
        save_png(plot_thresholds(result, thresholds), folder / "thresholds.png"),
    ]
