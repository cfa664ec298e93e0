"""One self-contained, offline HTML page about a dream: the objective, the frontier, the plots, token
attributions and, given a scan, the comparison with max-activating dataset examples (`dreamlens report`).
"""

from __future__ import annotations

import base64
import html
import math
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from ..analysis.attribution import Attribution, attribute_frontier, head_scripts
from ..errors import DreamlensError
from ..io import atomic_write_text
from ..results import DreamResult, NotAResultError, ResultError
from . import plots

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from ..analysis.scan import ScanResult


class ReportError(DreamlensError, ValueError):
    """A report cannot be built from what it was given."""


_CSS = """
body { font-family: system-ui, -apple-system, sans-serif; margin: 2em auto; max-width: 1180px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 13px; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
code, .prompt { font-family: ui-monospace, Menlo, Consolas, monospace; white-space: pre-wrap; }
img { max-width: 100%; } .note { color: #666; font-size: 13px; }
details { margin: 0.4em 0 1em; } summary { cursor: pointer; color: #555; font-size: 13px; }
"""


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(v: Any) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return _esc(v)
    return "n/a" if math.isnan(f) else f"{f:.4g}"


def _table(df: pd.DataFrame, prompt_cols: Sequence[str] = ("text",)) -> str:
    """An HTML table with every cell escaped; prompt texts shown exactly (repr), numbers right-aligned."""
    head = "".join(f"<th>{_esc(c)}</th>" for c in df.columns)
    rows = []
    for _, r in df.iterrows():
        cells = []
        for c in df.columns:
            v = r[c]
            if c in prompt_cols:
                cells.append(f'<td class="prompt">{_esc(repr(v)) if isinstance(v, str) else ""}</td>')
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                cells.append(f'<td class="num">{_num(v)}</td>')
            else:
                cells.append(f"<td>{_esc(v)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _kv(pairs: Sequence[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in pairs)
    return f"<table>{rows}</table>"


def _img(fig: Any, alt: str) -> str:
    data = base64.b64encode(plots.to_png(fig)).decode()
    return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{data}">'


def _overview(r: DreamResult) -> str:
    pairs = [
        ("objective", r.objective),
        ("method", r.method),
        ("model", r.model_name or "?"),
        ("start token id", r.bos_token_id),
        ("prefix", repr(r.prefix)),
        ("suffix", repr(r.suffix)),
        ("prompts evaluated", len(r)),
        ("iterations", r.iterations),
        ("stopped", r.stopped),
        ("wall time", f"{r.wall_time:.1f} s"),
        ("compute (token-forwards)", f"{r.token_forwards:,}"),
    ]
    config = ", ".join(f"{k}={v!r}" for k, v in r.config.items() if k not in ("prefix", "suffix"))
    return _kv(pairs) + f'<p class="note">config: <code>{_esc(config)}</code></p>'


def _best_table(r: DreamResult, thresholds: Sequence[float]) -> str:
    rows = []
    for t in [*thresholds, math.inf]:
        limit = "none" if math.isinf(t) else t
        try:
            b = r.best(max_xe=t)
        except ValueError:
            rows.append({"xe limit": limit, "activation": math.nan, "xe": math.nan, "iteration": "", "text": None})
            continue
        rows.append({"xe limit": limit, "activation": float(b["activation"]), "xe": float(b["xe"]),
                     "iteration": int(b["iteration"]), "text": b["text"]})
    return _table(pd.DataFrame(rows))


def _attribution_section(attrs: Sequence[Attribution]) -> str:
    parts = [
        '<p class="note">Each token of a frontier prompt is swapped for its top gradient alternatives and for '
        "random tokens, and the objective re-evaluated. Colour: the drop to the best swap (blue: every swap "
        "lowers the objective, red: some swap raises it). Hover a token for its drops and alternatives.</p>"
    ]
    for a in attrs:
        df = a.to_dataframe()[["position", "token", "drop_best", "drop_worst", "best_alternative", "worst_alternative"]]
        table = _table(df, prompt_cols=("token", "best_alternative", "worst_alternative"))
        parts.append(
            f'<h3 class="prompt">{_esc(repr(a.text))}</h3>' + a.view().html()
            + f"<details><summary>per-token table</summary>{table}</details>"
        )
    return "\n".join(parts)


def _dataset_section(result: DreamResult, scan: ScanResult, objective_index: int | None) -> str:
    from ..analysis.compare import compare

    comp = compare(result, scan, objective_index)
    i = scan.index(comp.summary["objective"])
    top = scan.top(i).head(12)
    cols = [c for c in ("activation", "xe", "text") if c in top.columns]
    summary = [(k, _num(v) if isinstance(v, float) else v) for k, v in comp.summary.items()]
    meta = getattr(scan, "meta", {}) or {}
    where = ", ".join(f"{k} {meta[k]}" for k in ("corpus", "n_tokens", "window") if k in meta)
    return (
        f'<p class="note">Scan: {_esc(where or repr(scan))}</p>' + _img(comp.figure, "dreams against dataset examples")
        + _kv(summary) + "<h3>Top dataset examples</h3>" + _table(top[cols])
    )


def build_report(
    result: DreamResult,
    *,
    model: HookedTransformer | None = None,
    scan: ScanResult | None = None,
    objective_index: int | None = None,
    attributions: Sequence[Attribution] | None = None,
    max_attributions: int = 6,
    n_gradient: int = 8,
    n_random: int = 8,
    thresholds: Sequence[float] = (4, 6, 8),
    title: str | None = None,
) -> str:
    """The report page as a string. Token attributions are computed for up to `max_attributions`
    frontier prompts when `model` is given (or passed ready in `attributions`); the dataset comparison
    is added when `scan` (a `ScanResult`) is given. Everything is inlined: no external URL."""
    if not isinstance(result, DreamResult):
        raise NotAResultError(f"build_report needs a DreamResult (from dream() or DreamResult.load), got {type(result).__name__}")
    if len(result) == 0:
        raise ReportError(
            f"the result of {result.objective!r} holds no evaluated prompts: nothing to report; "
            "run the dream for at least one iteration"
        )
    title = title or f"Dream report: {result.objective}"
    if attributions is None and model is not None and max_attributions > 0:
        if result.model_name and str(model.cfg.model_name) != result.model_name:
            warnings.warn(
                f"the dream was made with {result.model_name!r}, the attributions use {model.cfg.model_name!r}", stacklevel=2
            )
        attributions = attribute_frontier(
            model, result, max_prompts=max_attributions, n_gradient=n_gradient, n_random=n_random
        )
    front = result.frontier[["activation", "xe", "iteration", "text"]]
    sections = [
        ("Objective and run", _overview(result)),
        ("Best prompt under cross-entropy limits", _best_table(result, thresholds)),
        (f"Pareto frontier ({len(front)} prompts)",
         '<p class="note">Non-dominated prompts: no other prompt has both a higher activation and a lower '
         "cross-entropy (nats/token).</p>" + _table(front)),
        ("Plots", _img(plots.plot_frontier(result), "Pareto frontier")
         + _img(plots.plot_evolution(result), "frontier over iterations")
         + _img(plots.plot_thresholds(result, thresholds), "best activation under cross-entropy limits")),
    ]
    if attributions:
        sections.append(("Token attribution", _attribution_section(attributions)))
    else:
        sections.append(("Token attribution", '<p class="note">Not computed (no model given).</p>'))
    if scan is not None:
        sections.append(("Dreams and max-activating dataset examples", _dataset_section(result, scan, objective_index)))
    body = "\n".join(f"<h2>{_esc(h)}</h2>\n{content}" for h, content in sections)
    stamp = time.strftime("%Y-%m-%d %H:%M")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{_esc(title)}</title>"
        f"<style>{_CSS}</style>{head_scripts() if attributions else ''}</head><body>"
        f"<h1>{_esc(title)}</h1><p class=\"note\">Written by dreamlens on {stamp}.</p>\n{body}\n</body></html>\n"
    )


def write_report(path: str | os.PathLike, result: DreamResult, **kwargs: Any) -> Path:
    """Write `build_report(result, **kwargs)` to `path` (atomically)."""
    path = Path(path)
    page = build_report(result, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, page)
    return path


def load_result(path: str | os.PathLike) -> DreamResult:
    """A saved dream result, with an error that says what is wrong with the folder."""
    p = Path(path)
    if not p.exists():
        raise ResultError(f"no dream result at {str(p)!r}: the folder does not exist (pass the folder a dream was saved to)")
    if not p.is_dir():
        raise ResultError(f"{str(p)!r} is a file; a dream result is a folder holding result.json and history.parquet")
    return DreamResult.load(p)
