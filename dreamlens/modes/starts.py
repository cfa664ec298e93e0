"""Where a later mode starts: among the objective's top dataset examples, the one least like the modes
before it (`pattern_similarity` of what the objective's hooks hold there), among those as fluent as the
limit where there are any, with its banned tokens replaced by the model's most likely allowed ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from jaxtyping import Int
from torch import Tensor

from ..analysis.patterns import pattern_similarity, readouts
from ..errors import DreamError
from ..objectives import Objective
from ..optim.config import DreamConfig
from ..scoring import banned_mask, make_layout, retokenizes, score
from .budget import REPAIR_TRIES, starts_cost
from .settings import DEFAULT_LIMIT

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


class Starts:
    """Where later modes start: the objective's top examples (their activation patterns, readouts and
    xe, computed once), and for each later mode the example least like the modes before it."""

    def __init__(self, model: HookedTransformer, obj: Objective, cfg: DreamConfig,
                 examples: Sequence[tuple[int, Sequence[int]]], limit: float = DEFAULT_LIMIT):
        self.model, self.obj, self.limit = model, obj, limit
        self.layout = make_layout(model, cfg.length, cfg.prefix, cfg.suffix)
        self.ranks: list[int] = []
        spans: list[tuple[int, ...]] = []
        for rank, span in examples:
            span = tuple(int(t) for t in span)
            if len(span) != cfg.length:
                raise DreamError(
                    f"example {rank} has {len(span)} tokens but the dream has {cfg.length}; pass spans of the dream's "
                    "length (analysis.example_spans(scan, objective, length) cuts them)"
                )
            self.ranks.append(int(rank))
            spans.append(span)
        self.spans = torch.tensor(spans, dtype=torch.long).reshape(len(spans), cfg.length)
        self._patterns: tuple[Tensor, Tensor] | None = None
        self._xe: Tensor | None = None

    def cost(self, k: int) -> int:
        """Token-forwards charged for choosing where later mode `k` (1, 2, ...) starts (`starts_cost`)."""
        return starts_cost(self.layout.seq_len, len(self.spans), k, self.layout.length)

    def patterns(self, spans: Tensor) -> tuple[Tensor, Tensor]:
        return readouts(self.model, self.obj, self.layout.assemble(spans).tolist())

    def pick(self, earlier: list[Tensor | None], cfg: DreamConfig) -> tuple[int, list[int], int] | None:
        """The example least like the `earlier` modes' best prompts, among the fluent ones (xe <= limit) if
        there are any, with the tokens `cfg` bans replaced (`repair`): (rank, span, tokens replaced). The
        next least alike is tried (`REPAIR_TRIES` in all) when the replaced text does not tokenize back to
        itself; None if no example will do."""
        if not len(self.spans):
            return None
        if self._patterns is None:
            self._patterns = self.patterns(self.spans)
            self._xe = score(self.model, [self.obj], self.spans.to(self.model.cfg.device), self.layout)[1].cpu()
        ex, xe = self._patterns, self._xe
        assert xe is not None  # computed with the patterns
        mask = banned_mask(self.model, ascii_only=cfg.ascii_only, ban_whitespace_only=cfg.ban_whitespace_only,
                           extra=cfg.banned_tokens).cpu()
        ok = retokenizes(self.model, self.spans, self.layout)[0].cpu()
        if (ok & (xe <= self.limit)).any():
            ok &= xe <= self.limit
        prompts = [p for p in earlier if p is not None]
        worst = torch.zeros(len(self.spans))  # nothing to be unlike: the best-ranked first
        if prompts:
            mine = self.patterns(torch.stack(prompts))
            worst = pattern_similarity(ex, mine, ex[0].mean(dim=0)).max(dim=1).values  # vs the closest earlier mode
        worst[~ok] = float("inf")
        for j in torch.argsort(worst, stable=True)[:REPAIR_TRIES].tolist():  # ties: the better-ranked example
            if not ok[j]:
                break
            span, n = self.repair(self.spans[j], mask)
            if retokenizes(self.model, span[None], self.layout)[0].all():
                return self.ranks[j], span.tolist(), n
        return None

    def repair(self, span: Int[Tensor, " length"], banned: Tensor) -> tuple[Int[Tensor, " length"], int]:
        """`span` with each banned token replaced, left to right, by the model's most likely allowed token
        after what precedes it; and how many were replaced."""
        span = span.clone()
        todo = torch.nonzero(banned[span]).flatten().tolist()
        for pos in todo:
            with torch.no_grad():
                logits = self.model(self.layout.assemble(span[None]).to(self.model.cfg.device))
            at = logits[0, self.layout.span.start + pos - 1].float().cpu()
            at[banned] = float("-inf")
            span[pos] = int(at.argmax())
        return span, len(todo)
