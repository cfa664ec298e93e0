"""`Combination`: a weighted sum of objectives (`a - 0.5 * b`), flattened so that its `terms` are
always single objectives; its string form parses back to the same sum."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING

from jaxtyping import Float
from torch import Tensor

from .base import Capture, Objective
from .errors import ObjectiveError

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


def _format_coef(c: float) -> str:
    short = f"{c:g}"
    return short if float(short) == c else repr(c)


@dataclass(frozen=True, eq=False, repr=False)
class Combination(Objective):
    """A weighted sum of objectives, e.g. "activate A but not B": `a - 0.5 * b`."""

    terms: list[tuple[float, Objective]]

    def __post_init__(self) -> None:
        flat: list[tuple[float, Objective]] = []
        for term in self.terms:
            if not (isinstance(term, tuple) and len(term) == 2 and isinstance(term[1], Objective)):
                raise ObjectiveError(f"a combination's terms are (coefficient, objective) pairs, got {term!r}")
            c, o = term
            if not isinstance(c, numbers.Real) or isinstance(c, bool) or not math.isfinite(c):
                raise ObjectiveError(f"the coefficient of {o} must be a finite number, got {c!r}")
            flat.extend((float(c) * c2, o2) for c2, o2 in o.terms)  # nested combinations flatten
        if not flat:
            raise ObjectiveError("a combination needs at least one objective")
        object.__setattr__(self, "terms", flat)

    @property
    def hooks(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(h for _, o in self.terms for h in o.hooks))

    @property
    def needs_logits(self) -> bool:  # type: ignore[override]
        return any(o.needs_logits for _, o in self.terms)

    def validate(self, model: HookedTransformer) -> None:
        for _, o in self.terms:
            o.validate(model)

    def check_positions(self, model: HookedTransformer, n_pos: int, start: int) -> None:
        for _, o in self.terms:
            o.check_positions(model, n_pos, start)

    def value(self, capture: Capture) -> Float[Tensor, " batch"]:
        return sum(c * o.value(capture) for c, o in self.terms)  # type: ignore[return-value]

    def __str__(self) -> str:
        out = ""
        for i, (c, o) in enumerate(self.terms):
            mag = abs(c)
            body = str(o) if mag == 1 else f"{_format_coef(mag)}*{o}"
            if i == 0:
                out = f"-{body}" if c < 0 else body
            else:
                out += f" {'-' if c < 0 else '+'} {body}"
        return out
