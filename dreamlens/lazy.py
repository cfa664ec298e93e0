"""Module-level `__getattr__`s: `exports` loads a package's public names on first use (so importing it
does no work), `moved` keeps a name that moved importable from its old module with a DeprecationWarning.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any


def exports(package: str, names: Mapping[str, str], submodules: frozenset[str] | set[str] = frozenset()) -> Callable[[str], Any]:
    """The `__getattr__` of `package`: `names` maps each public name to the submodule (relative to
    `package`) that defines it, imported on first use; `submodules` are importable as attributes."""

    def __getattr__(name: str) -> Any:
        if name in names:
            return getattr(importlib.import_module(f".{names[name]}", package), name)
        if name in submodules:
            return importlib.import_module(f".{name}", package)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


def moved(old: str, homes: Mapping[str, str]) -> Callable[[str], Any]:
    """The `__getattr__` of a module `old` whose public names moved: `homes` maps each of them to the
    module that holds it now (e.g. "scan" -> "dreamlens.analysis.scan"); using one warns
    `DeprecationWarning("dreamlens.dataset.scan is deprecated; use dreamlens.analysis.scan.scan")`."""

    def __getattr__(name: str) -> Any:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        warnings.warn(f"{old}.{name} is deprecated; use {home}.{name}", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(home), name)

    return __getattr__
