"""Activation patterns: what the model computes at an objective's hooks for a prompt, and which top
dataset examples resemble each mode of a dream most (cosine of centered patterns).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from ..objectives import Objective
from ..objectives import objective as parse_objective
from ..objectives.base import leaves
from ..objectives.forward import forward_capture

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from ..optim.modes import Modes
    from .scan import ScanResult


def activation_patterns(
    model: HookedTransformer, objective: Objective | str, prompts: Sequence[Sequence[int]]
) -> Float[Tensor, "n d"]:
    """Each prompt's pattern at the objective's hooks: the activation of every hook the objective reads,
    at the position it is read (the last one, or its fixed position `@POS`), flattened and concatenated.
    Prompts are full token sequences (start token included) and may differ in length; those of one
    length share a forward pass."""
    obj = parse_objective(objective)
    parts = leaves([obj])
    hooks = list(dict.fromkeys(h for o in parts for h in o.hooks))
    pos = dict.fromkeys(hooks, -1)
    for o in parts:
        r = getattr(o, "reduce", "last")
        if isinstance(r, int):
            pos.update(dict.fromkeys(o.hooks, r))
    rows: dict[int, list[int]] = {}  # prompts of one length go through the model together
    for j, ids in enumerate(prompts):
        rows.setdefault(len(ids), []).append(j)
    out: list[Tensor | None] = [None] * len(prompts)
    with torch.no_grad():
        for idx in rows.values():
            tokens = torch.tensor([list(prompts[j]) for j in idx], dtype=torch.long, device=model.cfg.device)
            cap, _ = forward_capture(model, parts, tokens)
            # a fixed position counts from the start of the prompt (after the start token), as the objective reads it
            at = {h: cap.start + p if p >= 0 else p for h, p in pos.items()}
            pats = torch.cat([cap.acts[h][:, at[h]].flatten(1).float() for h in hooks], dim=1).cpu()
            for j, p in zip(idx, pats):
                out[j] = p
    return torch.stack(cast("list[Tensor]", out)) if out else torch.zeros((0, 0))


def nearest_examples(model: HookedTransformer, modes: Modes, scan: ScanResult, objective_index: int | None = None,
                     k: int = 5) -> list[pd.DataFrame]:
    """For each mode (its best prompt at the fluency limit), the `k` top dataset examples whose
    patterns are closest in cosine, after subtracting the examples' mean pattern (what all of them
    share would otherwise dominate). Each frame: the example's rank in the scan, text, activation,
    xe and `cosine`, closest first. A mode with no prompt at the limit gets an empty frame."""
    from ..scoring import make_layout

    def scored_as(ids: Sequence[int], prefix: str = "", suffix: str = "") -> list[int]:
        """The whole sequence a prompt is scored as: start token, prefix, the tokens, suffix."""
        return make_layout(model, len(ids), prefix, suffix).assemble(torch.tensor([list(ids)])).tolist()[0]

    top = scan.top(scan.index(modes.objective) if objective_index is None else objective_index)
    examples = [scored_as([int(t) for t in ids]) for ids in top["ids"]]
    prompts, which = [], []
    for i in range(len(modes)):
        b = modes.best(i)
        if b is not None:
            r = modes.dreams[i]
            prompts.append(scored_as([int(t) for t in b["ids"]], r.prefix, r.suffix))
            which.append(i)
    pats = activation_patterns(model, modes.objective, examples + prompts)
    ex, dr = pats[: len(examples)], pats[len(examples):]
    mean = ex.mean(dim=0, keepdim=True)
    ex_c = torch.nn.functional.normalize(ex - mean, dim=-1)
    dr_c = torch.nn.functional.normalize(dr - mean, dim=-1)
    cos = (dr_c @ ex_c.T).numpy()  # [modes with a prompt, examples]
    out = [pd.DataFrame(columns=["rank", "text", "activation", "xe", "cosine"]) for _ in range(len(modes))]
    for row, i in enumerate(which):
        order = np.argsort(-cos[row], kind="stable")[:k]
        t = top.iloc[order]
        out[i] = pd.DataFrame({"rank": order + 1, "text": t["text"].to_numpy(), "activation": t["activation"].to_numpy(),
                               "xe": t["xe"].to_numpy(), "cosine": cos[row][order]}).reset_index(drop=True)
    return out

