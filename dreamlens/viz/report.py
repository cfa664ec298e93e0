"""One self-contained, offline HTML page about a dream: the objective, the frontier, the plots, token
attributions and, given a scan, the comparison with max-activating dataset examples (`dreamlens report`);
and one about a dream's modes, side by side (`build_modes_report`).
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from markupsafe import Markup

from ..analysis.attribution import Attribution, attribute_frontier
from ..analysis.compare import compare
from ..analysis.patterns import nearest_examples
from ..errors import NotAResultError, ResultError
from ..models import decode
from ..modes.result import Modes
from ..neuronpedia.ids import neuronpedia_page
from ..results import DreamResult
from . import plots
from .attribution import token_view
from .errors import ReportError
from .html import kv, note, number, parts, png, render, table, write_page

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from ..analysis.scan import ScanResult


def _img(fig: Any, alt: str) -> Markup:
    return png(plots.to_png(fig), alt)


def _overview(r: DreamResult) -> Markup:
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
    return kv(pairs) + parts().config(config)


def neuronpedia_link(objective: str) -> Markup:
    """A paragraph linking the feature's Neuronpedia page, when the objective is a latent of an SAE that has
    one (the page's only external link: no resource is loaded from it); else ''."""
    page = neuronpedia_page(objective)
    if page is None:
        return Markup("")
    return parts().neuronpedia(page.url)


def _best_table(r: DreamResult, thresholds: Sequence[float]) -> Markup:
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
    return table(pd.DataFrame(rows))


def _attribution_section(attrs: Sequence[Attribution]) -> Markup:
    items = []
    for a in attrs:
        df = a.to_dataframe()[["position", "token", "drop_best", "drop_worst", "best_alternative", "worst_alternative"]]
        items.append({"heading": repr(a.text), "view": token_view(a).frame(),
                      "table": table(df, prompt_cols=("token", "best_alternative", "worst_alternative"))})
    return parts().attributions(items)


def _dataset_section(result: DreamResult, scan: ScanResult, objective_index: int | None) -> Markup:
    comp = compare(result, scan, objective_index)
    i = scan.index(comp.summary["objective"])
    top = scan.top(i).head(12)
    cols = [c for c in ("activation", "xe", "text") if c in top.columns]
    summary = [(k, number(v) if isinstance(v, float) else v) for k, v in comp.summary.items()]
    return (
        note(f"Scan: {_scan_place(scan)}") + _img(comp.figure, "dreams against dataset examples")
        + kv(summary) + parts().heading(3, "Top dataset examples") + table(top[cols])
    )


def _scan_place(scan: ScanResult) -> str:
    """Where a scan read: its corpus, tokens and window (or the scan itself)."""
    meta = getattr(scan, "meta", {}) or {}
    return ", ".join(f"{k} {meta[k]}" for k in ("corpus", "n_tokens", "window") if k in meta) or repr(scan)


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
    is added when `scan` (a `ScanResult`) is given. Everything is inlined: no external resource (the one
    external link is the feature's Neuronpedia page, for a latent of an SAE that has one)."""
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
        ("Objective and run", neuronpedia_link(result.objective) + _overview(result)),
        ("Best prompt under cross-entropy limits", _best_table(result, thresholds)),
        (f"Pareto frontier ({len(front)} prompts)",
         note("Non-dominated prompts: no other prompt has both a higher activation and a lower "
              "cross-entropy (nats/token).") + table(front)),
        ("Plots", _img(plots.plot_frontier(result), "Pareto frontier")
         + _img(plots.plot_evolution(result), "frontier over iterations")
         + _img(plots.plot_thresholds(result, thresholds), "best activation under cross-entropy limits")),
    ]
    if attributions:
        sections.append(("Token attribution", _attribution_section(attributions)))
    else:
        sections.append(("Token attribution", note("Not computed (no model given).")))
    if scan is not None:
        sections.append(("Dreams and max-activating dataset examples", _dataset_section(result, scan, objective_index)))
    return render("report.html.j2", title=title, stamp=time.strftime("%Y-%m-%d %H:%M"), body_class="",
                  sections=sections)


def _tokens(model: HookedTransformer | None, ids: Sequence[int]) -> str:
    """Token ids as their texts (repr) when a model (tokenizer) is at hand, else as ids."""
    if not ids:
        return "none"
    if model is None:
        return "ids " + ", ".join(str(int(t)) for t in ids)
    return ", ".join(repr(decode(model, [int(t)])) for t in ids)


def _mode_column(modes: Modes, i: int, model: HookedTransformer | None, attrs: Sequence[Attribution] | None,
                 nearest: pd.DataFrame | None, scan_note: str) -> dict[str, Any]:
    """What the column of mode `i` shows (see `templates/modes_report.html.j2`)."""
    r, b = modes.dreams[i], modes.best(i)
    found = modes.found[i]
    keys = _tokens(model, modes.key_tokens[i])
    if not modes.key_tokens[i] and found == len(modes):
        keys = "none (found last: no mode was dreamed without them)"
    pairs: list[tuple[str, Any]] = [("rank", f"{i + 1} of {len(modes)}"), ("found", f"{found} of {len(modes)}")]
    if b is None:
        pairs.append((f"best at xe <= {modes.limit:g}", "none: no prompt this fluent"))
    else:
        pairs += [(f"best at xe <= {modes.limit:g}", repr(b["text"])),
                  ("activation, xe", f"{number(b['activation'])}, {number(b['xe'])}")]
    if len(r):
        u = r.best()
        pairs += [("unconstrained best", repr(u["text"])), ("activation, xe", f"{number(u['activation'])}, {number(u['xe'])}")]
    pairs += [("key tokens", keys), ("dreamed without", f"{len(modes.banned[i])} tokens"),
              ("prompts evaluated", len(r)), ("compute (token-forwards)", f"{r.token_forwards:,}")]
    column: dict[str, Any] = {"summary": kv(pairs), "frontier": None, "nearest": None}
    if len(r):
        front = r.frontier[["activation", "xe", "iteration", "text"]]
        column.update(n_frontier=len(front), frontier=table(front),
                      plot=_img(plots.plot_frontier(r, max_labels=8, width=44), f"Pareto frontier of mode {i + 1}"))
    column["attributions"] = _attribution_section(attrs) if attrs else note("Not computed (no model given).")
    if nearest is not None:
        column["nearest"] = table(nearest) if len(nearest) else note(scan_note)
    return column


def build_modes_report(
    modes: Modes,
    *,
    model: HookedTransformer | None = None,
    scan: ScanResult | None = None,
    objective_index: int | None = None,
    attributions: Sequence[Sequence[Attribution]] | None = None,
    max_attributions: int = 3,
    n_gradient: int = 8,
    n_random: int = 8,
    k_examples: int = 5,
    title: str | None = None,
) -> str:
    """One offline page of a `Modes`, the modes side by side (a column each, best first): summary,
    frontier table and plot, token attributions (up to `max_attributions` frontier prompts per mode when
    `model` is given, or ready in `attributions`, one list per mode) and, given a `scan` and a `model`,
    the `k_examples` top dataset examples nearest each mode's best prompt (`nearest_examples`)."""
    if not isinstance(modes, Modes):
        got = type(modes).__name__
        raise NotAResultError(f"build_modes_report needs Modes (from dream(..., modes=K) or Modes.load), got {got}")
    if not len(modes):
        raise ReportError(f"the modes of {modes.objective!r} hold no dream: nothing to report; dream with modes=1 or more")
    if attributions is not None and len(attributions) != len(modes):
        raise ReportError(f"attributions holds {len(attributions)} list(s) for {len(modes)} modes; pass one list per mode")
    title = title or f"Modes report: {modes.objective}"
    if attributions is None and model is not None and max_attributions > 0:
        names = {r.model_name for r in modes if r.model_name}
        if names and str(model.cfg.model_name) not in names:
            used = model.cfg.model_name
            warnings.warn(f"the modes were dreamed with {sorted(names)}, the attributions use {used!r}", stacklevel=2)
        attributions = [attribute_frontier(model, r, max_prompts=max_attributions, n_gradient=n_gradient, n_random=n_random)
                        if len(r) else [] for r in modes]
    nearest: list[pd.DataFrame | None] = [None] * len(modes)
    scan_note = ""
    intro: list[Markup] = [parts().modes_intro(len(modes), modes.objective, f"{modes.limit:g}"),
                           neuronpedia_link(modes.objective)]
    overview = modes.to_frame()
    overview["key_tokens"] = [_tokens(model, k) for k in modes.key_tokens]
    intro.append(table(overview))
    if scan is not None:
        if model is None:
            intro.append(note("Nearest dataset examples: not computed (they need the model; pass model=)."))
        else:
            nearest = list(nearest_examples(model, modes, scan, objective_index=objective_index, k=k_examples))
            scan_note = f"No prompt of this mode is at xe <= {modes.limit:g}: nothing to compare."
            intro.append(note("Nearest dataset examples: the scan's top examples whose activation pattern at the "
                              "objective's hooks, and the way the objective reads it there, are most like the mode's "
                              f"best prompt's. Scan: {_scan_place(scan)}"))
    cols = [_mode_column(modes, i, model, attributions[i] if attributions else None, nearest[i], scan_note)
            for i in range(len(modes))]
    return render("modes_report.html.j2", title=title, stamp=time.strftime("%Y-%m-%d %H:%M"), body_class="modes-page",
                  intro=intro, columns=cols)


def write_modes_report(path: str | os.PathLike, modes: Modes, **kwargs: Any) -> Path:
    """Write `build_modes_report(modes, **kwargs)` to `path` (atomically)."""
    return write_page(path, build_modes_report(modes, **kwargs))


def write_report(path: str | os.PathLike, result: DreamResult, **kwargs: Any) -> Path:
    """Write `build_report(result, **kwargs)` to `path` (atomically)."""
    return write_page(path, build_report(result, **kwargs))


def load_result(path: str | os.PathLike) -> DreamResult:
    """A saved dream result, with an error that says what is wrong with the folder."""
    p = Path(path)
    if not p.exists():
        raise ResultError(f"no dream result at {str(p)!r}: the folder does not exist (pass the folder a dream was saved to)")
    if not p.is_dir():
        raise ResultError(f"{str(p)!r} is a file; a dream result is a folder holding result.json and history.parquet")
    return DreamResult.load(p)
