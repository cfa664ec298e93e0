"""A mode's key tokens (what its best prompt's activation rests on, banned for the modes after it) and
their nearest neighbours in the embedding (banned with them, so " North", "north" and " northern" go
together).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from ..analysis.attribution import Attribution


def key_tokens(att: Attribution, n_key: int) -> list[int]:
    """The tokens of an attributed prompt whose swap costs the most activation: the prompt's value
    minus the median over each position's replacements, the `n_key` largest positive drops."""
    drop = att.value - np.median(att.alt_values, axis=1)
    order = [int(i) for i in np.argsort(-drop, kind="stable") if drop[i] > 0][:n_key]
    return list(dict.fromkeys(int(att.ids[i]) for i in order))


def embedding_neighbours(model: HookedTransformer, tokens: list[int], k: int) -> list[int]:
    """Each token and its `k - 1` nearest tokens by cosine of the embedding rows (W_E)."""
    if not tokens:
        return []
    w = model.W_E.detach().float()
    w = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sims = w[torch.tensor(tokens, device=w.device)] @ w.T  # [n, vocab]
    near = sims.topk(min(k, w.shape[0]), dim=-1).indices.cpu()
    return sorted({int(t) for t in tokens} | {int(t) for t in near.flatten()})
