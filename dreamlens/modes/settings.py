"""`ModeSettings` (how later modes are kept away from earlier ones and how modes are ranked) and the one
check of each mode option: the number of modes, the fluency limit, and options that need modes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..errors import DreamError, DreamlensError

DEFAULT_LIMIT = 6.0  # nats/token: modes are ranked by their best activation at xe <= this


def check_mode_count(modes: object, *, name: str = "modes", error: type[DreamlensError] = DreamError) -> None:
    """`error` unless `modes` (the number of distinct dreams) is a positive integer."""
    if isinstance(modes, bool) or not isinstance(modes, (int, np.integer)) or modes < 1:
        raise error(f"{name} must be a positive integer (1: one dream per objective; K: K distinct dreams of each), "
                    f"got {modes!r}")


def check_mode_limit(limit: object, *, name: str = "limit", finite: bool = False,
                     error: type[DreamlensError] = DreamError) -> None:
    """`error` unless `limit` (the fluency limit modes are ranked at) is a positive number (and finite with
    `finite`: a sweep writes it to JSON)."""
    if isinstance(limit, bool) or not isinstance(limit, (int, float, np.integer, np.floating)):
        ok = False
    else:
        ok = bool(limit > 0) and (not finite or math.isfinite(float(limit)))
    if not ok:
        raise error(f"{name} must be a positive number (the fluency limit modes are ranked at, nats/token, e.g. 6), "
                    f"got {limit!r}")


def check_needs_modes(modes: int | None, options: Mapping[str, object], *, modes_name: str = "modes=",
                      error: type[DreamlensError] = DreamError) -> None:
    """`error` naming the first of `options` (name as the caller spells it -> value; None: not given) that
    was given without modes (`modes` None or 1): such an option only applies to several modes."""
    if modes is not None and modes != 1:
        return
    for option, value in options.items():
        if value is not None:
            raise error(f"{option} applies only with {modes_name}K (several modes); pass {modes_name}2 (or more), "
                        f"or drop {option}")


@dataclass(frozen=True)
class ModeSettings:
    """How later modes are kept away from earlier ones (see `dreamlens.modes.search`), and the fluency
    limit they are ranked at."""

    n_key: int = 3  # key tokens per mode
    neighbours: int = 8  # embedding neighbours banned with each key token (itself included)
    n_alternatives: int = 8  # replacements per position in the attribution (half gradient, half random)
    limit: float = DEFAULT_LIMIT
    exclude: tuple[int, ...] = ()  # never banned (the start token never is)

    def validate(self) -> None:
        for name in ("n_key", "neighbours", "n_alternatives"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise DreamError(f"{name} must be a positive integer, got {v!r}")
        check_mode_limit(self.limit)
