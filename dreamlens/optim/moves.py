"""Moves that do not come from the gradient: a swap to a token the model itself expects there, and
insertions and deletions (FLRT's delete / insert).

At one length (`shifts`) the span keeps its length, so every prompt shares one batch: an insertion at
position p drops the first token (`t1 .. t(p-1), new, tp .. tL`), a deletion at p gives the prompt a new
first token (`new, t0 .. t(p-1), t(p+1) .. tL`). The last tokens, where most objectives read, stay
where they are. With a length range (`resizes`) they change the length instead: an insertion at p
gives `t0 .. t(p-1), new, tp ..` (one token longer), a deletion drops tp (one shorter). New tokens are
sampled from the parent's own next-token distribution at the position (`sampling.span_logprobs`),
banned tokens excluded.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor


def _sample(
    logp: Float[Tensor, "n d_vocab"], banned: Bool[Tensor, " d_vocab"], gen: torch.Generator
) -> Int[Tensor, " n"]:
    lp = logp.float().clone()
    lp[:, banned] = float("-inf")
    return torch.multinomial(torch.softmax(lp, dim=-1), 1, generator=gen).view(-1)


def model_swaps(
    parents: Int[Tensor, "members length"], logp: Float[Tensor, "members length d_vocab"],
    banned: Bool[Tensor, " d_vocab"], n: int, gen: torch.Generator,
) -> Int[Tensor, "members_x_n length"]:
    """n children per parent, each with one random position swapped for a token sampled from the
    model's distribution there."""
    M, L = parents.shape
    if n == 0:
        return parents.new_zeros((0, L))
    pos = torch.randint(L, (M, n), generator=gen)
    rows = torch.arange(M).unsqueeze(1).expand(M, n)
    new = _sample(logp[rows, pos].reshape(M * n, -1), banned, gen).view(M, n)
    children = parents.unsqueeze(1).repeat(1, n, 1)
    children[rows, torch.arange(n).expand(M, n), pos] = new
    return children.view(M * n, L)


def shifts(
    parents: Int[Tensor, "members length"], logp: Float[Tensor, "members length d_vocab"],
    banned: Bool[Tensor, " d_vocab"], n: int, gen: torch.Generator,
) -> Int[Tensor, "members_x_n length"]:
    """n children per parent, each an insertion or a deletion (even odds) at a random position 1..L-1
    (at 0 either would be a swap). An inserted token is sampled from the distribution after the
    parent's tokens before p; a deletion's new first token from the distribution at the start."""
    M, L = parents.shape
    if L < 2 or n == 0:
        return parents.new_zeros((0, L))
    pos = torch.randint(1, L, (M, n), generator=gen)
    insert = torch.rand((M, n), generator=gen) < 0.5
    rows = torch.arange(M).unsqueeze(1).expand(M, n)
    at = torch.where(insert, pos, torch.zeros_like(pos))  # where the new token's distribution is read
    new = _sample(logp[rows, at].reshape(M * n, -1), banned, gen).view(M, n)
    out = parents.new_empty((M, n, L))
    for m in range(M):
        p_m = parents[m]
        for j in range(n):
            p, t = int(pos[m, j]), new[m, j : j + 1]
            if insert[m, j]:
                out[m, j] = torch.cat([p_m[1:p], t, p_m[p:]])
            else:
                out[m, j] = torch.cat([t, p_m[:p], p_m[p + 1 :]])
    return out.view(M * n, L)


def resizes(
    parents: Int[Tensor, "members length"], logp: Float[Tensor, "members length d_vocab"],
    banned: Bool[Tensor, " d_vocab"], n: int, gen: torch.Generator, lengths: tuple[int, int],
) -> list[Int[Tensor, " new_length"]]:
    """n children per parent (all of one length L), each an insertion (length L+1) or a deletion (L-1)
    at a random position 0..L-1, even odds, within `lengths` (shortest, longest): at the longest length
    every child is a deletion, at the shortest an insertion. An inserted token is sampled from the
    distribution after the parent's tokens before its position."""
    M, L = parents.shape
    lo, hi = lengths
    if n == 0 or not lo <= L <= hi or lo == hi:
        return []
    pos = torch.randint(L, (M, n), generator=gen)
    insert = torch.rand((M, n), generator=gen) < 0.5
    if hi <= L:
        insert[:] = False
    elif lo >= L:
        insert[:] = True
    rows = torch.arange(M).unsqueeze(1).expand(M, n)
    new = _sample(logp[rows, pos].reshape(M * n, -1), banned, gen).view(M, n)
    out = []
    for m in range(M):
        p_m = parents[m]
        for j in range(n):
            p = int(pos[m, j])
            if insert[m, j]:
                out.append(torch.cat([p_m[:p], new[m, j : j + 1], p_m[p:]]))
            else:
                out.append(torch.cat([p_m[:p], p_m[p + 1 :]]))
    return out
