"""The optimizers by name: `METHODS` pairs each method with its config class, `make_config` builds a
method's config from keyword options (what `dl.dream`, the CLI and sweeps switch methods with).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from typing import Any

from ..errors import DreamError
from .adapt import adapt
from .config import CONFIGS, DreamConfig
from .epo import epo
from .gcg import gcg

METHODS: dict[str, tuple[Callable[..., Any], type[DreamConfig]]] = {
    name: (run, CONFIGS[name]) for name, run in (("adapt", adapt), ("epo", epo), ("gcg", gcg))
}
DEFAULT_METHOD = "adapt"  # chosen by benchmarks/fluency.py (see the README)


def make_config(method: str = DEFAULT_METHOD, config: DreamConfig | None = None, **options: Any) -> DreamConfig:
    """The config of `method`: `config` (or the defaults) with `options` replaced."""
    if method not in METHODS:
        close = difflib.get_close_matches(str(method), list(METHODS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise DreamError(f"unknown method {method!r}{hint} (choose from {', '.join(sorted(METHODS))})")
    cls = METHODS[method][1]
    if config is not None and not isinstance(config, cls):
        raise DreamError(f"method {method!r} takes a {cls.__name__}, got a {type(config).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    for key in options:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            others = [m for m, (_, c) in METHODS.items() if key in {f.name for f in dataclasses.fields(c)}]
            where = f" ({key!r} is an option of {', '.join(others)})" if others else ""
            raise DreamError(f"{key!r} is not an option of {method}{hint}{where}")
    options = {k: _frozen(v) for k, v in options.items()}
    return dataclasses.replace(config or cls(), **options)


def _frozen(value: Any) -> Any:
    """Lists as tuples, nested ones too (config fields are hashable)."""
    return tuple(_frozen(v) for v in value) if isinstance(value, (list, tuple)) else value
