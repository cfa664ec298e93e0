"""The errors of objectives (each a `DreamlensError` that keeps its built-in base): one leaf module,
so every kind of objective, the forward pass and the parser raise the same classes without importing each other."""

from __future__ import annotations

from ..errors import DreamlensError


class ObjectiveError(DreamlensError, ValueError):
    """An objective does not fit the model, or its specification is malformed."""


class NonFiniteError(DreamlensError, FloatingPointError):
    """The model produced NaN or infinite values for an objective."""
