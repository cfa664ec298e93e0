"""Old import paths kept as deprecated shims: `moved(old, homes)` makes a module's `__getattr__` that
warns DeprecationWarning naming a public name's new module and returns the name from there.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any


def moved(old: str, homes: Mapping[str, str]) -> Callable[[str], Any]:
    """The module-level `__getattr__` of the deprecated module `old`: `homes` maps each public name it
    had to the module that holds it now (e.g. "scan" -> "dreamlens.analysis.scan")."""

    def __getattr__(name: str) -> Any:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        warnings.warn(f"{old} is deprecated; use {home}", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(home), name)

    return __getattr__
