"""`Max`: the largest of several objectives (`max(a, b)`), an objective that fires when any of them
does, e.g. a synthetic polysemantic feature; its string form parses back to the same maximum."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .base import Objective
from .errors import ObjectiveError
from .forward import Capture, run_objectives

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


class Max(Objective):
    """`Max(a, b, ...)`: per prompt, the largest of the objectives' values. Its gradient is that of
    the largest one (where two tie exactly, torch's `amax` shares it between them)."""

    parts: tuple[Objective, ...]

    def __init__(self, *parts: Objective):
        flat: list[Objective] = []
        for p in parts:
            if not isinstance(p, Objective):
                raise ObjectiveError(f"max() takes objectives, got {p!r}; parse a string with dl.objective first")
            flat.extend(p.parts if isinstance(p, Max) else (p,))  # max(max(a, b), c) is max(a, b, c)
        if len(flat) < 2:
            raise ObjectiveError(f"max() needs at least two objectives, got {len(flat)}")
        self.parts = tuple(flat)

    @property
    def hooks(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(h for p in self.parts for h in p.hooks))

    @property
    def needs_logits(self) -> bool:  # type: ignore[override]
        return any(p.needs_logits for p in self.parts)

    def validate(self, model: HookedTransformer) -> None:
        for p in self.parts:
            p.validate(model)

    def check_positions(self, model: HookedTransformer, n_pos: int, start: int) -> None:
        for p in self.parts:
            p.check_positions(model, n_pos, start)

    def part_values(self, capture: Capture) -> Float[Tensor, "n_parts batch"]:
        """Every part's value, stacked (in the order of `parts`)."""
        vals = [p.value(capture) for p in self.parts]
        dtype = vals[0].dtype
        for v in vals[1:]:
            dtype = torch.promote_types(dtype, v.dtype)
        return torch.stack([v.to(dtype) for v in vals])

    def value(self, capture: Capture) -> Float[Tensor, " batch"]:
        return self.part_values(capture).amax(dim=0)

    def larger_part(self, model: HookedTransformer, tokens: Int[Tensor, "batch pos"]) -> Int[Tensor, " batch"]:
        """For each row of `tokens`, the index (into `parts`) of the part that is the largest."""
        with torch.no_grad():
            values, _ = run_objectives(model, list(self.parts), tokens)
        return values.argmax(dim=0)

    def __str__(self) -> str:
        return "max(" + ", ".join(str(p) for p in self.parts) + ")"
