"""The model's own next-token distribution, for fluent proposals and fluent starting prompts.

The one-hot gradient says how a swap changes everything downstream; these say what the model itself
expects at a position: ADAPT's beam search grows prompts from them, and EPO can start from text the
model samples (`EPOConfig(init="sample")`) and mix such tokens into its children (`lm_share`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..objectives.forward import run_objectives, unembed
from ..scoring import Layout, retokenizes

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


@torch.no_grad()
def span_logprobs(
    model: HookedTransformer, span_ids: Int[Tensor, "batch length"], layout: Layout
) -> Float[Tensor, "batch length d_vocab"]:
    """log p(v | everything before span position j) for every span position j (zeros where the
    position has nothing before it)."""
    tokens = layout.assemble(span_ids)
    _, final = run_objectives(model, [], tokens, start=layout.start, final_from=layout.xe_from - 1)
    assert final is not None  # given final_from, run_objectives returns the final residuals
    n_pred = layout.span.stop - layout.xe_from
    logp = torch.log_softmax(unembed(model, final[:, :n_pred]).float(), dim=-1)
    skip = layout.length - n_pred  # the first span token without a start token or prefix
    return F.pad(logp, (0, 0, skip, 0))


@torch.no_grad()
def next_token_logprobs(
    model: HookedTransformer, partial: Int[Tensor, "batch t"], layout: Layout
) -> Float[Tensor, "batch d_vocab"]:
    """log p(next token | start token, prefix, partial prompt): the model's own proposals."""
    b = partial.shape[0]
    tokens = torch.cat([torch.tensor(layout.head, dtype=torch.long).expand(b, -1), partial], dim=1)
    _, final = run_objectives(model, [], tokens.to(model.cfg.device), start=0, final_from=tokens.shape[1] - 1)
    assert final is not None
    return torch.log_softmax(unembed(model, final).float()[:, -1], dim=-1).cpu()


def sample_prompts(
    model: HookedTransformer,
    n: int,
    layout: Layout,
    banned: Bool[Tensor, " d_vocab"],
    gen: torch.Generator,
    *,
    temperature: float = 1.0,
    tries: int = 20,
) -> tuple[Int[Tensor, "n length"] | None, int]:
    """n prompts sampled from the model itself, token by token after the start token and prefix
    (banned tokens excluded), each re-tokenizing to itself in context; rows that do not are sampled
    again. Returns the prompts (None when some row never re-tokenized) and the token-forwards spent."""
    if not layout.head:
        return None, 0  # nothing to sample the first token from
    out = torch.zeros((n, layout.length), dtype=torch.long)
    todo = torch.arange(n)
    spent = 0
    for _ in range(tries):
        rows = torch.zeros((len(todo), 0), dtype=torch.long)
        for t in range(layout.length):
            logp = next_token_logprobs(model, rows, layout)
            spent += len(todo) * (len(layout.head) + t)
            logp[:, banned] = float("-inf")
            probs = torch.softmax(logp / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=gen)
            rows = torch.cat([rows, nxt], dim=1)
        ok, _ = retokenizes(model, rows, layout)
        out[todo[ok]] = rows[ok]
        todo = todo[~ok]
        if len(todo) == 0:
            return out, spent
    return None, spent
