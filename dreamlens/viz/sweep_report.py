"""One offline HTML page of a sweep (`dreamlens report DIR`): a table of every objective, sortable by any
column, whose rows open that objective's dream frontier and top dataset examples. No external URL.
"""

from __future__ import annotations

import html
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

    from ..sweeps.store import Sweep

_CSS = """
body { font-family: system-ui, -apple-system, sans-serif; margin: 2em auto; max-width: 1400px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } table { border-collapse: collapse; font-size: 13px; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } #sweep > thead th { cursor: pointer; position: sticky; top: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.prompt { font-family: ui-monospace, Menlo, Consolas, monospace; white-space: pre-wrap; }
tr.main { cursor: pointer; } tr.main:hover { background: #f6f9ff; } tr.detail > td { background: #fafafa; }
.yes { color: #070; font-weight: 600; } .note { color: #666; font-size: 13px; } h3 { font-size: 1em; margin: 0.6em 0 0.2em; }
"""

# Click a header to sort by it (again: the other way; empty cells last); click a row to open its details.
_JS = """
document.querySelectorAll('#sweep > thead th').forEach((th, col) => th.addEventListener('click', () => {
  const t = th.closest('table'), up = th.dataset.dir !== 'up';
  t.querySelectorAll(':scope > thead th').forEach(h => delete h.dataset.dir); th.dataset.dir = up ? 'up' : 'down';
  const key = b => b.rows[0].cells[col].dataset.v, num = v => v !== '' && !isNaN(v);
  const rows = [...t.tBodies].sort((a, b) => {
    const x = key(a), y = key(b);
    if (x === '' || y === '') return (x === '') - (y === '');
    const c = num(x) && num(y) ? x - y : x.localeCompare(y);
    return up ? c : -c; });
  rows.forEach(b => t.appendChild(b)); }));
document.querySelectorAll('#sweep tr.main').forEach(r => r.addEventListener('click', () => {
  r.nextElementSibling.hidden = !r.nextElementSibling.hidden; }));
"""


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _finite(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _num_cell(v: Any) -> str:
    f = _finite(v)
    return f'<td class="num" data-v="{"" if f is None else repr(f)}">{"n/a" if f is None else f"{f:.4g}"}</td>'


def _text_cell(text: Any, sort: bool = True) -> str:
    t = str(text) if isinstance(text, str) else ""
    shown = _esc(repr(t)) if t else ""
    return f'<td class="prompt" data-v="{_esc(t) if sort else ""}">{shown}</td>'


def _small_table(df: pd.DataFrame, columns: list[str]) -> str:
    head = "".join(f"<th>{_esc(c)}</th>" for c in columns)
    rows = []
    for _, r in df.iterrows():
        cells = [_text_cell(r[c]) if c == "text" else _num_cell(r[c]) for c in columns]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


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


def _header(sweep: Sweep, limit: float, beats: str) -> str:
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
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in pairs)
    return f"<table>{rows}</table>"


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
    head = "".join(f"<th>{_esc(c)}</th>" for c in columns)
    bodies, beats, beating = [], 0, set()
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
        mode_cell = f'<td class="num" data-v="{mode}" title="dreamed {_ordinal(found)}">{mode}</td>' if show_modes else ""
        main = (
            f'<td class="num" data-v="{i}">{i}</td>{_text_cell(r["objective"])}{mode_cell}{_num_cell(a)}{_num_cell(x)}'
            f'{_num_cell(r["dataset_max"])}{_num_cell(ratio)}'
            f'<td data-v="{int(beat)}" class="{"yes" if beat else ""}">{"yes" if beat else "no"}</td>'
            f'{_text_cell(text)}{_text_cell(r["top_text"])}'
        )
        error = str(r.get("error") or "")
        which = (f" (mode {mode} of {sweep.modes}: dreamed {_ordinal(found)}, without {int(r.get('n_banned', 0))} tokens "
                 "of the modes dreamed before it)") if show_modes else ""
        detail = (
            f"<h3>Dream frontier of {_esc(r['objective'])}{_esc(which)}</h3>"
            + (f'<p class="note">no dream: {_esc(error)}</p>' if error else "")
            + (_small_table(front, ["activation", "xe", "iteration", "text"]) if front is not None and len(front) else
               '<p class="note">no prompt</p>')
            + f"<h3>Top dataset examples (first {examples})</h3>"
            + (_small_table(by_ex[i], ["activation", "xe", "scan_activation", "doc", "pos", "text"]) if i in by_ex else
               '<p class="note">none</p>')
        )
        bodies.append(f'<tbody><tr class="main">{main}</tr><tr class="detail" hidden><td colspan="{len(columns)}">'
                      f"{detail}</td></tr></tbody>")
    beaten = f"{beats} of {len(summary)}"
    if show_modes:
        beaten += f" ({len(beating)} of {sweep.n_done} objectives have one)"
    title = title or f"Sweep report: {sweep.folder.name}"
    table = f'<table id="sweep"><thead><tr>{head}</tr></thead>{"".join(bodies)}</table>'
    note = ('<p class="note">Click a column header to sort by it, a row to open its dream frontier and top dataset '
            "examples. Activations are the objective's; xe is the mean next-token cross-entropy (nats/token), lower "
            "is more fluent; ratio is the best dream at the limit over the dataset max."
            + (f" mode ranks an objective's modes by activation at xe ≤ {sweep.config.get('mode_limit', 6.0):g} (1: the "
               "highest; hover over it for the order it was dreamed in)." if show_modes else "") + "</p>")
    return (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{_esc(title)}</title><style>{_CSS}</style></head>'
        f"<body><h1>{_esc(title)}</h1>{_header(sweep, limit, beaten)}{note}{table}<script>{_JS}</script></body></html>"
    )


def write_sweep_report(path: str | os.PathLike, sweep: Sweep, *, limit: float = 6.0, examples: int = 5) -> Path:
    """Write `build_sweep_report` to `path` (atomically); returns the path."""
    from .report import write_page

    return write_page(path, build_sweep_report(sweep, limit=limit, examples=examples))
