"""ADAPT ("Hybrid Prompt Optimization for LLM Feature Visualization", Cardoso et al. 2026): a beam search
(`optim.beam`) grows fluent prompts left to right, then adaptive gradient-guided mutation climbs the objective.

Beam search: B partial prompts, slot i kept under its own fluency penalty lam_i; each grows by one token
per step, proposed by the model's own next-token distribution (fluent) and by the gradient (active);
every candidate is scored by `f / s - lam_i * xe`, s the spread of f over the step's candidates, so the
penalties mean the same for a neuron of scale 0.1 and a latent of scale 100. Mutation: the B beams
become B members of a population, each minimizing `-f / s + lam_i * xe` (s fixed from the full-length
candidates) by GCG-style swaps whose strength (positions changed, top-k width, sampling temperature)
rises while the member stalls and falls when it improves.

Beyond the paper (ADAPTConfig): candidate starts (`init_prompts`, e.g. dataset examples) replace the
beam search, the members taking those that cover the starts' activation-fluency region; a share of the
children may come from the model's own distribution (`lm_share`) or shift the prompt by an insertion
or a deletion (`shift_share`, `optim.moves`); with a length range (`min_length` / `max_length`) those
insertions and deletions grow and shrink the prompt instead (`step_lengths`: the members and children
of each length go through passes of their own length); `lineage` keeps each member to its own
children, and `restart_patience` moves a stalled member to the best unused start.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..models import bos_token_id
from ..objectives import Objective
from ..results import DreamResult
from ..scoring import Batching, Evaluator, Layout, LengthEvaluators, check_not_constant
from .beam import beam_search, beam_sizes, spread
from .config import ADAPTConfig
from .loop import Callback, Method, check_resume, load_resume, objective_folder, prepare, run
from .members import MemberState, Prompts, allowed_tokens, cover, initial_span, random_prompts, select_members, start_pool
from .moves import model_swaps, resizes, shifts
from .sampling import span_logprobs
from .self_scan import self_scan_starts

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


# ---------------------------------------------------------------------------------------------
# Adaptive mutation strength


@dataclass
class MutationStrength:
    """One member's mutation strength in [0, 1]: it rises by `step` after `patience` iterations
    without improvement and falls by `step` on every improvement."""

    level: float = 0.0
    stall: int = 0

    def update(self, improved: bool, cfg: ADAPTConfig) -> None:
        if improved:
            self.level, self.stall = max(0.0, self.level - cfg.step), 0
            return
        self.stall += 1
        if self.stall >= cfg.patience:
            self.level, self.stall = min(1.0, self.level + cfg.step), 0

    def positions(self, cfg: ADAPTConfig, length: int) -> int:
        return min(length, 1 + round(self.level * (cfg.max_positions - 1)))

    def topk(self, cfg: ADAPTConfig) -> int:
        return round(math.exp(_lerp(math.log(cfg.topk_min), math.log(cfg.topk_max), self.level)))

    def temperature(self, cfg: ADAPTConfig) -> float:
        return math.exp(_lerp(math.log(cfg.temp_min), math.log(cfg.temp_max), self.level))


def _lerp(a: float, b: float, t: float) -> float:
    return a + (b - a) * t


# ---------------------------------------------------------------------------------------------
# Mutation


def mutate(
    parents: Int[Tensor, "members length"],
    scores: Float[Tensor, "members length d_vocab"],
    strengths: Sequence[MutationStrength],
    cfg: ADAPTConfig,
    gen: torch.Generator,
    children: int | None = None,
) -> Int[Tensor, "members_x_children length"]:
    """`children` (default `cfg.children`) children per member: each changes `positions` distinct positions, each to a
    token sampled from the top-`topk` of that position's proposal scores at `temperature` (in units
    of the top-k scores' spread, so the temperature means the same for any objective scale)."""
    L = parents.shape[1]
    C = cfg.children if children is None else children
    if C == 0:
        return parents.new_zeros((0, L))
    n_allowed = int(torch.isfinite(scores[0, 0]).sum())  # the banned tokens are the same everywhere
    kmax = min(max(s.topk(cfg) for s in strengths), n_allowed)
    top_v, top_i = scores.topk(kmax, dim=-1)  # [M, L, kmax]
    out = []
    for m, s in enumerate(strengths):
        n, k, temp = s.positions(cfg, L), min(s.topk(cfg), top_v.shape[-1]), s.temperature(cfg)
        v = top_v[m, :, :k].double()
        spread = v.std(dim=1, unbiased=False, keepdim=True).clamp_min(1e-9)
        probs = torch.softmax((v - v[:, :1]) / (temp * spread), dim=1)
        pos = torch.rand((C, L), generator=gen).argsort(dim=1)[:, :n]  # [C, n] distinct positions
        pick = torch.multinomial(probs[pos.flatten()], 1, generator=gen).view(C, n)
        child = parents[m].repeat(C, 1)
        child.scatter_(1, pos, top_i[m][pos, pick])
        out.append(child)
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# The run


