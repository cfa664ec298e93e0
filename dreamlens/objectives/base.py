"""The objective protocol: `Objective` (arithmetic, `terms`, `check_positions`, `evaluate`), the weighted
sum its arithmetic builds (`Combination`), and the position reductions that every objective shares.

It stands on the forward pass (`forward.py`: `Capture`, `run_objectives`) and imports no kind of objective:
each kind (`neuron.py`, `sae_latent.py`, ...) imports it, and the string form (`parse.py`) imports them all."""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .errors import ObjectiveError
from .forward import Capture, run_objectives, stop_at_layer

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

Reduce = str | int  # "last" | "max" | "mean" | a position index within the prompt


# ---------------------------------------------------------------------------------------------
# Reductions over positions, and checks of the numbers objectives are built from


def reduce_positions(x: Float[Tensor, "batch pos"], how: Reduce, start: int) -> Float[Tensor, " batch"]:
    """One value per row: the last position, the max or mean over the prompt's positions (from
    `start`), or the value at position `how` (counted from `start`, or from the end when negative).
    Reduced in float32 at least, whatever the model's dtype."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    if how == "last":
        return x[:, -1]
    if how == "max":
        return x[:, start:].max(dim=1).values
    if how == "mean":
        return x[:, start:].mean(dim=1)
    pos = int(how)
    return x[:, start + pos] if pos >= 0 else x[:, pos]


def check_reduce(how: Reduce) -> Reduce:
    """`how` as a valid reduction ('last', 'max', 'mean' or an int position), else ObjectiveError."""
    if isinstance(how, str) and how in ("last", "max", "mean"):
        return how
    if isinstance(how, numbers.Integral) and not isinstance(how, bool):
        return int(how)
    raise ObjectiveError(f"reduce must be 'last', 'max', 'mean' or an integer position, got {how!r}")


def check_position(how: Reduce, n_pos: int, start: int, what: str) -> None:
    """A fixed position must fall inside the prompt (`n_pos` tokens, the first `start` not part of it)."""
    if not isinstance(how, int):
        return
    n = n_pos - start
    if not -n <= how < n:
        raise ObjectiveError(
            f"position {how} of {what} is outside the prompt of {n} token(s): use 0..{n - 1} (counted "
            f"after the start token) or -{n}..-1 (from the end)"
        )


def reduce_suffix(how: Reduce) -> str:
    """The string form of a reduction: '' for the default 'last', else '@max', '@mean', '@POS'."""
    return "" if how == "last" else f"@{how}"


def as_index(i: Any, what: str) -> int:
    """`i` as an int index (numpy and torch integers included, bools refused), else ObjectiveError."""
    if isinstance(i, bool):
        raise ObjectiveError(f"{what} must be an integer, got {i!r}")
    try:
        return operator.index(i)
    except TypeError:
        raise ObjectiveError(f"{what} must be an integer, got {i!r}") from None


# ---------------------------------------------------------------------------------------------
# The protocol


class _OneTerm:
    """`Objective.terms` of a single objective: itself with coefficient 1. A non-data descriptor, so
    the `terms` field of a `Combination` (an instance attribute) takes its place there; on the class
    it raises AttributeError, so that the dataclass `Combination` sees no default for that field."""

    def __get__(self, obj: Objective | None, owner: type | None = None) -> list[tuple[float, Objective]]:
        if obj is None:
            raise AttributeError("terms")
        return [(1.0, obj)]


class Objective:
    """Base of all objectives. Subclasses define `hooks`, `validate`, `value` and `__str__`.

    Objectives combine linearly: `a + b`, `a - 0.5 * b`, `2 * a`, `-a`, `a / 2`, `sum([a, b])`.
    """

    needs_logits: bool = False

    # The objective as a weighted sum, `[(coefficient, leaf objective), ...]`: `[(1.0, self)]` for a
    # single objective, the flattened terms for a `Combination`.
    if TYPE_CHECKING:
        terms: list[tuple[float, Objective]]
    else:
        terms = _OneTerm()

    @property
    def hooks(self) -> tuple[str, ...]:
        return ()

    def validate(self, model: HookedTransformer) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def value(self, capture: Capture) -> Float[Tensor, " batch"]:  # pragma: no cover - overridden
        raise NotImplementedError

    def check_positions(self, model: HookedTransformer, n_pos: int, start: int) -> None:
        """Fixed positions against the actual prompt length (known only once tokens are given): raise
        ObjectiveError when one falls outside a prompt of `n_pos` tokens, the first `start` not part of it."""
        check_position(getattr(self, "reduce", "last"), n_pos, start, str(self))

    def stop_at_layer(self, model: HookedTransformer) -> int | None:
        """The `stop_at_layer` a forward pass needs to compute this objective (None: the whole model)."""
        return stop_at_layer(model, [self])

    def evaluate(
        self, model: HookedTransformer, tokens: Int[Tensor, "batch pos"], *, start: int | None = None
    ) -> Float[Tensor, " batch"]:
        """The objective for each row of `tokens`, without gradients, stopping the forward early."""
        with torch.no_grad():
            values, _ = run_objectives(model, [self], tokens, start=start)
        return values[0]

    # linear combinations ---------------------------------------------------------------------
    def __add__(self, other: Objective) -> Objective:
        if not isinstance(other, Objective):
            return NotImplemented
        return Combination(self.terms + other.terms)

    def __radd__(self, other: Any) -> Objective:
        if isinstance(other, numbers.Number) and other == 0:  # so that sum([a, b]) works
            return self
        return NotImplemented

    def __sub__(self, other: Objective) -> Objective:
        if not isinstance(other, Objective):
            return NotImplemented
        return Combination(self.terms + [(-c, o) for c, o in other.terms])

    def __mul__(self, k: float) -> Objective:
        if not isinstance(k, numbers.Real) or isinstance(k, bool):
            return NotImplemented
        return Combination([(float(k) * c, o) for c, o in self.terms])

    __rmul__ = __mul__

    def __truediv__(self, k: float) -> Objective:
        if not isinstance(k, numbers.Real) or isinstance(k, bool):
            return NotImplemented
        if k == 0:
            raise ObjectiveError("cannot divide an objective by 0")
        return self * (1.0 / float(k))

    def __neg__(self) -> Objective:
        return self * -1.0

    def __repr__(self) -> str:
        return f"objective({str(self)!r})"


# ---------------------------------------------------------------------------------------------
# The linear combination that the protocol's arithmetic builds


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
