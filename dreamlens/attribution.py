"""Deprecated: moved to `dreamlens.analysis.attribution`.
Old imports keep working: each public name resolves here with a DeprecationWarning naming its new module.
"""

from __future__ import annotations

from .lazy import moved

__getattr__ = moved("dreamlens.attribution", {
    "AttributionError": "dreamlens.analysis.attribution",
    "Attribution": "dreamlens.analysis.attribution",
    "js_literal": "dreamlens.analysis.attribution",
    "STYLE": "dreamlens.analysis.attribution",
    "TokenView": "dreamlens.analysis.attribution",
    "circuitsvis_script": "dreamlens.analysis.attribution",
    "head_scripts": "dreamlens.analysis.attribution",
    "page": "dreamlens.analysis.attribution",
    "attribute_many": "dreamlens.analysis.attribution",
    "attribute": "dreamlens.analysis.attribution",
    "attribute_frontier": "dreamlens.analysis.attribution",
})
