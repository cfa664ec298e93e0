"""EPO, Evolutionary Prompt Optimization ("Fluent dreaming for language models", Thompson et al. 2024).

A population of M members, member i with fluency penalty lam_i, each minimizing `-f + lam_i * xe`:

    initialize the population (random tokens, the user's prompt, or candidate starts covered), score it
    for each iteration:
        one-hot gradients of every member's loss
        children: C single-token swaps per member, from the top-k of the negative gradient
        score every child in batched forward passes
        member i keeps the best of members and children under its own penalty lam_i
        every `restart_every` iterations: restart from one member, chosen under a random penalty

Several objectives run as independent populations inside the same forward passes. The run itself
(resume, checkpoints, callback, budget, interrupts) is the loop's (`optim.loop`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..objectives import Objective
from ..results import DreamResult
from ..scoring import Batching, Evaluator, Layout, check_not_constant
from .config import EPOConfig
from .loop import Callback, IterationInfo, Method, check_resume, load_resume, prepare, run
from .members import MemberState, allowed_tokens, cover, initial_span, random_prompts, start_pool
from .sampling import sample_prompts, span_logprobs

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["EPO", "EPOConfig", "EPOState", "IterationInfo", "epo", "propose_children", "start_prompts"]


def epo(
    model: HookedTransformer,
    objective: Objective | str | Sequence[Objective | str],
    config: EPOConfig | None = None,
    *,
    callback: Callback | None = None,
    resume: DreamResult | str | Path | Sequence[Any] | None = None,
    progress: bool = True,
) -> DreamResult | list[DreamResult]:
    """Dream with EPO. One objective gives a DreamResult; a list gives one result per objective,
    computed as independent populations sharing forward passes.

    Ctrl-C, a callback returning True, or the token budget end the run early and return what was found;
    `resume=` continues a saved run (same config; more iters allowed) exactly where it stopped."""
    cfg = config or EPOConfig()
    objs, single, layout, banned = prepare(model, objective, cfg)
    method = EPO(model, objs, cfg, layout, banned)
    prev = None
    if resume is not None:
        prev = load_resume(resume, len(objs))
        check_resume(prev, objs, cfg, "epo")
    out = run(method, resume=prev, callback=callback, progress=progress, folder=cfg.checkpoint_dir, per_objective=not single)
    return out[0] if single else out


class EPO(Method):
    """EPO on the loop: K populations (one per objective) of M members, stepped together."""

    name = "epo"
    cfg: EPOConfig
    states: list[EPOState]  # type: ignore[assignment]  # set by init / restore, before any step

    def __init__(self, model: HookedTransformer, objectives: Sequence[Objective], cfg: EPOConfig, layout: Layout, banned: Tensor):
        ev = Evaluator(model, objectives, layout, Batching.of(cfg))
        super().__init__(model, objectives, cfg, layout, ev)
        K, M = len(self.objectives), cfg.population
        self.banned, self.allowed = banned, allowed_tokens(banned)
        self.topk = min(cfg.topk, len(self.allowed))
        self.lams = torch.tensor(cfg.penalties(), dtype=torch.float64)  # member i's penalty lam_i
        self.owner = torch.arange(K).repeat_interleave(M)  # each member's population
        self.n_lm = round(cfg.children * cfg.lm_share)  # children per member with a token the model samples

    def init(self) -> None:
        """Initialize every population (the user's prompt, model-sampled text or random tokens) and score it."""
        model, cfg, layout = self.model, self.cfg, self.layout
        K, M, L = len(self.objectives), cfg.population, cfg.length
        gens = [torch.Generator().manual_seed(cfg.seed) for _ in range(K)]
        init = initial_span(model, cfg, layout)
        pool = start_pool(cfg.init_prompts)
        if pool is not None:  # candidate starts: scored first (charged), then each population covers them
            n = len(pool)
            f, xe, _ = self.ev.evaluate(pool.repeat(K, 1), torch.arange(K).repeat_interleave(n), 0)
            pop = torch.stack([pool[cover(f[k * n : (k + 1) * n], xe[k * n : (k + 1) * n], M)] for k in range(K)])
        else:
            pop = torch.stack([start_prompts(model, cfg, layout, self.banned, self.allowed, init, g, self.ev) for g in gens])
        for k, o in enumerate(self.objectives):
            check_not_constant(model, o, pop[k].to(model.cfg.device), layout)
        f, xe, _ = self.ev.evaluate(pop.view(K * M, L), self.owner, 0)
        f, xe = f.view(K, M), xe.view(K, M)
        self.states = [EPOState(pop[k], f[k], xe[k], gens[k]) for k in range(K)]

    def restore(self, states: list[dict[str, Any]]) -> None:
        self.states = [EPOState.from_dict(d) for d in states]

    def step(self, iteration: int) -> None:
        cfg, ev, K, M, C, L = self.cfg, self.ev, len(self.objectives), self.cfg.population, self.cfg.children, self.cfg.length
        pop = torch.stack([s.matrix() for s in self.states])  # [K, M, L]
        flat = pop.view(K * M, L).to(self.model.cfg.device)
        # Gradients: the one-hot gradient of each member's loss -f + lam_i * xe.
        grad = ev.gradients(flat, self.owner, self.lams.repeat(K))
        logp = None
        if self.n_lm:
            logp = span_logprobs(self.model, flat, self.layout).cpu()
            ev.compute.add_tokens(K * M * self.layout.seq_len)
        # Children: single-token swaps from the top-k of the negative gradient (a share from the model).
        gens = [s.generator for s in self.states]
        children = propose_children(pop, grad, self.banned, self.topk, C, gens, logp, self.n_lm)  # [K, M*C, L]
        # Evaluate every child, in batched forward passes shared by the populations.
        child_f, child_xe, _ = ev.evaluate(children.view(-1, L), self.owner.repeat_interleave(C), iteration)
        child_f, child_xe = child_f.view(K, M * C), child_xe.view(K, M * C)
        for k, s in enumerate(self.states):
            # Select: member i keeps the best of members and children under its own penalty lam_i.
            improved = s.select(children[k], child_f[k], child_xe[k], self.lams)
            s.stall = 0 if bool(improved.any()) else s.stall + 1
            # Restart: every restart_every iterations (or after restart_patience without improvement).
            periodic = cfg.restart_every and iteration % cfg.restart_every == 0
            if periodic or (cfg.restart_patience and s.stall >= cfg.restart_patience):
                s.restart(math.log(cfg.lam_min), math.log(cfg.lam_max))


@dataclass
class EPOState(MemberState):
    """One population: its members (with their activation and xe), its generator, and how many
    iterations in a row no member improved."""

    stall: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {**self.members_dict(), "generator": self.generator_text(), "stall": self.stall}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EPOState:
        return cls(**cls.members_from_dict(d), stall=int(d.get("stall", 0)))

    def restart(self, lam_lo: float, lam_hi: float) -> None:
        """Every member becomes the one that is best under a penalty drawn log-uniformly at random
        between exp(lam_lo) and exp(lam_hi)."""
        self.stall = 0
        lam_r = math.exp(lam_lo + (lam_hi - lam_lo) * torch.rand((), generator=self.generator).item())
        j = int((-self.activation + lam_r * self.xe).argmin())
        members = self.matrix()
        M, L = members.shape
        self.members, self.activation, self.xe = (
            members[j].expand(M, L).clone(), self.activation[j].expand(M).clone(), self.xe[j].expand(M).clone()
        )


def start_prompts(
    model: HookedTransformer, cfg: EPOConfig, layout: Layout, banned: Bool[Tensor, " d_vocab"],
    allowed: Int[Tensor, " n_allowed"], init: Int[Tensor, "1 length"] | None, gen: torch.Generator, ev: Evaluator,
) -> Int[Tensor, "members length"]:
    """A population's first prompts: the user's initial prompt repeated, text sampled from the model
    (`init="sample"`, its compute counted by `ev`; random tokens where sampling cannot apply), or
    random tokens."""
    M = cfg.population
    if init is not None:
        return init.expand(M, layout.length).clone()
    if cfg.init == "sample":
        ids, spent = sample_prompts(model, M, layout, banned, gen)
        ev.compute.add_tokens(spent)
        if ids is not None:
            return ids
    return random_prompts(model, M, layout, allowed, gen)


def propose_children(
    pop: Int[Tensor, "K M L"], grad: Float[Tensor, "KM L d_vocab"], banned: Bool[Tensor, " d_vocab"], topk: int, C: int,
    gens: Sequence[torch.Generator], logp: Float[Tensor, "KM L d_vocab"] | None = None, n_lm: int = 0,
) -> Int[Tensor, "K MC L"]:
    """C children per member of each population `pop` [K, M, L]: one position of the member swapped for
    one of the top-k tokens of its negative gradient `grad` [K*M, L, vocab] (banned tokens excluded),
    drawn with the population's own generator. With `logp` [K*M, L, vocab] (the model's own
    log-probabilities at each position), the last `n_lm` children of each member take a token sampled
    from that distribution instead. Returns [K, M*C, L]."""
    K, M, L = pop.shape
    grad[..., banned.to(grad.device)] = float("inf")
    top = grad.topk(topk, dim=-1, largest=False).indices.cpu()  # [K*M, L, topk]: steepest descent first
    children = pop.reshape(K * M, 1, L).repeat(1, C, 1)  # [K*M, C, L]
    for k in range(K):
        pos = torch.randint(L, (M, C), generator=gens[k])
        choice = torch.randint(topk, (M, C), generator=gens[k])
        rows = torch.arange(k * M, (k + 1) * M).unsqueeze(1).expand(M, C)
        new = top[rows, pos, choice]
        if logp is not None and n_lm > 0:
            lp = logp[rows[:, -n_lm:], pos[:, -n_lm:]].reshape(M * n_lm, -1).float()  # [M*n_lm, vocab]
            lp[:, banned] = float("-inf")
            new[:, -n_lm:] = torch.multinomial(torch.softmax(lp, dim=-1), 1, generator=gens[k]).view(M, n_lm)
        children[rows, torch.arange(C).expand(M, C), pos] = new
    return children.view(K, M * C, L)

