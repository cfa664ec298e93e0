"""The module-level `__getattr__` of a lazy package: `exports` loads its public names on first use (so
importing it does no work)."""

from __future__ import annotations

import importlib
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

