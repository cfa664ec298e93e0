"""Scoring prompts of several lengths (a dream's length range): one Evaluator per length, sharing one
cache, one history per objective and one budget, each length in batched passes of its own."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from .evaluator import Evaluator


class LengthEvaluators:
    """The Evaluator of each span length, made on first use from `base` (`Evaluator.sibling`). Rows of
    one length go through the model together and unpadded, so every token's position (rotary or learned)
    and the mean per token of xe are exactly those of the prompt scored alone."""

    def __init__(self, base: Evaluator):
        self.base = base
        self.by_length: dict[int, Evaluator] = {base.layout.length: base}

    def at(self, length: int) -> Evaluator:
        """The evaluator of spans of `length` tokens."""
        if length not in self.by_length:
            self.by_length[length] = self.base.sibling(length)
        return self.by_length[length]

    def forget_parents(self) -> None:
        """No length's candidates reuse an earlier pass's prefixes (see `Evaluator.forget_parents`)."""
        for ev in self.by_length.values():
            ev.forget_parents()

    def evaluate(
        self, prompts: Sequence[Int[Tensor, " length"]], owner: Int[Tensor, " n"], iteration: int
    ) -> tuple[Float[Tensor, " n"], Float[Tensor, " n"], Bool[Tensor, " n"]]:
        """`Evaluator.evaluate` of prompts of any lengths in the range: grouped by length (shortest first),
        each group scored, re-tokenization checked and recorded by its length's evaluator."""
        n = len(prompts)
        f = torch.full((n,), float("-inf"), dtype=torch.float64)
        xe = torch.full((n,), float("inf"), dtype=torch.float64)
        ok = torch.zeros(n, dtype=torch.bool)
        groups: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(len(p), []).append(i)
        owner = torch.as_tensor(owner).cpu()
        for length in sorted(groups):
            idx = torch.tensor(groups[length], dtype=torch.long)
            rows = torch.stack([prompts[i] for i in groups[length]])
            f[idx], xe[idx], ok[idx] = self.at(length).evaluate(rows, owner[idx], iteration)
        return f, xe, ok
