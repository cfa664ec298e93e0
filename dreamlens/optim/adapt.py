"""ADAPT ("Hybrid Prompt Optimization for LLM Feature Visualization", Cardoso et al. 2026): a beam search
grows fluent prompts left to right, then adaptive gradient-guided mutation climbs the objective.

Beam search: B partial prompts, slot i kept under its own fluency penalty lam_i; each grows by one token
per step, proposed by the model's own next-token distribution (fluent) and by the gradient (active);
every candidate is scored by `f / s - lam_i * xe`, s the spread of f over the step's candidates, so the
penalties mean the same for a neuron of scale 0.1 and a latent of scale 100. Mutation: the B beams
become B members of a population, each minimizing `-f / s + lam_i * xe` (s fixed from the full-length
candidates) by GCG-style swaps whose strength (positions changed, top-k width, sampling temperature)
rises while the member stalls and falls when it improves.
"""

from __future__ import annotations

import base64
import math
import numbers
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..models import decode
from ..objectives import Objective, ObjectiveError
from ..results import DreamResult
from .core import (
    GRADIENT_COST,
    DreamError,
    Evaluator,
    Layout,
    check_not_constant,
    fast_weights,
    retokenizes,
    sigterm_as_interrupt,
)
from .sampling import next_token_logprobs
from .epo import (
    IterationInfo,
    allowed_tokens,
    check_resume,
    initial_span,
    load_resume,
    make_results,
    prepare,
    random_prompts,
    save_checkpoint,
    save_partial,
)


@dataclass(frozen=True)
class ADAPTConfig:
    """ADAPT's knobs. The paper publishes no hyperparameters: these are ours. The penalties were chosen
    on four tuning neurons disjoint from the benchmark's targets (0.3..3 and 0.01..0.3 did worse than
    0.03..1). The mutation sizes were re-chosen on 2026-11-30 on two of those tuning neurons, once the
    one-hot gradient was exact (40,000 token-forwards, length 12): the earlier greedy mutation (16
    children, top-8..256 at temperature 0.5..4, up to 3 positions) stopped improving after about 10,000
    token-forwards; 32 children of one swap each from a wide, nearly uniform top-128..512 kept rising
    with the budget and ended better at every fluency limit."""

    length: int = 12  # optimized tokens
    beams: int = 4  # B: partial prompts kept by the beam search, then the members of the mutation phase
    lam_min: float = 0.03  # penalties of the B slots, log-spaced from lam_min to lam_max, in spreads of
    lam_max: float = 1.0  # the activation per nat of xe (see the module docstring)
    beam_lm: int = 8  # proposals per beam and step from the model's next-token distribution
    beam_grad: int = 8  # proposals per beam and step from the gradient's top-k
    beam_share: float = 0.5  # with a token budget, the beam search gets at most this share of it
    children: int = 32  # children per member per mutation iteration
    max_positions: int = 1  # strength 0 changes 1 position per child, strength 1 this many
    topk_min: int = 128  # proposal width at strength 0 ...
    topk_max: int = 512  # ... and at strength 1 (log-interpolated)
    temp_min: float = 8.0  # sampling temperature over the proposals at strength 0 ...
    temp_max: float = 8.0  # ... and at strength 1 (in units of the proposals' score spread)
    patience: int = 2  # iterations without improvement before the strength rises
    step: float = 0.25  # how much the strength (0..1) rises on stagnation or falls on improvement
    iters: int = 300  # mutation iterations
    seed: int = 0
    init_text: str | None = None  # skip the beam search: every member starts from this text
    init_ids: tuple[int, ...] | None = None
    prefix: str = ""
    suffix: str = ""
    ascii_only: bool = False
    ban_whitespace_only: bool = False
    banned_tokens: tuple[int, ...] = ()
    batch_size: int = 64
    max_token_forwards: int | None = None  # stop once this much compute is spent (beam search included)
    checkpoint_every: int | None = None
    checkpoint_dir: str | None = None

    def penalties(self) -> np.ndarray:
        if self.beams == 1:
            return np.array([self.lam_min])
        return np.logspace(math.log10(self.lam_min), math.log10(self.lam_max), self.beams)

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise DreamError(msg)

        need(isinstance(self.length, int) and self.length >= 1, f"length must be at least 1 token, got {self.length!r}")
        need(self.beams >= 1, f"beams must be at least 1, got {self.beams}")
        need(self.lam_min > 0 and self.lam_max >= self.lam_min, f"need 0 < lam_min <= lam_max, got lam_min={self.lam_min}, lam_max={self.lam_max}")
        need(self.beam_lm >= 1, f"beam_lm must be at least 1 (the model's proposals keep the start fluent), got {self.beam_lm}")
        need(self.beam_grad >= 0, f"beam_grad must be >= 0, got {self.beam_grad}")
        need(0 < self.beam_share <= 1, f"beam_share must be in (0, 1], got {self.beam_share}")
        need(self.children >= 1, f"children must be at least 1 per member, got {self.children}")
        need(self.max_positions >= 1, f"max_positions must be at least 1, got {self.max_positions}")
        need(1 <= self.topk_min <= self.topk_max, f"need 1 <= topk_min <= topk_max, got {self.topk_min}, {self.topk_max}")
        need(0 < self.temp_min <= self.temp_max, f"need 0 < temp_min <= temp_max, got {self.temp_min}, {self.temp_max}")
        need(self.patience >= 1, f"patience must be at least 1 iteration, got {self.patience}")
        need(0 < self.step <= 1, f"step must be in (0, 1], got {self.step}")
        need(self.iters >= 0, f"iters must be >= 0, got {self.iters}")
        need(self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}")
        need(self.checkpoint_every is None or self.checkpoint_every >= 1, "checkpoint_every must be None or >= 1")
        need(self.checkpoint_every is None or self.checkpoint_dir is not None, "checkpoint_every needs checkpoint_dir: where to write the checkpoints")
        need(self.init_text is None or self.init_ids is None, "give init_text or init_ids, not both")
        need(isinstance(self.seed, numbers.Integral) and not isinstance(self.seed, bool), f"seed must be an integer, got {self.seed!r}")


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