def adapt(
    model: HookedTransformer,
    objective: Objective | str | Sequence[Objective | str],
    config: ADAPTConfig | None = None,
    *,
    callback: Callback | None = None,
    resume: DreamResult | str | Path | Sequence[Any] | None = None,
    progress: bool = True,
) -> DreamResult | list[DreamResult]:
    """Dream with ADAPT. One objective gives a DreamResult; a list gives one result per objective
    (each its own run; `max_token_forwards` is per objective).

    Ctrl-C, a callback returning True, or the token budget end the run early and return what was found;
    `resume=` continues a saved run (same config; more iters allowed) from its last mutation iteration."""
    cfg = config or ADAPTConfig()
    objs, single, layout, banned = prepare(model, objective, cfg)
    prev = None
    if resume is not None:
        prev = load_resume(resume, len(objs))
        check_resume(prev, objs, cfg, "adapt")
    out: list[DreamResult] = []
    for k, o in enumerate(objs):
        folder = cfg.checkpoint_dir
        if folder is not None and not single:
            folder = objective_folder(folder, k)
        method = ADAPT(model, o, cfg, layout, banned, index=k)
        out += run(method, resume=None if prev is None else [prev[k]], callback=callback, progress=progress, folder=folder)
    return out[0] if single else out


class ADAPT(Method):
    """ADAPT on the loop, for one objective (index `index` of the user's list): `start` runs the beam
    search (or scores the user's prompt), each step one mutation iteration."""

    name = "adapt"
    budget_first = True  # the beam search may spend the whole budget
    cfg: ADAPTConfig
    states: list[ADAPTState]  # type: ignore[assignment]  # set by start / restore, before any step

    def __init__(
        self, model: HookedTransformer, objective: Objective, cfg: ADAPTConfig, layout: Layout, banned: Tensor, index: int = 0
    ):
        ev = Evaluator(model, [objective], layout, Batching.of(cfg))
        super().__init__(model, [objective], cfg, layout, ev, indices=[index])
        self.desc = f"adapt {index}" if index else "adapt"
        self.banned = banned
        self.unit = torch.tensor(cfg.penalties(), dtype=torch.float64)  # penalties per spread of the activation
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.init_span: Tensor | None = None
        self.lengths = LengthEvaluators(ev)  # with a length range: the evaluator of each length

    def init(self) -> None:
        """Check, before any search, that the objective can be climbed from the user's prompt or random ones."""
        cfg, model, layout = self.cfg, self.model, self.layout
        self.init_span = initial_span(model, cfg, layout)
        probe = self.init_span
        if probe is None:
            probe = random_prompts(model, 2, layout, allowed_tokens(self.banned), self.generator)
        check_not_constant(model, self.objectives[0], probe.to(model.cfg.device), layout)

    def start(self) -> None:
        """The members' first prompts (each the best of the beam search's last candidates under its own
        penalty) and the penalties in activation units."""
        cfg, ev, unit = self.cfg, self.ev, self.unit
        prompts = cfg.init_prompts
        share = cfg.self_scan_share()
        if share and cfg.self_scan is None and bos_token_id(self.model) is None:
            share = 0.0  # the default's self-scan samples after the start token; without one, the beam search
        if prompts is None and self.init_span is None and share:
            assert cfg.max_token_forwards is not None  # a share is only set (or allowed) with a budget
            prompts, spent = self_scan_starts(self.model, self.objectives[0], int(share * cfg.max_token_forwards),
                                              self.layout.length, self.banned, torch.Generator().manual_seed(cfg.seed))
            ev.compute.add_tokens(spent)
            prompts = prompts or None  # no window fired: the beam search
        pool = start_pool(prompts)
        reserve = None
        if pool is not None:  # candidate starts (dataset examples): scored (charged); the members cover them
            pool_f, pool_xe, _ = ev.evaluate(pool, torch.zeros(len(pool), dtype=torch.long), 0)
            keep = cover(pool_f, pool_xe, cfg.beams)
            ok = torch.isfinite(pool_f) & torch.isfinite(pool_xe)
            scale = spread(pool_f[ok]) if int(ok.sum()) > 1 else max(abs(float(pool_f[keep[0]])), 1e-6)
            if cfg.restart_patience:  # the valid starts no member took: where restarts go
                spare = ok.clone()
                spare[keep] = False
                reserve = (pool[spare], pool_f[spare], pool_xe[spare])
            pool, pool_f, pool_xe = pool[keep], pool_f[keep], pool_xe[keep]
        elif self.init_span is not None:
            pool = self.init_span
            pool_f, pool_xe, _ = ev.evaluate(pool, torch.zeros(1, dtype=torch.long), 0)
            # The spread of the activation over every single-token change of the initial prompt's
            # first position would cost a batch; its own magnitude is a cheap, scale-true stand-in.
            scale = max(abs(float(pool_f[0])), 1e-6) if torch.isfinite(pool_f[0]) else 1.0
        else:
            pool, pool_f, pool_xe = beam_search(ev, unit, self.banned, self.generator, beam_sizes(cfg, self.layout))
            scale = spread(pool_f)
        lams = unit * scale  # in activation units per nat, from here on
        # Covered starts are the members as they are (most active under the lowest penalty); otherwise
        # each member takes the best start under its own penalty.
        best = torch.arange(cfg.beams) if prompts is not None else select_members(pool_f, pool_xe, lams)
        strengths = [MutationStrength() for _ in range(cfg.beams)]
        self.states = [ADAPTState(pool[best].clone(), pool_f[best], pool_xe[best], self.generator, strengths, lams, unit,
                                  reserve=reserve)]

    def restore(self, states: list[dict[str, Any]]) -> None:
        self.states = [ADAPTState.from_dict(states[0], self.unit)]

    def step(self, iteration: int) -> None:
        if self.cfg.variable_length:
            self.step_lengths(iteration)
            return
        cfg, s = self.cfg, self.states[0]
        members = s.matrix()
        owner = torch.zeros(len(members), dtype=torch.long)
        # First-order change of each member's loss for each swap: the exact one-hot gradient,
        # which includes the swapped token's own cross-entropy (its direct term).
        scores = -self.ev.gradients(members.to(self.model.cfg.device), owner, s.penalties).cpu().double()
        scores[..., self.banned] = float("-inf")
        M = len(members)
        n_lm, n_shift = round(cfg.children * cfg.lm_share), round(cfg.children * cfg.shift_share)
        children = mutate(members, scores, s.strengths, cfg, s.generator, cfg.children - n_lm - n_shift)
        parent = torch.arange(M).repeat_interleave(cfg.children - n_lm - n_shift)
        if n_lm or n_shift:  # the model's own proposals: one more pass over the members (charged)
            logp = span_logprobs(self.model, members.to(self.model.cfg.device), self.layout).cpu()
            self.ev.compute.add_tokens(M * self.layout.seq_len)
            swaps = model_swaps(members, logp, self.banned, n_lm, s.generator)
            moved = shifts(members, logp, self.banned, n_shift, s.generator)
            children = torch.cat([children, swaps, moved])
            parent = torch.cat([parent, torch.arange(M).repeat_interleave(len(swaps) // M),
                                torch.arange(M).repeat_interleave(len(moved) // M)])
        f, xe, _ = self.ev.evaluate(children, torch.zeros(len(children), dtype=torch.long), iteration)
        self.update_members(children, parent, f, xe)

    def step_lengths(self, iteration: int) -> None:
        """One iteration with a length range: the members of each length get their gradients, swaps and
        model proposals from passes of their own length; insertions and deletions (`moves.resizes`) make
        children one token longer or shorter; every child is scored in passes of its own length."""
        cfg, s, device = self.cfg, self.states[0], self.model.cfg.device
        s.members = [m.clone() for m in s.members]  # one row per member, whatever its length
        n_lm, n_shift = round(cfg.children * cfg.lm_share), round(cfg.children * cfg.shift_share)
        n_grad = cfg.children - n_lm - n_shift
        groups: dict[int, list[int]] = {}
        for i, m in enumerate(s.members):
            groups.setdefault(len(m), []).append(i)
        self.lengths.forget_parents()  # children reuse this iteration's passes only
        children: list[Tensor] = []
        parent: list[int] = []
        for length in sorted(groups):
            idx = groups[length]
            ev, rows = self.lengths.at(length), torch.stack([s.members[i] for i in idx])
            sel = torch.tensor(idx, dtype=torch.long)
            scores = -ev.gradients(rows.to(device), torch.zeros(len(idx), dtype=torch.long), s.penalties[sel]).cpu().double()
            scores[..., self.banned] = float("-inf")
            kids = [mutate(rows, scores, [s.strengths[i] for i in idx], cfg, s.generator, n_grad)]
            if n_lm or n_shift:  # the model's own proposals: one more pass over these members (charged)
                logp = span_logprobs(self.model, rows.to(device), ev.layout).cpu()
                ev.compute.add_tokens(len(idx) * ev.layout.seq_len)
                kids.append(model_swaps(rows, logp, self.banned, n_lm, s.generator))
                moved = resizes(rows, logp, self.banned, n_shift, s.generator, cfg.length_range())
            else:
                moved = []
            for k in kids:  # each block: the members' children in member order, k.shape[0] // len(idx) each
                children += list(k)
                parent += [i for i in idx for _ in range(len(k) // len(idx))]
            children += moved
            parent += [i for i in idx for _ in range(len(moved) // len(idx))]
        f, xe, _ = self.lengths.evaluate(children, torch.zeros(len(children), dtype=torch.long), iteration)
        self.update_members(children, torch.tensor(parent, dtype=torch.long), f, xe)

    def update_members(self, children: Prompts, parent: Int[Tensor, " children"], f: Tensor, xe: Tensor) -> None:
        """The members after an iteration's children were scored; strengths and restarts updated."""
        cfg, s = self.cfg, self.states[0]
        if cfg.lineage:
            improved = s.select_lineage(children, parent, f, xe, s.penalties)
        else:
            improved = s.select(children, f, xe, s.penalties)
        for strength, better in zip(s.strengths, improved.tolist()):
            strength.update(better, cfg)
        if cfg.restart_patience:
            s.restart_stalled(improved, cfg.restart_patience)

    def extra(self, k: int) -> dict[str, Any]:
        cfg, strengths = self.cfg, self.states[0].strengths
        return {
            "strength": [s.level for s in strengths], "positions": [s.positions(cfg, cfg.length) for s in strengths],
            "topk": [s.topk(cfg) for s in strengths], "temperature": [s.temperature(cfg) for s in strengths],
        }


@dataclass
class ADAPTState(MemberState):
    """The mutation phase's members, each with its mutation strength; their penalties in activation
    units per nat (`penalties`) and in spreads of the activation per nat (`unit`: the config's)."""

    strengths: list[MutationStrength]
    penalties: Float[Tensor, " members"]
    unit: Float[Tensor, " members"]
    # Restarts (restart_patience): iterations since each member last improved, and the candidate starts
    # no member has taken yet (ids, activation, xe).
    idle: list[int] = field(default_factory=list)
    reserve: tuple[Tensor, Tensor, Tensor] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {
            **self.members_dict(), "strength": [[s.level, s.stall] for s in self.strengths],
            "scale": float(self.penalties[0] / self.unit[0]), "generator": self.generator_text(),
        }
        if self.idle:
            d["idle"] = list(self.idle)
        if self.reserve is not None:
            d["reserve"] = [self.reserve[0].tolist(), self.reserve[1].tolist(), self.reserve[2].tolist()]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], unit: Float[Tensor, " members"]) -> ADAPTState:
        strengths = [MutationStrength(level=a, stall=int(b)) for a, b in d["strength"]]
        reserve = None
        if "reserve" in d:
            ids, f, xe = d["reserve"]
            reserve = (torch.tensor(ids, dtype=torch.long).view(len(ids), -1), torch.tensor(f, dtype=torch.float64),
                       torch.tensor(xe, dtype=torch.float64))
        return cls(**cls.members_from_dict(d), strengths=strengths, penalties=unit * float(d["scale"]), unit=unit,
                   idle=[int(x) for x in d.get("idle", [])], reserve=reserve)

    def restart_stalled(self, improved: Bool[Tensor, " members"], patience: int) -> None:
        """A member `patience` iterations without improvement takes the unused start that is best
        under its own penalty (its strength back to 0); nothing once the starts are used up."""
        if not self.idle:
            self.idle = [0] * len(self.members)
        for i, better in enumerate(improved.tolist()):
            self.idle[i] = 0 if better else self.idle[i] + 1
            if self.idle[i] < patience or self.reserve is None or len(self.reserve[0]) == 0:
                continue
            ids, f, xe = self.reserve
            j = int((-f + self.penalties[i] * xe).argmin())
            self.members[i], self.activation[i], self.xe[i] = ids[j], f[j], xe[j]
            self.strengths[i], self.idle[i] = MutationStrength(), 0
            rest = torch.arange(len(ids)) != j
            self.reserve = (ids[rest], f[rest], xe[rest])
