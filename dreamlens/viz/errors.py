"""The errors of figures and pages (each a `DreamlensError` that keeps its built-in base)."""

from __future__ import annotations

from ..errors import DreamlensError


class PlotError(DreamlensError, ValueError):
    """A plot cannot be drawn from what it was given (a result without prompts, no threshold)."""


class ReportError(DreamlensError, ValueError):
    """A report cannot be built from what it was given."""
