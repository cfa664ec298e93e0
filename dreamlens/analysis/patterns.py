"""Activation patterns: what the model computes at an objective's hooks for a prompt and how the
objective reads it there (its readout); how alike two prompts are by both; which top dataset examples
resemble each mode of a dream most.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, cast

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from ..objectives import Objective
from ..objectives import objective as parse_objective
from ..objectives.forward import Capture, forward_capture, leaves
from ..scoring import make_layout

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from ..results import DreamResult
    from .scan import ScanResult


def activation_patterns(
    model: HookedTransformer, objective: Objective | str, prompts: Sequence[Sequence[int]]
) -> Float[Tensor, "n d"]:
    """Each prompt's pattern at the objective's hooks: the activation of every hook the objective reads,
    at the position it is read (the last one, or its fixed position `@POS`), flattened and concatenated.
    Prompts are full token sequences (start token included) and may differ in length; those of one
    length share a forward pass."""
    return _patterns(model, objective, prompts, readout=False)[0]


def readouts(
    model: HookedTransformer, objective: Objective | str, prompts: Sequence[Sequence[int]]
) -> tuple[Float[Tensor, "n d"], Float[Tensor, "n r"]]:
    """Each prompt's activation pattern (as `activation_patterns`) and its *readout*: the gradient of the
    objective with respect to every hook activation it reads, summed over positions, flattened and
    concatenated: the direction in which the objective reads the hook at that prompt. A single SAE
    latent or neuron reads one direction everywhere; `max(A, B)` reads A's where A is the larger term."""
    pats, reads = _patterns(model, objective, prompts, readout=True)
    assert reads is not None
    return pats, reads


def pattern_similarity(
    a: tuple[Float[Tensor, "na d"], Float[Tensor, "na r"]],
    b: tuple[Float[Tensor, "nb d"], Float[Tensor, "nb r"]],
    center: Float[Tensor, " d"],
) -> Float[Tensor, "na nb"]:
    """How alike two sets of prompts are at an objective's hooks, from their `readouts`: the mean of the
    cosine of the activation patterns (after subtracting `center`, e.g. the top examples' mean pattern,
    which all of them share) and the cosine of the readouts. 1: the same activation read the same way."""
    norm = torch.nn.functional.normalize
    acts = norm(a[0] - center, dim=-1) @ norm(b[0] - center, dim=-1).T
    reads = norm(a[1], dim=-1) @ norm(b[1], dim=-1).T
    return (acts + reads) / 2


def _patterns(
    model: HookedTransformer, objective: Objective | str, prompts: Sequence[Sequence[int]], readout: bool
) -> tuple[Float[Tensor, "n d"], Float[Tensor, "n r"] | None]:
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
    grads: list[Tensor | None] = [None] * len(prompts)
    for idx in rows.values():
        tokens = torch.tensor([list(prompts[j]) for j in idx], dtype=torch.long, device=model.cfg.device)
        with torch.no_grad():
            cap, _ = forward_capture(model, parts, tokens)
        # a fixed position counts from the start of the prompt (after the start token), as the objective reads it
        at = {h: cap.start + p if p >= 0 else p for h, p in pos.items()}
        pats = torch.cat([cap.acts[h][:, at[h]].flatten(1).float() for h in hooks], dim=1).cpu()
        for j, p in zip(idx, pats):
            out[j] = p
        if readout:
            for j, g in zip(idx, _readout(model, obj, cap, hooks)):
                grads[j] = g
    pats_out = torch.stack(cast("list[Tensor]", out)) if out else torch.zeros((0, 0))
    if not readout:
        return pats_out, None
    return pats_out, torch.stack(cast("list[Tensor]", grads)) if grads else torch.zeros((0, 0))


def _readout(model: HookedTransformer, obj: Objective, cap: Capture, hooks: list[str]) -> Float[Tensor, "batch r"]:
    """The gradient of the objective's value with respect to the captured hook activations (no model
    pass: the objective is computed again from them), summed over positions."""
    with torch.enable_grad():
        acts = {h: a.detach().float().requires_grad_(True) for h, a in cap.acts.items()}
        fresh = Capture(acts=acts, logits=None if cap.logits is None else cap.logits.detach(), start=cap.start, model=model)
        obj.value(fresh).sum().backward()
    n = next(iter(cap.acts.values())).shape[0] if cap.acts else 0
    cols = [torch.zeros(n, 0)]
    for h in hooks:
        g = acts[h].grad
        g = torch.zeros_like(acts[h]) if g is None else g
        cols.append(g[:, cap.start:].sum(dim=1).flatten(1).cpu())
    return torch.cat(cols, dim=1)


class RankedDreams(Protocol):
    """What `nearest_examples` reads of a set of dreams of one objective, e.g. `dreamlens.Modes`: the
    objective, the dreams and each one's best prompt at the fluency limit (None: none that fluent)."""

    objective: str
    dreams: list[DreamResult]

    def __len__(self) -> int: ...

    def best(self, i: int) -> pd.Series | None: ...


def nearest_examples(model: HookedTransformer, modes: RankedDreams, scan: ScanResult, objective_index: int | None = None,
                     k: int = 5) -> list[pd.DataFrame]:
    """For each mode (its best prompt at the fluency limit), the `k` top dataset examples most like it
    by `pattern_similarity` (activation patterns centered on the examples' mean, which all of them
    share, and readouts). Each frame: the example's rank in the scan, text, activation, xe and
    `similarity`, closest first. A mode with no prompt at the limit gets an empty frame."""
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
    pats, reads = readouts(model, modes.objective, examples + prompts)
    n = len(examples)
    center = pats[:n].mean(dim=0)
    sim = pattern_similarity((pats[n:], reads[n:]), (pats[:n], reads[:n]), center).numpy()  # [modes with a prompt, examples]
    out = [pd.DataFrame(columns=["rank", "text", "activation", "xe", "similarity"]) for _ in range(len(modes))]
    for row, i in enumerate(which):
        order = np.argsort(-sim[row], kind="stable")[:k]
        t = top.iloc[order]
        out[i] = pd.DataFrame({"rank": order + 1, "text": t["text"].to_numpy(), "activation": t["activation"].to_numpy(),
                               "xe": t["xe"].to_numpy(), "similarity": sim[row][order]}).reset_index(drop=True)
    return out

