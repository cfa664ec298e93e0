"""ADAPT's beam search: B partial prompts grown left to right, slot i kept under its own fluency penalty
lam_i; each grows by one token per step, proposed by the model's own next-token distribution (fluent) and
by the gradient (active); every candidate is scored by `f / s - lam_i * xe`, s the spread of f over the
step's candidates (`optim.adapt` turns the beams into the members of its mutation phase).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..errors import DreamError
from ..objectives import Objective, ObjectiveError
from ..scoring import GRADIENT_COST, Evaluator, Layout, retokenizes
from .config import ADAPTConfig
from .members import allowed_tokens
from .sampling import next_token_logprobs

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


def spread(f: Float[Tensor, " n"]) -> float:
    """The activation's scale among candidates: the standard deviation of the finite values (1.0 when
    there is no spread to measure), so that penalties are in units of it."""
    v = f[torch.isfinite(f)].double()
    s = float(v.std(unbiased=False)) if v.numel() > 1 else 0.0
    return s if s > 1e-12 else 1.0


def _readable(model: HookedTransformer, objective: Objective, layout: Layout) -> bool:
    """Whether the objective can be read on prompts of this layout (a fixed position may lie beyond
    a partial prompt)."""
    check = getattr(objective, "check_positions", None)
    if check is not None:
        try:
            check(model, layout.seq_len, layout.start)
        except ObjectiveError:
            return False
        return True
    n = layout.seq_len - layout.start
    for _, leaf in objective.terms:
        pos = getattr(leaf, "reduce", "last")
        if isinstance(pos, int) and not -n <= pos < n:
            return False
    return True



@dataclass
class BeamTrace:
    """What the beam search did, step by step: the beams kept and the tokens proposed."""

    beams: list[Tensor] = field(default_factory=list)  # [B, t+1] after step t
    proposals: list[Tensor] = field(default_factory=list)  # [n_beams, proposals] new tokens at step t


class BeamWidths(NamedTuple):
    """Proposals per beam and step: from the model's next-token distribution (`lm`) and from the
    gradient (`grad`)."""

    lm: int
    grad: int


def beam_sizes(cfg: ADAPTConfig, layout: Layout) -> BeamWidths:
    """(beam_lm, beam_grad), shrunk together until the beam search's cost fits `beam_share` of the
    token budget (never below one proposal of each kind)."""
    k_lm, k_grad = cfg.beam_lm, cfg.beam_grad
    if cfg.max_token_forwards is None:
        return BeamWidths(k_lm, k_grad)
    cap = cfg.beam_share * cfg.max_token_forwards
    while beam_cost(cfg.beams, k_lm, k_grad, layout) > cap and (k_lm > 1 or k_grad > min(1, cfg.beam_grad)):
        k_lm, k_grad = max(1, k_lm * 3 // 4), max(min(1, cfg.beam_grad), k_grad * 3 // 4)
    return BeamWidths(k_lm, k_grad)


def beam_cost(beams: int, k_lm: int, k_grad: int, layout: Layout) -> int:
    """Token-forwards of a beam search (an upper bound: deduplication only saves)."""
    total, n = 0, 1 if layout.head else beams
    head, tail = len(layout.head), len(layout.tail)
    for t in range(0 if layout.head else 1, layout.length):
        seq = head + t + 1 + tail
        total += n * (head + t)  # next-token distribution
        total += GRADIENT_COST * n * seq if k_grad else 0
        total += n * (k_lm + k_grad) * seq
        n = beams
    return total


def beam_search(
    ev: Evaluator,
    lams: Float[Tensor, " beams"],
    banned: Bool[Tensor, " d_vocab"],
    gen: torch.Generator,
    widths: BeamWidths,
    trace: BeamTrace | None = None,
) -> tuple[Int[Tensor, "pool length"], Float[Tensor, " pool"], Float[Tensor, " pool"]]:
    """Grow B prompts left to right in `ev`'s layout, slot i keeping the best candidate under
    `f / s - lams[i] * xe` (f: `ev`'s one objective; s: the spread of f over the step's candidates),
    each beam proposing `widths` new tokens a step. Returns the last step's candidates (full prompts,
    scored and recorded by `ev` at iteration 0), from which each member takes its start.

    Partial prompts are scored with the suffix after them, by Evaluators of their own length (with
    `ev`'s batching) whose compute is added to `ev`'s counters."""
    if len(ev.objectives) != 1:
        raise DreamError(f"the beam search climbs one objective; its evaluator scores {len(ev.objectives)}")
    model, objective, layout = ev.model, ev.objectives[0], ev.layout
    k_lm, k_grad = widths
    B, L = len(lams), layout.length
    allowed = allowed_tokens(banned)
    if layout.head:
        beams = torch.zeros((1, 0), dtype=torch.long)
    else:  # nothing to predict the first token from: start from random ones
        beams = allowed[torch.randint(len(allowed), (B, 1), generator=gen)]
        if trace is not None:
            trace.beams.append(beams.clone())
    nll = torch.zeros(beams.shape[0], dtype=torch.float64)  # summed -log p of each beam, for unreadable steps
    for t in range(beams.shape[1], L):
        n = beams.shape[0]
        sub = layout.with_length(t + 1)
        logp = next_token_logprobs(model, beams, layout)
        ev.compute.add_tokens(n * (len(layout.head) + t))
        logp[:, banned] = float("-inf")
        lm_top = logp.topk(k_lm, dim=-1).indices  # [n, k_lm]
        readable = t == L - 1 or _readable(model, objective, sub)
        step_ev = ev if t == L - 1 else Evaluator(model, [objective], sub, ev.batching)
        proposals = lm_top
        if k_grad and readable:
            # The gradient at the new position, linearized around the model's favourite token there
            # (a pass the evaluator also keeps, so the candidates can reuse its prefix).
            around = torch.cat([beams, lm_top[:, :1]], dim=1)
            zeros = torch.zeros(n, dtype=torch.long)
            grad = step_ev.gradients(around, zeros, zeros.double())[:, -1].cpu()
            grad[:, banned] = float("inf")
            grad.scatter_(1, lm_top, float("inf"))  # propose different tokens than the model does
            proposals = torch.cat([lm_top, (-grad).topk(k_grad, dim=-1).indices], dim=1)
        k = proposals.shape[1]
        cand = torch.cat([beams.repeat_interleave(k, dim=0), proposals.reshape(-1, 1)], dim=1)  # [n*k, t+1]
        if trace is not None:
            trace.proposals.append(proposals.clone())
        if readable:
            f, xe, ok = step_ev.evaluate(cand, torch.zeros(len(cand), dtype=torch.long), 0)
            loss = -f[None, :] / spread(f) + lams[:, None].double() * xe[None, :]  # [B, n*k]
            cand_nll = torch.zeros(len(cand), dtype=torch.float64)
        else:  # the objective cannot be read yet (a fixed position beyond this step): grow fluently
            ok, _ = retokenizes(model, cand, sub)
            cand_nll = nll.repeat_interleave(k) - logp.gather(1, proposals).reshape(-1).double()
            loss = cand_nll[None, :].expand(B, -1).clone()
            f = torch.zeros(len(cand), dtype=torch.float64)
            xe = cand_nll / max(1, t + 1 - (sub.xe_from - len(layout.head)))
        if step_ev is not ev:
            ev.compute.merge(step_ev.compute)
        loss[:, ~ok] = float("inf")
        if t == L - 1:
            return cand, f, xe
        keep = _distinct_argmins(loss, cand)
        beams, nll = cand[keep], cand_nll[keep]
        if trace is not None:
            trace.beams.append(beams.clone())
    return beams, torch.full((B,), float("-inf"), dtype=torch.float64), torch.full((B,), float("inf"), dtype=torch.float64)


def _distinct_argmins(loss: Float[Tensor, "slots n"], cand: Int[Tensor, "n t"]) -> Tensor:
    """For slot i in turn, the candidate with the lowest loss_i not taken by an earlier slot and not
    equal to one taken; if none is left, the slot repeats its best."""
    taken: set[tuple[int, ...]] = set()
    out = []
    for i in range(loss.shape[0]):
        order = torch.argsort(loss[i], stable=True)
        pick = int(order[0])
        for j in order.tolist():
            key = tuple(cand[j].tolist())
            if not math.isfinite(float(loss[i, j])):
                break
            if key not in taken:
                pick = j
                break
        taken.add(tuple(cand[pick].tolist()))
        out.append(pick)
    return torch.tensor(out, dtype=torch.long)
