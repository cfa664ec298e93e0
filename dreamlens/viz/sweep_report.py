"""One offline HTML page of a sweep (`dreamlens report DIR`): a table of every objective, sortable by any
column, whose rows open that objective's dream frontier and top dataset examples. No external URL.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from markupsafe import Markup

from .html import Cell, parts, render, write_page

if TYPE_CHECKING:
    import pandas as pd

    from ..sweeps.store import Sweep

def _finite(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _num_cell(v: Any) -> Cell:
    f = _finite(v)
    return Cell("n/a" if f is None else f"{f:.4g}", "num", "" if f is None else repr(f))


def _text_cell(text: Any, sort: bool = True) -> Cell:
    t = str(text) if isinstance(text, str) else ""
    return Cell(repr(t) if t else "", "prompt", t if sort else "")


def _small_table(df: pd.DataFrame, columns: list[str]) -> Markup:
    rows = [[_text_cell(r[c]) if c == "text" else _num_cell(r[c]) for c in columns] for _, r in df.iterrows()]
    return parts().table(columns, rows)


def _best_at(front: pd.DataFrame, limit: float) -> tuple[float, float, str]:
    ok = front[front["xe"] <= limit]
    if not len(ok):
        return math.nan, math.nan, ""
    r = ok.iloc[int(np.argmax(ok["activation"].to_numpy(float)))]
    return float(r["activation"]), float(r["xe"]), str(r["text"])


def _by_index(frame: pd.DataFrame, head: int | None) -> dict[int, pd.DataFrame]:
    """The rows of each objective (by its sweep index), in rank order; the first `head` of them."""
    if not len(frame):
        return {}
    out = {}
    for index, rows in frame.sort_values(["index", "rank"]).groupby("index", sort=False):
        out[int(cast(Any, index))] = rows if head is None else rows.head(head)
    return out


def _by_mode(frame: pd.DataFrame) -> dict[tuple[int, int], pd.DataFrame]:
    """The frontier of each objective's mode (by sweep index and mode; mode 1 where the frame has no
    `mode` column), in rank order."""
    if not len(frame):
        return {}
    frame = frame if "mode" in frame.columns else frame.assign(mode=1)
    out = {}
    for (index, mode), rows in frame.sort_values(["index", "mode", "rank"]).groupby(["index", "mode"], sort=False):
        out[(int(cast(Any, index)), int(cast(Any, mode)))] = rows
    return out


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def _header(sweep: Sweep, limit: float, beats: str) -> list[tuple[str, Any]]:
    c = sweep.config
    done = f"{sweep.n_done} of {len(sweep)} objectives"
    if not sweep.complete:
        done += " (the sweep is not finished: run it again to compute the rest)"
    pairs = [
        ("objectives done", done), ("model", c.get("model")), ("method", c.get("method")),
        ("budget per objective", f"{c.get('budget'):,} token-forwards" if isinstance(c.get("budget"), int) else c.get("budget")),
        ("corpus", f"{c.get('corpus')} ({c.get('tokens')} tokens, window {c.get('window')}, top {c.get('top_k')})"),
    ]
    if sweep.modes > 1:
        pairs[3] = ("budget per mode", pairs[3][1])
        pairs.append(("modes", f"{sweep.modes} per objective, ranked by activation at xe ≤ {c.get('mode_limit', 6.0):g}; "
                               "each later one dreamed without the key tokens of those before it"))
    pairs += [("fluency limit", f"xe ≤ {limit:g} nats/token"), ("dreams that beat the dataset", beats)]
    return pairs


def build_sweep_report(sweep: Sweep, *, limit: float = 6.0, examples: int = 5, title: str | None = None) -> str:
    """The page as a string: per objective (per mode of each, with a `mode` column, in a sweep of modes),
    its best dream at xe <= `limit` (from its frontier), the dataset max, their ratio, whether a dream beats
    the dataset (`analysis.metrics.beats_dataset`) and the top example; each row opens the frontier and
    the objective's first `examples` top examples."""
    summary, fronts, exs = sweep.summary, sweep.frontiers, sweep.examples
    by_front = _by_mode(fronts)
    by_ex = _by_index(exs, examples)
    show_modes = sweep.modes > 1 or ("mode" in summary.columns and bool((summary["mode"] > 1).any()))
    columns = ["#", "objective", *(["mode"] if show_modes else []), f"best dream at xe ≤ {limit:g}", "its xe",
               "dataset max", "ratio", "beats dataset", "best dream at the limit", "top example"]
    rows, beats, beating = [], 0, set()
    empty = fronts.iloc[:0] if "xe" in fronts.columns else None
    for r in summary.to_dict("records"):
        i = int(r["index"])
        mode = int(r.get("mode", 1))
        front = by_front.get((i, mode), empty)
        a, x, text = _best_at(front, limit) if front is not None else (math.nan, math.nan, "")
        m = _finite(r["dataset_max"])
        ratio = a / m if m is not None and m > 0 and math.isfinite(a) else math.nan
        beat = bool(r["beats_dataset"])
        beats += beat
        if beat:
            beating.add(i)
        found = int(r.get("found", mode))
        cells = [Cell(i, "num", str(i)), _text_cell(r["objective"])]
        if show_modes:
            cells.append(Cell(mode, "num", str(mode), f"dreamed {_ordinal(found)}"))
        cells += [_num_cell(a), _num_cell(x), _num_cell(r["dataset_max"]), _num_cell(ratio),
                  Cell("yes" if beat else "no", "yes" if beat else "", str(int(beat))),
                  _text_cell(text), _text_cell(r["top_text"])]
        which = (f" (mode {mode} of {sweep.modes}: dreamed {_ordinal(found)}, without {int(r.get('n_banned', 0))} tokens "
                 "of the modes dreamed before it)") if show_modes else ""
        rows.append({
            "cells": cells, "objective": r["objective"], "which": which, "error": str(r.get("error") or ""),
            "frontier": _small_table(front, ["activation", "xe", "iteration", "text"])
            if front is not None and len(front) else None,
            "examples": _small_table(by_ex[i], ["activation", "xe", "scan_activation", "doc", "pos", "text"])
            if i in by_ex else None,
        })
    beaten = f"{beats} of {len(summary)}"
    if show_modes:
        beaten += f" ({len(beating)} of {sweep.n_done} objectives have one)"
    note = ("Click a column header to sort by it, a row to open its dream frontier and top dataset "
            "examples. Activations are the objective's; xe is the mean next-token cross-entropy (nats/token), lower "
            "is more fluent; ratio is the best dream at the limit over the dataset max."
            + (f" mode ranks an objective's modes by activation at xe ≤ {sweep.config.get('mode_limit', 6.0):g} (1: the "
               "highest; hover over it for the order it was dreamed in)." if show_modes else ""))
    return render("sweep_report.html.j2", title=title or f"Sweep report: {sweep.folder.name}",
                  header=_header(sweep, limit, beaten), note=note, columns=columns, rows=rows, examples=examples)


def write_sweep_report(path: str | os.PathLike, sweep: Sweep, *, limit: float = 6.0, examples: int = 5) -> Path:
    """Write `build_sweep_report` to `path` (atomically); returns the path."""

    return write_page(path, build_sweep_report(sweep, limit=limit, examples=examples))
