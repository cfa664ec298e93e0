"""The error of a Neuronpedia export (a `DreamlensError` that keeps its built-in base)."""

from __future__ import annotations

from ..errors import DreamlensError


class NeuronpediaError(DreamlensError, ValueError):
    """An objective, a folder or a setting that cannot be exported to Neuronpedia."""