def spread(f: Float[Tensor, " n"]) -> float:
    """The activation's scale among candidates: the standard deviation of the finite values (1.0 when
    there is no spread to measure), so that penalties are in units of it."""
    v = f[torch.isfinite(f)].double()
    s = float(v.std(unbiased=False)) if v.numel() > 1 else 0.0
    return s if s > 1e-12 else 1.0


def _sublayout(layout: Layout, length: int) -> Layout:
    return Layout(layout.head, layout.tail, length, layout.n_bos)


def _readable(model: Any, objective: Objective, layout: Layout) -> bool:
    """Whether the objective can be read on prompts of this layout (a fixed position may lie beyond
    a partial prompt)."""
    check = getattr(objective, "_check_positions", None)
    if check is not None:
        try:
            check(model, layout.seq_len, layout.start)
        except ObjectiveError:
            return False
        return True
    n = layout.seq_len - layout.start
    for _, leaf in objective._terms():
        pos = getattr(leaf, "reduce", "last")
        if isinstance(pos, int) and not -n <= pos < n:
            return False
    return True


# ---------------------------------------------------------------------------------------------
# Beam search


@dataclass
class BeamTrace:
    """What the beam search did, step by step: the beams kept and the tokens proposed."""

    beams: list[Tensor] = field(default_factory=list)  # [B, t+1] after step t
    proposals: list[Tensor] = field(default_factory=list)  # [n_beams, proposals] new tokens at step t


