"""One self-contained, offline HTML page about a dream: the objective, the frontier, the plots, token
attributions and, given a scan, the comparison with max-activating dataset examples (`dreamlens report`);
and one about a dream's modes, side by side (`build_modes_report`).
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
from ..errors import NotAResultError, ResultError
from ..io import atomic_write_text
from ..results import DreamResult
from . import plots
from .errors import ReportError

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from ..analysis.scan import ScanResult
    from ..optim.modes import Modes


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


def neuronpedia_link(objective: str) -> str:
    """A paragraph linking the feature's Neuronpedia page, when the objective is a latent of an SAE that has
    one (the page's only external link: no resource is loaded from it); else ''."""
    from ..neuronpedia.ids import neuronpedia_page

    page = neuronpedia_page(objective)
    if page is None:
        return ""
    return f'<p>This feature on Neuronpedia: <a href="{_esc(page.url)}">{_esc(page.url)}</a></p>'


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
    return _page(title, body, scripts=bool(attributions))


_MODES_CSS = """
body.modes-page { max-width: none; }
.modes { display: grid; grid-template-columns: repeat(var(--modes), minmax(360px, 1fr)); gap: 1.2em; align-items: start;
  overflow-x: auto; }
.mode { min-width: 0; border: 1px solid #ddd; border-radius: 6px; padding: 0 0.8em 0.8em; }
.mode h2 { margin-top: 0.5em; } .mode h3 { font-size: 1em; margin: 1.2em 0 0.3em; }
.mode table { width: 100%; } .mode td.prompt, .mode td { overflow-wrap: anywhere; }
"""


def _page(title: str, body: str, *, scripts: bool, css: str = "", body_class: str = "") -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M")
    cls = f' class="{_esc(body_class)}"' if body_class else ""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{_esc(title)}</title>"
        f"<style>{_CSS}{css}</style>{head_scripts() if scripts else ''}</head><body{cls}>"
        f"<h1>{_esc(title)}</h1><p class=\"note\">Written by dreamlens on {stamp}.</p>\n{body}\n</body></html>\n"
    )


def _tokens(model: HookedTransformer | None, ids: Sequence[int]) -> str:
    """Token ids as their texts (repr) when a model (tokenizer) is at hand, else as ids."""
    if not ids:
        return "none"
    if model is None:
        return "ids " + ", ".join(str(int(t)) for t in ids)
    from ..models import decode

    return ", ".join(repr(decode(model, [int(t)])) for t in ids)


def _mode_column(modes: Modes, i: int, model: HookedTransformer | None, attrs: Sequence[Attribution] | None,
                 nearest: pd.DataFrame | None, scan_note: str) -> str:
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
                  ("activation, xe", f"{_num(b['activation'])}, {_num(b['xe'])}")]
    if len(r):
        u = r.best()
        pairs += [("unconstrained best", repr(u["text"])), ("activation, xe", f"{_num(u['activation'])}, {_num(u['xe'])}")]
    pairs += [("key tokens", keys), ("dreamed without", f"{len(modes.banned[i])} tokens"),
              ("prompts evaluated", len(r)), ("compute (token-forwards)", f"{r.token_forwards:,}")]
    parts = [f'<h2>Mode {i + 1}</h2>', _kv(pairs)]
    if not len(r):
        parts.append('<p class="note">This mode holds no evaluated prompts.</p>')
    else:
        front = r.frontier[["activation", "xe", "iteration", "text"]]
        parts += [f"<h3>Pareto frontier ({len(front)} prompts)</h3>", _table(front),
                  _img(plots.plot_frontier(r, max_labels=8, width=44), f"Pareto frontier of mode {i + 1}")]
    parts.append("<h3>Token attribution</h3>")
    parts.append(_attribution_section(attrs) if attrs else '<p class="note">Not computed (no model given).</p>')
    if nearest is not None:
        parts.append("<h3>Nearest dataset examples</h3>")
        parts.append(_table(nearest) if len(nearest) else f'<p class="note">{_esc(scan_note)}</p>')
    return f'<div class="mode">{"".join(parts)}</div>'


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
    from ..optim.modes import Modes

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
    intro = [f'<p class="note">{len(modes)} modes of <code>{_esc(modes.objective)}</code>, each later one found without '
             "the key tokens (and their embedding neighbours) of those found before it (column start: where it began); "
             "ranked by the best activation "
             f"at xe &lt;= {modes.limit:g} nats/token.</p>" + neuronpedia_link(modes.objective)]
    overview = modes.to_frame()
    overview["key_tokens"] = [_tokens(model, k) for k in modes.key_tokens]
    intro.append(_table(overview))
    if scan is not None:
        if model is None:
            intro.append('<p class="note">Nearest dataset examples: not computed (they need the model; pass model=).</p>')
        else:
            from ..analysis.patterns import nearest_examples

            nearest = list(nearest_examples(model, modes, scan, objective_index=objective_index, k=k_examples))
            scan_note = f"No prompt of this mode is at xe <= {modes.limit:g}: nothing to compare."
            meta = getattr(scan, "meta", {}) or {}
            where = ", ".join(f"{k} {meta[k]}" for k in ("corpus", "n_tokens", "window") if k in meta)
            intro.append(f'<p class="note">Nearest dataset examples: the scan\'s top examples whose activation pattern at '
                         "the objective's hooks, and the way the objective reads it there, are most like the mode's best "
                         f"prompt's. Scan: {_esc(where or repr(scan))}</p>")
    cols = [_mode_column(modes, i, model, attributions[i] if attributions else None, nearest[i], scan_note)
            for i in range(len(modes))]
    body = "\n".join(intro) + f'<div class="modes" style="--modes: {len(modes)}">{"".join(cols)}</div>'
    return _page(title, body, scripts=bool(attributions and any(attributions)), css=_MODES_CSS, body_class="modes-page")


def write_modes_report(path: str | os.PathLike, modes: Modes, **kwargs: Any) -> Path:
    """Write `build_modes_report(modes, **kwargs)` to `path` (atomically)."""
    return write_page(path, build_modes_report(modes, **kwargs))


def write_report(path: str | os.PathLike, result: DreamResult, **kwargs: Any) -> Path:
    """Write `build_report(result, **kwargs)` to `path` (atomically)."""
    return write_page(path, build_report(result, **kwargs))


def write_page(path: str | os.PathLike, page: str) -> Path:
    """Write an HTML page to `path` atomically, creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, page)


def load_result(path: str | os.PathLike) -> DreamResult:
    """A saved dream result, with an error that says what is wrong with the folder."""
    p = Path(path)
    if not p.exists():
        raise ResultError(f"no dream result at {str(p)!r}: the folder does not exist (pass the folder a dream was saved to)")
    if not p.is_dir():
        raise ResultError(f"{str(p)!r} is a file; a dream result is a folder holding result.json and history.parquet")
    return DreamResult.load(p)
