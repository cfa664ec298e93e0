"""Where the optimized tokens sit in the sequences the model sees:
[start token] + prefix context + optimized span + suffix context; the layout carries the context's
text too, so that a prompt's re-tokenization in context needs nothing else."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Int
from torch import Tensor

from ..errors import DreamError
from ..models import bos_token_id, encode

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


@dataclass(frozen=True)
class Layout:
    """Where the optimized tokens sit in the sequences the model sees, and the context's text (`prefix`
    and `suffix`, whose ids are in `head` and `tail`)."""

    head: tuple[int, ...]  # start token (if any) + prefix context ids
    tail: tuple[int, ...]  # suffix context ids
    length: int  # optimized tokens
    n_bos: int  # 1 if head begins with the start token
    prefix: str = ""  # the text before the span (its ids: head after the start token)
    suffix: str = ""  # the text after the span (its ids: tail)

    @property
    def span(self) -> slice:
        return slice(len(self.head), len(self.head) + self.length)

    @property
    def seq_len(self) -> int:
        return len(self.head) + self.length + len(self.tail)

    @property
    def xe_from(self) -> int:
        """First optimized position that is scored (the first needs a token before it)."""
        return len(self.head) if self.head else len(self.head) + 1

    @property
    def start(self) -> int:
        """First position that belongs to the prompt for position reductions (after the start token)."""
        return self.n_bos

    def with_length(self, length: int) -> Layout:
        """The same context around a span of `length` tokens."""
        return Layout(self.head, self.tail, length, self.n_bos, self.prefix, self.suffix)

    def assemble(self, span_ids: Int[Tensor, "batch length"]) -> Int[Tensor, "batch seq"]:
        b = span_ids.shape[0]
        dev = span_ids.device
        head = torch.tensor(self.head, dtype=torch.long, device=dev).expand(b, -1)
        tail = torch.tensor(self.tail, dtype=torch.long, device=dev).expand(b, -1)
        return torch.cat([head, span_ids, tail], dim=1)


def make_layout(model: HookedTransformer, length: int, prefix: str = "", suffix: str = "") -> Layout:
    """The layout of `length` optimized tokens after the model's start token (if it has one) and
    `prefix`, before `suffix` (a config's context text); raises when it does not fit the context."""
    if not isinstance(length, int) or length < 1:
        raise DreamError(f"length must be a positive number of tokens, got {length!r}")
    bos = bos_token_id(model)
    head = ([bos] if bos is not None else []) + (encode(model, prefix) if prefix else [])
    tail = encode(model, suffix) if suffix else []
    total = len(head) + length + len(tail)
    if total > model.cfg.n_ctx:
        raise DreamError(
            f"length {length} plus context ({total - length} tokens) exceeds the model's context of "
            f"{model.cfg.n_ctx} tokens; use length <= {model.cfg.n_ctx - total + length}"
        )
    if length == 1 and not head:
        raise DreamError("with no start token and no prefix, a 1-token prompt has no fluency to score; use length >= 2")
    return Layout(tuple(head), tuple(tail), length, int(bos is not None), prefix, suffix)