def beam_sizes(cfg: ADAPTConfig, layout: Layout) -> tuple[int, int]:
    """(beam_lm, beam_grad), shrunk together until the beam search's cost fits `beam_share` of the
    token budget (never below one proposal of each kind)."""
    k_lm, k_grad = cfg.beam_lm, cfg.beam_grad
    if cfg.max_token_forwards is None:
        return k_lm, k_grad
    cap = cfg.beam_share * cfg.max_token_forwards
    while beam_cost(cfg.beams, k_lm, k_grad, layout) > cap and (k_lm > 1 or k_grad > min(1, cfg.beam_grad)):
        k_lm, k_grad = max(1, k_lm * 3 // 4), max(min(1, cfg.beam_grad), k_grad * 3 // 4)
    return k_lm, k_grad


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
    model: Any,
    objective: Objective,
    layout: Layout,
    ev: Evaluator,
    lams: Float[Tensor, " beams"],
    banned: Bool[Tensor, " d_vocab"],
    gen: torch.Generator,
    *,
    k_lm: int,
    k_grad: int,
    prefix: str = "",
    suffix: str = "",
    trace: BeamTrace | None = None,
) -> tuple[Int[Tensor, "pool length"], Float[Tensor, " pool"], Float[Tensor, " pool"]]:
    """Grow B prompts left to right, slot i keeping the best candidate under `f / s - lams[i] * xe`
    (s: the spread of f over the step's candidates). Returns the last step's candidates (full
    prompts, scored and recorded by `ev` at iteration 0), from which each member takes its start.

    Partial prompts are scored with the suffix after them, by Evaluators of their own length whose
    compute is added to `ev`'s counters."""
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
        sub = _sublayout(layout, t + 1)
        logp = next_token_logprobs(model, beams, layout)
        ev.token_forwards += n * (len(layout.head) + t)
        logp[:, banned] = float("-inf")
        lm_top = logp.topk(k_lm, dim=-1).indices  # [n, k_lm]
        readable = t == L - 1 or _readable(model, objective, sub)
        step_ev = ev if t == L - 1 else Evaluator(model, [objective], sub, prefix=prefix, suffix=suffix, batch_size=ev.batch_size)
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
            ok, _ = retokenizes(model, cand, sub, prefix, suffix)
            cand_nll = nll.repeat_interleave(k) - logp.gather(1, proposals).reshape(-1).double()
            loss = cand_nll[None, :].expand(B, -1).clone()
            f = torch.zeros(len(cand), dtype=torch.float64)
            xe = cand_nll / max(1, t + 1 - (sub.xe_from - len(layout.head)))
        if step_ev is not ev:
            ev.n_forward += step_ev.n_forward
            ev.n_gradient += step_ev.n_gradient
            ev.token_forwards += step_ev.token_forwards
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


# ---------------------------------------------------------------------------------------------
# Mutation


def mutate(
    parents: Int[Tensor, "members length"],
    scores: Float[Tensor, "members length d_vocab"],
    strengths: Sequence[MutationStrength],
    cfg: ADAPTConfig,
    gen: torch.Generator,
) -> Int[Tensor, "members_x_children length"]:
    """`cfg.children` children per member: each changes `positions` distinct positions, each to a
    token sampled from the top-`topk` of that position's proposal scores at `temperature` (in units
    of the top-k scores' spread, so the temperature means the same for any objective scale)."""
    M, L = parents.shape
    C = cfg.children
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
    model: Any,
    objective: Objective | str | Sequence[Objective | str],
    config: ADAPTConfig | None = None,
    *,
    callback: Callable[[IterationInfo], bool | None] | None = None,
    resume: DreamResult | str | Path | Sequence[Any] | None = None,
    progress: bool = True,
) -> DreamResult | list[DreamResult]:
    """Dream with ADAPT. One objective gives a DreamResult; a list gives one result per objective
    (each its own run; `max_token_forwards` is per objective).

    Ctrl-C, a callback returning True, or the token budget end the run early and return what was found;
    `resume=` continues a saved run (same config; more iters allowed) from its last mutation iteration."""
    cfg = config or ADAPTConfig()
    objs, single, layout, banned = prepare(model, objective, cfg)
    prev = load_resume(resume, len(objs)) if resume is not None else [None] * len(objs)
    if resume is not None:
        check_resume(prev, objs, cfg, "adapt")
    out = []
    with fast_weights(model), sigterm_as_interrupt():  # weights restored however the run ends; SIGTERM is Ctrl-C
        for k, o in enumerate(objs):
            out.append(_adapt_one(model, o, cfg, layout, banned, callback, prev[k], progress, k, single))
    return out[0] if single else out


