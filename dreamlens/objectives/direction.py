"""`Direction`: the dot product of the activation at a hook with a fixed vector (e.g. an SAE decoder
row or a probe), read at one position or reduced over the prompt's positions."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from .base import Objective, Reduce, check_reduce, reduce_positions, reduce_suffix
from .errors import ObjectiveError
from .forward import Capture
from .hooks import hook_info

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


@dataclass(frozen=True, eq=False, repr=False)
class Direction(Objective):
    """Dot product of the activation at `hook` with `vector` (not normalized). For hooks with a head
    axis (`hook_z`) the vector spans all heads, flattened: `n_heads * d_head` entries."""

    hook: str
    vector: Tensor
    reduce: Reduce = "last"
    source: str | None = None  # file the vector came from, for the string form
    # the vector on each (device, dtype) it was read in: copied there once, not on every forward pass
    _placed: dict[Any, Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "reduce", check_reduce(self.reduce))
        v = torch.as_tensor(self.vector).detach()
        if not v.is_floating_point():
            v = v.float()
        if v.ndim != 1:
            raise ObjectiveError(f"a direction must be a 1-D vector, got shape {list(v.shape)}; flatten it")
        if not torch.isfinite(v).all():
            n_bad = int((~torch.isfinite(v)).sum())
            raise ObjectiveError(
                f"the direction for {self.hook} has {n_bad} NaN or infinite entries; every entry must be a "
                "finite number"
            )
        if v.numel() == 0 or v.abs().max() == 0:
            raise ObjectiveError(
                f"the direction for {self.hook} is all zeros (length {v.numel()}): it would give a constant "
                "objective; pass a vector with at least one non-zero entry"
            )
        object.__setattr__(self, "vector", v)

    @property
    def hooks(self) -> tuple[str, ...]:
        return (self.hook,)

    def validate(self, model: HookedTransformer) -> None:
        info = hook_info(model, [self.hook])[self.hook]
        if info.kind != "positional":
            raise ObjectiveError(
                f"{self.hook} is {info.describe()}, not one vector per position; a direction needs a hook "
                "such as blocks.N.hook_resid_post"
            )
        shape = info.shape[2:]
        if math.prod(shape) != self.vector.numel():
            raise ObjectiveError(
                f"the direction has {self.vector.numel()} entries but {self.hook} has {math.prod(shape)} per "
                f"position (shape {list(shape)}); give a vector of length {math.prod(shape)}"
            )

    def placed(self, device: torch.device, dtype: torch.dtype) -> Float[Tensor, " d"]:
        """The vector on `device` in `dtype` (made once per pair)."""
        key = (device, dtype)
        if key not in self._placed:
            self._placed[key] = self.vector.to(device=device, dtype=dtype)
        return self._placed[key]

    def value(self, capture: Capture) -> Float[Tensor, " batch"]:
        act = capture.acts[self.hook]
        if act.ndim > 3:
            act = act.flatten(2)
        # the dot product sums d_model terms: in float32 at least, whatever the model's dtype
        dtype = torch.promote_types(act.dtype, torch.float32)
        return reduce_positions(act.to(dtype) @ self.placed(act.device, dtype), self.reduce, capture.start)

    def __str__(self) -> str:
        return f"dir:{self.hook}:{self.source or '<in-memory>'}{reduce_suffix(self.reduce)}"
