"""Deprecated: moved to `dreamlens.viz.report`.
Old imports keep working: each public name resolves here with a DeprecationWarning naming its new module.
"""

from __future__ import annotations

from .lazy import moved

__getattr__ = moved("dreamlens.report", {
    "ReportError": "dreamlens.viz.report",
    "build_report": "dreamlens.viz.report",
    "write_report": "dreamlens.viz.report",
    "load_result": "dreamlens.viz.report",
})
