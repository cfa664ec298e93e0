"""The scan's settings, declared once: how many corpus tokens it reads, in windows of how many tokens, and
which top examples it keeps (`ScanConfig`); `scan`, the `dreamlens` commands and sweeps all take one.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from .errors import ScanError

# each field's hint, for the error of a bad value
_HINTS = {
    "tokens": "the token budget is the number of corpus tokens to scan, e.g. 200_000",
    "window": "e.g. 24",
    "top_k": "e.g. 32",
    "per_document": "e.g. 2",
    "batch_size": "e.g. 64",
}
# the settings a scan's results depend on (its cache key, and what its `meta` records); batch_size is how
# the work is split (a part's windows are whole batches, so a scan in parts records it too)
IDENTITY = ("tokens", "window", "top_k", "per_document")


@dataclass(frozen=True, kw_only=True)
class ScanConfig:
    """What a scan reads and keeps. Documents are cut into consecutive windows of `window` tokens until
    `tokens` corpus tokens are read (rounded up to whole windows); each objective keeps its `top_k` top
    examples, at most `per_document` of them from one document; `batch_size` windows go through the
    model in one forward pass. Checked when made: a bad value is a `ScanError` naming it."""

    tokens: int = 200_000
    window: int = 24
    top_k: int = 32
    per_document: int = 4
    batch_size: int = 64

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ScanError(f"{f.name} must be an integer >= 1, got {value!r}; {_HINTS[f.name]}")
            object.__setattr__(self, f.name, int(value))  # numpy integers as ints (JSON, cache keys)

    def replace(self, **settings: Any) -> ScanConfig:
        """This config with `settings` changed (`ScanError` for a name that is not a setting)."""
        names = [f.name for f in fields(self)]
        for key in settings:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ScanError(f"{key!r} is not a scan setting{hint} (the settings: {', '.join(names)})")
        return dataclasses.replace(self, **settings)

    def identity(self) -> dict[str, int]:
        """The settings the scan's results depend on (its cache key): tokens, window, top_k, per_document."""
        return {k: getattr(self, k) for k in IDENTITY}


# A sweep's scan, one per chunk of objectives (`sweep(scan=)`): half the tokens and the top examples of a
# lone scan's defaults. Declared here, beside them, so the `dreamlens sweep` flags show it without loading a model's stack.
SWEEP_SCAN = ScanConfig(tokens=100_000, top_k=16)


def scan_config(config: ScanConfig | None = None, **settings: Any) -> ScanConfig:
    """`config` (or the defaults) with `settings` changed; settings given as None keep their value."""
    if config is not None and not isinstance(config, ScanConfig):
        raise ScanError(f"config must be a ScanConfig, got {type(config).__name__}; e.g. ScanConfig(tokens=100_000)")
    return (config or ScanConfig()).replace(**{k: v for k, v in settings.items() if v is not None})
