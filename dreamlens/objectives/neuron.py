"""`Neuron`: one unit at any hook point, or one entry of an attention pattern (head, query, key),
read at one position or reduced over the prompt's positions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from jaxtyping import Float
from torch import Tensor

from .base import Objective, Reduce, as_index, check_reduce, reduce_positions, reduce_suffix
from .errors import ObjectiveError
from .forward import Capture
from .hooks import HookInfo, hook_info, hook_shape

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


@dataclass(frozen=True, eq=False, repr=False)
class Neuron(Objective):
    """One unit at any hook point: an index into the last axis, or a tuple for hooks with a head axis
    (`Neuron("blocks.3.attn.hook_z", (4, 10))` is head 4, dimension 10).

    Attention patterns and scores (`[batch, head, query, key]`) have no single position axis: index
    them with (head, query, key), sequence positions counted from 0 (the start token, if any) or from
    the end (-1); they take no position reduction."""

    hook: str
    index: int | tuple[int, ...]
    reduce: Reduce = "last"

    def __post_init__(self) -> None:
        object.__setattr__(self, "reduce", check_reduce(self.reduce))
        if isinstance(self.index, (tuple, list)):
            if not self.index:
                raise ObjectiveError(f"neuron index of {self.hook} is empty; give one integer per axis")
            idx = tuple(as_index(i, f"neuron index of {self.hook}") for i in self.index)
            object.__setattr__(self, "index", idx[0] if len(idx) == 1 else idx)
        else:
            object.__setattr__(self, "index", as_index(self.index, f"neuron index of {self.hook}"))

    @property
    def hooks(self) -> tuple[str, ...]:
        return (self.hook,)

    @property
    def _index(self) -> tuple[int, ...]:
        return self.index if isinstance(self.index, tuple) else (self.index,)

    def validate(self, model: HookedTransformer) -> None:
        info = hook_info(model, [self.hook])[self.hook]
        idx = self._index
        if info.kind == "pattern":
            self._validate_pattern(model, info)
            return
        shape = hook_shape(model, self.hook)
        if len(idx) != len(shape):
            example = ",".join(["0"] * (len(shape) - 1) + [str(idx[-1])])
            raise ObjectiveError(
                f"{self.hook} has per-position shape {list(shape)}, so its index needs {len(shape)} "
                f"number(s), got {list(idx)}; e.g. {self.hook}[{example}]"
            )
        for axis, (i, n) in enumerate(zip(idx, shape)):
            if not 0 <= i < n:
                raise ObjectiveError(
                    f"index {i} is out of range for axis {axis} of {self.hook} (size {n}): use 0..{n - 1}"
                )

    def _validate_pattern(self, model: HookedTransformer, info: HookInfo) -> None:
        idx = self._index
        n_heads, n_ctx = info.shape[1], model.cfg.n_ctx
        if len(idx) != 3:
            raise ObjectiveError(
                f"{self.hook} is {info.describe()}: index it with three numbers, head, query position and "
                f"key position (e.g. {self.hook}[0,-1,0]: head 0, from the last token to the first), "
                f"got {list(idx)}"
            )
        if not 0 <= idx[0] < n_heads:
            raise ObjectiveError(
                f"head {idx[0]} is out of range for {self.hook} ({n_heads} heads): use 0..{n_heads - 1}"
            )
        for name, p in (("query", idx[1]), ("key", idx[2])):
            if not -n_ctx <= p < n_ctx:
                raise ObjectiveError(
                    f"{name} position {p} of {self.hook} is beyond the model's context of {n_ctx} tokens"
                )
        if self.reduce != "last":
            raise ObjectiveError(
                f"{self.hook} is {info.describe()}: it has no single position axis, so it cannot be "
                f"reduced with {self.reduce!r}; pick the query and key positions in the index instead, "
                f"e.g. {self.hook}[{idx[0]},-1,0]"
            )

    def check_positions(self, model: HookedTransformer, n_pos: int, start: int) -> None:
        idx = self._index
        if hook_info(model, [self.hook])[self.hook].kind == "pattern":
            for name, p in (("query", idx[1]), ("key", idx[2])):
                if not -n_pos <= p < n_pos:
                    raise ObjectiveError(
                        f"{name} position {p} of {self} is outside the sequence of {n_pos} tokens: use "
                        f"0..{n_pos - 1} (0 is the start token, if any) or -{n_pos}..-1"
                    )
            return
        super().check_positions(model, n_pos, start)

    def value(self, capture: Capture) -> Float[Tensor, " batch"]:
        act = capture.acts[self.hook]
        idx = self._index
        if act.ndim == len(idx) + 1:  # [batch, head, query, key]: the index names every axis
            return act[(slice(None), *idx)]
        return reduce_positions(act[(slice(None), slice(None), *idx)], self.reduce, capture.start)

    def __str__(self) -> str:
        return f"{self.hook}[{','.join(map(str, self._index))}]{reduce_suffix(self.reduce)}"
