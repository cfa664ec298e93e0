"""Figures and pages of a dream: `plots` (matplotlib Figures: frontier, evolution, thresholds),
`attribution` (token attributions drawn by circuitsvis), `report` (one offline HTML page of a dream, or of
its modes side by side), `sweep_report` (a sweep's table), all HTML from the jinja2 templates of `html`;
the plot names are here as before, the pages' load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import exports
from .errors import PlotError, ReportError
from .plots import (
    DreamFigure,
    best_under_thresholds,
    frontier_at,
    plot_evolution,
    plot_frontier,
    plot_thresholds,
    save_plots,
    save_png,
    to_png,
)

# the report needs the attribution code (torch, circuitsvis): loaded when one of its names is used
_REPORT = {"build_report", "write_report", "build_modes_report", "write_modes_report", "load_result"}
_SWEEP_REPORT = {"build_sweep_report", "write_sweep_report"}  # a sweep's page (`sweep_report`)
_ATTRIBUTION = {"TokenView", "token_view", "tooltips", "render_attribution", "attribution_page", "page"}  # circuitsvis

__all__ = [
    "DreamFigure",
    "PlotError",
    "best_under_thresholds",
    "frontier_at",
    "plot_evolution",
    "plot_frontier",
    "plot_thresholds",
    "save_plots",
    "save_png",
    "to_png",
    "ReportError",
    "build_report",
    "load_result",
    "write_report",
    "build_modes_report",
    "write_modes_report",
    "build_sweep_report",
    "write_sweep_report",
    "TokenView",
    "token_view",
    "tooltips",
    "render_attribution",
    "attribution_page",
    "page",
]

if TYPE_CHECKING:  # the report's names, for a type checker
    from .attribution import TokenView, attribution_page, page, render_attribution, token_view, tooltips
    from .report import build_modes_report, build_report, load_result, write_modes_report, write_report
    from .sweep_report import build_sweep_report, write_sweep_report


__getattr__ = exports(__name__, {**dict.fromkeys(_REPORT, "report"), **dict.fromkeys(_SWEEP_REPORT, "sweep_report"),
                                 **dict.fromkeys(_ATTRIBUTION, "attribution")})


def __dir__() -> list[str]:
    return sorted([*globals(), *_REPORT, *_SWEEP_REPORT, *_ATTRIBUTION])