def _adapt_one(
    model: Any, obj: Objective, cfg: ADAPTConfig, layout: Layout, banned: Tensor,
    callback: Callable | None, prev: DreamResult | None, progress: bool, index: int, single: bool,
) -> DreamResult:
    B, L = cfg.beams, cfg.length
    unit = torch.tensor(cfg.penalties(), dtype=torch.float64)  # penalties per spread of the activation
    owner = torch.zeros(B, dtype=torch.long)
    ev = Evaluator(model, [obj], layout, prefix=cfg.prefix, suffix=cfg.suffix, batch_size=cfg.batch_size)
    gen = torch.Generator().manual_seed(cfg.seed)
    device = model.cfg.device
    wall0, wall_prev = time.perf_counter(), 0.0
    strengths = [MutationStrength() for _ in range(B)]

    if prev is not None:
        ev.restore(0, torch.as_tensor(prev.ids), prev.activation, prev.xe, prev.iteration, prev.text)
        ev.n_forward, ev.n_gradient, ev.token_forwards = prev.n_forward, prev.n_gradient, prev.token_forwards
        st = prev.state
        gen.set_state(torch.frombuffer(bytearray(base64.b64decode(st["generator"])), dtype=torch.uint8))
        pop = torch.tensor(st["population"], dtype=torch.long)
        pop_f = torch.tensor(st["pop_f"], dtype=torch.float64)
        pop_xe = torch.tensor(st["pop_xe"], dtype=torch.float64)
        strengths = [MutationStrength(level=a, stall=int(b)) for a, b in st["strength"]]
        lams = unit * float(st["scale"])
        first_it, wall_prev, init = prev.iterations + 1, prev.wall_time, None
    else:
        allowed = allowed_tokens(banned)
        init = initial_span(model, cfg, layout)
        probe = init if init is not None else random_prompts(model, 2, layout, allowed, gen, cfg.prefix, cfg.suffix)
        check_not_constant(model, obj, probe.to(device), layout)
        pop, lams, first_it = None, unit, 1

    def start() -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The members' first prompts (each the best of the beam search's last candidates under its own
        penalty) and the penalties in activation units."""
        if init is not None:
            pool = init
            pool_f, pool_xe, _ = ev.evaluate(pool, torch.zeros(1, dtype=torch.long), 0)
            # The spread of the activation over every single-token change of the initial prompt's
            # first position would cost a batch; its own magnitude is a cheap, scale-true stand-in.
            scale = max(abs(float(pool_f[0])), 1e-6) if torch.isfinite(pool_f[0]) else 1.0
        else:
            k_lm, k_grad = beam_sizes(cfg, layout)
            pool, pool_f, pool_xe = beam_search(
                model, obj, layout, ev, unit, banned, gen, k_lm=k_lm, k_grad=k_grad, prefix=cfg.prefix, suffix=cfg.suffix
            )
            scale = spread(pool_f)
        lams = unit * scale  # in activation units per nat, from here on
        best = (-pool_f[None, :] + lams[:, None] * pool_xe[None, :]).argmin(dim=1)
        return pool[best].clone(), pool_f[best], pool_xe[best], lams

    def snapshot() -> dict[str, Any]:
        if pop is None:  # stopped during the beam search: nothing to resume from
            return {}
        return {
            "population": pop.tolist(), "pop_f": pop_f.tolist(), "pop_xe": pop_xe.tolist(),
            "strength": [[s.level, s.stall] for s in strengths], "scale": float(lams[0] / unit[0]),
            "generator": base64.b64encode(gen.get_state().numpy().tobytes()).decode(),
        }

    # The state of iteration `done` and the compute spent up to it: what every result reports, so a stop
    # anywhere (a checkpoint, the callback, the next forward pass) resumes exactly.
    snap, done, counts = snapshot(), first_it - 1, (ev.n_forward, ev.n_gradient, ev.token_forwards)

    def result(stopped: str, error: str = "") -> DreamResult:
        wall = wall_prev + time.perf_counter() - wall0
        return make_results(model, [obj], ev, cfg, "adapt", wall, done, stopped, [snap], counts, error)[0]

    def spent() -> bool:
        return cfg.max_token_forwards is not None and ev.token_forwards >= cfg.max_token_forwards

    bar = _progress(progress, cfg.iters, first_it - 1, index)
    stopped = "completed"
    try:
        if pop is None:
            pop, pop_f, pop_xe, lams = start()
            snap, counts = snapshot(), (ev.n_forward, ev.n_gradient, ev.token_forwards)
        if spent():
            stopped, first_it = "budget", cfg.iters + 1
        for it in range(first_it, cfg.iters + 1):
            flat = pop.to(device)
            # First-order change of each member's loss for each swap: the exact one-hot gradient,
            # which includes the swapped token's own cross-entropy (its direct term).
            scores = -ev.gradients(flat, owner, lams).cpu().double()
            scores[..., banned] = float("-inf")
            children = mutate(pop, scores, strengths, cfg, gen)
            cf, cx, _ = ev.evaluate(children, torch.zeros(len(children), dtype=torch.long), it)
            pool = torch.cat([pop, children])
            pf, px = torch.cat([pop_f, cf]), torch.cat([pop_xe, cx])
            old = -pop_f + lams * pop_xe
            loss = -pf[None, :] + lams[:, None] * px[None, :]
            best = loss.argmin(dim=1)
            new = loss[torch.arange(B), best]
            for m in range(B):
                strengths[m].update(bool(new[m] < old[m] - 1e-12), cfg)
            pop, pop_f, pop_xe = pool[best].clone(), pf[best], px[best]
            snap, done, counts = snapshot(), it, (ev.n_forward, ev.n_gradient, ev.token_forwards)
            if bar is not None:
                i = int(np.argmax(ev.hist_vals[0]))
                bar.set_postfix(best=f"{ev.hist_vals[0][i]:.3f}", xe=f"{ev.hist_xe[0][i]:.2f}", prompts=len(ev.hist_vals[0]))
                bar.update(1)
            if cfg.checkpoint_every and it % cfg.checkpoint_every == 0:
                save_checkpoint([result("checkpoint")], _checkpoint_dir(cfg, index, single), True)
            if callback is not None:
                info = IterationInfo(
                    iteration=it, objective=index, texts=[decode(model, r) for r in pop],
                    activation=pop_f.tolist(), xe=pop_xe.tolist(), best_activation=max(ev.hist_vals[0]),
                    token_forwards=ev.token_forwards,
                    extra={"strength": [s.level for s in strengths], "positions": [s.positions(cfg, L) for s in strengths],
                           "topk": [s.topk(cfg) for s in strengths], "temperature": [s.temperature(cfg) for s in strengths]},
                )
                if callback(info):
                    stopped = "callback"
                    break
            if spent():
                stopped = "budget"
                break
    except KeyboardInterrupt:
        stopped = "interrupted"
        warnings.warn(f"interrupted: returning the result of the {done} completed iterations", stacklevel=3)
    except Exception as e:  # a bug or a failing callback: keep what was found, then fail
        save_partial(e, [result("error", f"{type(e).__name__}: {e}")], _checkpoint_dir(cfg, index, single), True)
        raise
    finally:
        if bar is not None:
            bar.close()
    return result(stopped)


def _checkpoint_dir(cfg: ADAPTConfig, index: int, single: bool) -> str | None:
    if cfg.checkpoint_dir is None or single:
        return cfg.checkpoint_dir
    return str(Path(cfg.checkpoint_dir) / f"objective_{index}")


def _progress(enabled: bool, total: int, initial: int, index: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=f"adapt {index}" if index else "adapt", unit="it", dynamic_ncols=True)
