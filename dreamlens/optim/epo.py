"""EPO, Evolutionary Prompt Optimization ("Fluent dreaming for language models", Thompson et al. 2024).

A population of members, member i with fluency penalty lam_i, each minimizing `-f + lam_i * xe`:
one-hot gradients propose single-token swaps (children), all children are scored in batched forward
passes, each slot keeps the best of parents and children under its own penalty, and every
`restart_every` iterations the population restarts from one member chosen with a random penalty.
Several objectives run as independent populations inside the same forward passes.
"""

from __future__ import annotations

import base64
import math
import numbers
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..models import bos_token_id, encode
from ..objectives import Objective
from ..objectives import objective as parse_objective
from ..results import DreamResult
from .core import (
    DreamError,
    Evaluator,
    Layout,
    banned_mask,
    check_not_constant,
    check_vocab_sizes,
    fast_weights,
    make_layout,
    retokenizes,
    sigterm_as_interrupt,
)
from .sampling import sample_prompts, span_logprobs


@dataclass(frozen=True)
class EPOConfig:
    """EPO's knobs; defaults are the paper's."""

    length: int = 12  # optimized tokens
    population: int = 8  # members M
    lam_min: float = 0.1  # penalties log-spaced from lam_min to lam_max
    lam_max: float = 10.0
    children: int = 32  # children per member per iteration
    topk: int = 512  # a child's new token is drawn from the top-k of the negative gradient
    iters: int = 300
    restart_every: int = 50  # 0 disables restarts
    seed: int = 0
    init_text: str | None = None  # start every member from this text instead of random tokens
    init_ids: tuple[int, ...] | None = None
    # Beyond the paper (defaults off): measured in benchmarks/fluency.py.
    init: str = "random"  # "random" tokens (the paper), or "sample": text sampled from the model itself
    restart_patience: int = 0  # also restart after this many iterations in which no member improved (0: off)
    lm_share: float = 0.0  # share of children whose new token is sampled from the model's next-token distribution
    prefix: str = ""  # fixed context before the optimized span
    suffix: str = ""  # fixed context after it
    ascii_only: bool = False  # ban tokens with non-ASCII characters
    ban_whitespace_only: bool = False
    banned_tokens: tuple[int, ...] = ()  # special tokens are always banned
    batch_size: int = 64  # prompts per forward pass when scoring children
    max_batch_tokens: int | None = None  # tokens per pass (None: estimated from free memory)
    reuse_prefix: bool = True  # compute children from their first changed position, on the parent's KV cache
    max_token_forwards: int | None = None  # stop once this much compute is spent (see core.GRADIENT_COST)
    checkpoint_every: int | None = None  # save the result every N iterations (atomic)
    checkpoint_dir: str | None = None

    def penalties(self) -> np.ndarray:
        if self.population == 1:
            return np.array([self.lam_min])
        return np.logspace(math.log10(self.lam_min), math.log10(self.lam_max), self.population)

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise DreamError(msg)

        need(isinstance(self.length, int) and self.length >= 1, f"length must be at least 1 token, got {self.length!r}")
        need(self.population >= 1, f"population must be at least 1 member, got {self.population}")
        need(self.children >= 1, f"children must be at least 1 per member, got {self.children}")
        need(self.topk >= 1, f"topk must be at least 1, got {self.topk}")
        need(self.iters >= 0, f"iters must be >= 0, got {self.iters}")
        need(self.restart_every >= 0, f"restart_every must be >= 0 (0 disables restarts), got {self.restart_every}")
        need(self.lam_min > 0 and self.lam_max > 0, f"penalties must be positive (they are log-spaced), got lam_min={self.lam_min}, lam_max={self.lam_max}")
        need(self.lam_max >= self.lam_min, f"lam_max ({self.lam_max}) must be >= lam_min ({self.lam_min})")
        need(self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}")
        need(
            self.max_batch_tokens is None or self.max_batch_tokens >= 1,
            f"max_batch_tokens must be None (estimated from free memory) or at least 1, got {self.max_batch_tokens}",
        )
        need(self.checkpoint_every is None or self.checkpoint_every >= 1, "checkpoint_every must be None or >= 1")
        need(
            self.checkpoint_every is None or self.checkpoint_dir is not None,
            "checkpoint_every needs checkpoint_dir: where to write the checkpoints",
        )
        need(self.init_text is None or self.init_ids is None, "give init_text or init_ids, not both")
        need(isinstance(self.seed, numbers.Integral) and not isinstance(self.seed, bool), f"seed must be an integer, got {self.seed!r}")
        need(self.init in ("random", "sample"), f"init must be 'random' or 'sample', got {self.init!r}")
        need(self.restart_patience >= 0, f"restart_patience must be >= 0 (0: off), got {self.restart_patience}")
        need(0.0 <= self.lm_share <= 1.0, f"lm_share must be between 0 and 1, got {self.lm_share}")


@dataclass
class IterationInfo:
    """What a callback sees after each iteration. Return True from the callback to stop the run."""

    iteration: int
    objective: int  # which objective (population) this is about
    texts: list[str]
    activation: list[float]
    xe: list[float]
    best_activation: float
    token_forwards: int
    extra: dict[str, Any] = field(default_factory=dict)


def _gen_state(g: torch.Generator) -> str:
    return base64.b64encode(g.get_state().numpy().tobytes()).decode()


def _set_gen_state(g: torch.Generator, s: str) -> None:
    g.set_state(torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8))


def allowed_tokens(banned: Tensor) -> Tensor:
    return torch.nonzero(~banned).flatten()


def random_prompts(
    model: Any, n: int, layout: Layout, allowed: Tensor, gen: torch.Generator, prefix: str, suffix: str, tries: int = 100
) -> Tensor:
    """n random prompts of allowed tokens that re-tokenize to themselves in context."""
    ids = allowed[torch.randint(len(allowed), (n, layout.length), generator=gen)]
    for _ in range(tries):
        ok, _ = retokenizes(model, ids, layout, prefix, suffix)
        if ok.all():
            return ids
        bad = torch.nonzero(~ok).flatten()
        ids[bad] = allowed[torch.randint(len(allowed), (len(bad), layout.length), generator=gen)]
    raise DreamError("could not sample random prompts that re-tokenize to themselves; check the banned tokens and context")


def start_prompts(
    model: Any, cfg: EPOConfig, layout: Layout, banned: Tensor, allowed: Tensor, init: Tensor | None,
    gen: torch.Generator, ev: Evaluator,
) -> Tensor:
    """A population's first prompts: the user's initial prompt repeated, text sampled from the model
    (`init="sample"`, its compute counted by `ev`; random tokens where sampling cannot apply), or
    random tokens."""
    M = cfg.population
    if init is not None:
        return init.expand(M, layout.length).clone()
    if cfg.init == "sample":
        ids, spent = sample_prompts(model, M, layout, banned, gen, prefix=cfg.prefix, suffix=cfg.suffix)
        ev.token_forwards += spent
        if ids is not None:
            return ids
    return random_prompts(model, M, layout, allowed, gen, cfg.prefix, cfg.suffix)


def initial_span(model: Any, cfg: Any, layout: Layout) -> Tensor | None:
    """The user's initial prompt as ids (None: random), checked against length and re-tokenization."""
    if cfg.init_text is None and cfg.init_ids is None:
        return None
    ids = list(cfg.init_ids) if cfg.init_ids is not None else encode(model, cfg.init_text)
    if len(ids) != layout.length:
        raise DreamError(
            f"the initial prompt has {len(ids)} tokens but length is {layout.length}; set length={len(ids)}"
        )
    span = torch.tensor([ids], dtype=torch.long)
    ok, _ = retokenizes(model, span, layout, cfg.prefix, cfg.suffix)
    if not ok.all():
        raise DreamError("the initial prompt's text does not tokenize back to the same ids in its context; pick other ids")
    return span


def prepare(model: Any, objectives: Any, cfg: Any) -> tuple[list[Objective], bool, Layout, Tensor]:
    """Validate everything before any compute: objectives, config, layout, banned tokens."""
    single = not isinstance(objectives, (list, tuple))
    objs = [parse_objective(o) for o in ([objectives] if single else objectives)]
    if not objs:
        raise DreamError("no objective given: pass one objective or a non-empty list")
    cfg.validate()
    for o in objs:
        o.validate(model)
    check_vocab_sizes(model, **{k: getattr(cfg, k) for k in ("population", "beams", "children", "topk", "topk_max") if hasattr(cfg, k)})
    layout = make_layout(model, cfg.length, cfg.prefix, cfg.suffix)
    banned = banned_mask(
        model, ascii_only=cfg.ascii_only, ban_whitespace_only=cfg.ban_whitespace_only, extra=cfg.banned_tokens
    )
    return objs, single, layout, banned


def make_results(
    model: Any, objs: list[Objective], ev: Evaluator, cfg: Any, method: str, wall: float, iterations: int,
    stopped: str, states: list[dict[str, Any]], counts: tuple[int, int, int] | None = None, error: str = "",
) -> list[DreamResult]:
    """One result per objective. `counts` (n_forward, n_gradient, token_forwards) as of the state's
    iteration (default: the evaluator's now), so that a resumed run counts its compute exactly."""
    n_forward, n_gradient, token_forwards = counts or (ev.n_forward, ev.n_gradient, ev.token_forwards)
    out = []
    for k, o in enumerate(objs):
        ids, vals, xe, it, text = ev.history_arrays(k)
        out.append(
            DreamResult(
                objective=str(o), method=method, config=_config_dict(cfg), ids=ids, activation=vals, xe=xe,
                iteration=it, text=text, prefix=cfg.prefix, suffix=cfg.suffix, bos_token_id=bos_token_id(model),
                model_name=str(model.cfg.model_name), wall_time=wall, n_forward=n_forward,
                n_gradient=n_gradient, token_forwards=token_forwards, iterations=iterations,
                stopped=stopped, state=states[k] if states else {}, error=error,
            )
        )
    return out


def _config_dict(cfg: Any) -> dict[str, Any]:
    d = asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def load_resume(resume: Any, n: int) -> list[DreamResult]:
    items = resume if isinstance(resume, (list, tuple)) else [resume]
    out = [DreamResult.load(r) if isinstance(r, (str, Path)) else r for r in items]
    if len(out) != n:
        raise DreamError(f"resume has {len(out)} result(s) but {n} objective(s) were given")
    return out


# Settings that may change when a run is resumed: budgets, and how the work is batched and computed.
_RESUMABLE = ("iters", "checkpoint_every", "checkpoint_dir", "max_token_forwards", "max_batch_tokens", "reuse_prefix")


def check_resume(prev: list[DreamResult], objs: list[Objective], cfg: Any, method: str) -> None:
    new = _config_dict(cfg)
    for r, o in zip(prev, objs):
        if r.method != method or r.objective != str(o):
            raise DreamError(f"cannot resume a {r.method} run of {r.objective!r} as a {method} run of {str(o)!r}")
        diff = [k for k in new if k not in _RESUMABLE and r.config.get(k) != new[k]]
        if diff:
            raise DreamError(f"cannot resume with a different config: {', '.join(diff)} changed; only iters and budgets may change")
        if not r.state:
            raise DreamError("this result holds no optimizer state to resume from")


def propose_children(
    pop: Tensor, grad: Tensor, banned: Tensor, topk: int, C: int, gens: Sequence[torch.Generator],
    logp: Tensor | None = None, n_lm: int = 0,
) -> Tensor:
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


def select_members(f: Tensor, xe: Tensor, lams: Tensor) -> Tensor:
    """For each penalty lam_i, the index of the candidate minimizing -f + lam_i * xe (first on ties)."""
    return (-f[None, :] + lams[:, None] * xe[None, :]).argmin(dim=1)


def epo(
    model: Any,
    objective: Objective | str | Sequence[Objective | str],
    config: EPOConfig | None = None,
    *,
    callback: Callable[[IterationInfo], bool | None] | None = None,
    resume: DreamResult | str | Path | Sequence[Any] | None = None,
    progress: bool = True,
) -> DreamResult | list[DreamResult]:
    """Dream with EPO. One objective gives a DreamResult; a list gives one result per objective,
    computed as independent populations sharing forward passes.

    Ctrl-C, a callback returning True, or the token budget end the run early and return what was found;
    `resume=` continues a saved run (same config; more iters allowed) exactly where it stopped."""
    cfg = config or EPOConfig()
    objs, single, layout, banned = prepare(model, objective, cfg)
    K, M, C, L = len(objs), cfg.population, cfg.children, cfg.length
    allowed = allowed_tokens(banned)
    topk = min(cfg.topk, len(allowed))
    lams = torch.tensor(cfg.penalties(), dtype=torch.float64)
    lam_lo, lam_hi = math.log(cfg.lam_min), math.log(cfg.lam_max)
    ev = Evaluator(
        model, objs, layout, prefix=cfg.prefix, suffix=cfg.suffix, batch_size=cfg.batch_size,
        reuse=cfg.reuse_prefix, max_batch_tokens=cfg.max_batch_tokens,
    )
    gens = [torch.Generator().manual_seed(cfg.seed) for _ in range(K)]
    owner_pop = torch.arange(K).repeat_interleave(M)
    n_lm = round(C * cfg.lm_share)
    device = model.cfg.device
    wall0, wall_prev = time.perf_counter(), 0.0

    if resume is not None:
        prev = load_resume(resume, K)
        check_resume(prev, objs, cfg, "epo")
        for k, r in enumerate(prev):
            ev.restore(k, torch.as_tensor(r.ids), r.activation, r.xe, r.iteration, r.text)
            _set_gen_state(gens[k], r.state["generator"])
        ev.n_forward, ev.n_gradient, ev.token_forwards = prev[0].n_forward, prev[0].n_gradient, prev[0].token_forwards
        pop = torch.tensor([r.state["population"] for r in prev], dtype=torch.long)
        pop_f = torch.tensor([r.state["pop_f"] for r in prev], dtype=torch.float64)
        pop_xe = torch.tensor([r.state["pop_xe"] for r in prev], dtype=torch.float64)
        stall = [int(r.state.get("stall", 0)) for r in prev]
        first_it, wall_prev = prev[0].iterations + 1, prev[0].wall_time
    else:
        init = initial_span(model, cfg, layout)
        pop = torch.stack([start_prompts(model, cfg, layout, banned, allowed, init, gens[k], ev) for k in range(K)])
        stall = [0] * K
        for k, o in enumerate(objs):
            check_not_constant(model, o, pop[k].to(device), layout)
        f0, x0, _ = ev.evaluate(pop.view(K * M, L), owner_pop, 0)
        pop_f, pop_xe = f0.view(K, M), x0.view(K, M)
        first_it = 1

    def snapshot() -> list[dict[str, Any]]:
        # Taken at iteration boundaries only, so an interrupted run resumes from a consistent state.
        return [
            {
                "population": pop[k].tolist(),
                "pop_f": pop_f[k].tolist(),
                "pop_xe": pop_xe[k].tolist(),
                "generator": _gen_state(gens[k]),
                "stall": stall[k],
            }
            for k in range(K)
        ]

    # The state of iteration `done`, and the compute spent up to it: one consistent point that every
    # result reports (a stop during a checkpoint, the callback or the next forward pass resumes from it).
    snap, done, counts = snapshot(), first_it - 1, (ev.n_forward, ev.n_gradient, ev.token_forwards)

    def results(stopped: str, error: str = "") -> list[DreamResult]:
        wall = wall_prev + time.perf_counter() - wall0
        return make_results(model, objs, ev, cfg, "epo", wall, done, stopped, snap, counts, error)

    bar = _progress(progress, cfg.iters, first_it - 1)
    stopped = "completed"
    fast = ExitStack()
    fast.enter_context(fast_weights(model))  # restored in `finally`, however the run ends
    fast.enter_context(sigterm_as_interrupt())
    try:
        for it in range(first_it, cfg.iters + 1):
            flat = pop.view(K * M, L).to(device)
            grad = ev.gradients(flat, owner_pop, lams.repeat(K))
            logp = None
            if n_lm:
                logp = span_logprobs(model, flat, layout).cpu()
                ev.token_forwards += K * M * layout.seq_len
            children = propose_children(pop, grad, banned, topk, C, gens, logp, n_lm)  # [K, M*C, L]
            child_f, child_xe, _ = ev.evaluate(children.view(-1, L), owner_pop.repeat_interleave(C), it)
            child_f, child_xe = child_f.view(K, M * C), child_xe.view(K, M * C)
            for k in range(K):
                pool = torch.cat([pop[k], children[k]])
                pf, px = torch.cat([pop_f[k], child_f[k]]), torch.cat([pop_xe[k], child_xe[k]])
                best = select_members(pf, px, lams)
                old_loss = -pop_f[k] + lams * pop_xe[k]
                pop[k], pop_f[k], pop_xe[k] = pool[best], pf[best], px[best]
                improved = bool((-pop_f[k] + lams * pop_xe[k] < old_loss - 1e-12).any())
                stall[k] = 0 if improved else stall[k] + 1
                periodic = cfg.restart_every and it % cfg.restart_every == 0
                if periodic or (cfg.restart_patience and stall[k] >= cfg.restart_patience):
                    stall[k] = 0
                    # Restart from one member, chosen under a penalty drawn log-uniformly at random.
                    lam_r = math.exp(lam_lo + (lam_hi - lam_lo) * torch.rand((), generator=gens[k]).item())
                    j = int((-pop_f[k] + lam_r * pop_xe[k]).argmin())
                    pop[k], pop_f[k], pop_xe[k] = pop[k][j].expand(M, L).clone(), pop_f[k][j].expand(M).clone(), pop_xe[k][j].expand(M).clone()
            snap, done, counts = snapshot(), it, (ev.n_forward, ev.n_gradient, ev.token_forwards)
            _update_bar(bar, ev, K)
            if cfg.checkpoint_every and it % cfg.checkpoint_every == 0:
                save_checkpoint(results("checkpoint"), cfg.checkpoint_dir, single)
            if callback is not None and _call(callback, it, pop, pop_f, pop_xe, ev, model, K):
                stopped = "callback"
                break
            if cfg.max_token_forwards is not None and ev.token_forwards >= cfg.max_token_forwards:
                stopped = "budget"
                break
    except KeyboardInterrupt:
        stopped = "interrupted"
        warnings.warn(f"interrupted: returning the result of the {done} completed iterations", stacklevel=2)
    except Exception as e:  # a bug or a failing callback: keep what was found, then fail
        save_partial(e, results("error", f"{type(e).__name__}: {e}"), cfg.checkpoint_dir, single)
        raise
    finally:
        fast.close()
        if bar is not None:
            bar.close()
    out = results(stopped)
    return out[0] if single else out


def save_checkpoint(results: list[DreamResult], folder: str | None, single: bool) -> None:
    if folder is None:
        return
    if single:
        results[0].save(folder, overwrite=True)  # replaces the run's previous checkpoint
    else:
        for k, r in enumerate(results):
            r.save(Path(folder) / f"objective_{k}", overwrite=True)


def save_partial(e: BaseException, results: list[DreamResult], folder: str | None, single: bool) -> None:
    """Before an exception leaves a run: attach the partial result to it (`e.dreamlens_result`), save it
    to `folder` when there is one (a failed save is noted, never masks `e`), and say how to resume."""
    e.dreamlens_result = results[0] if single else results  # type: ignore[attr-defined]
    where = "it is on the exception as .dreamlens_result"
    if folder is not None:
        try:
            save_checkpoint(results, folder, single)
            where = f"saved to {folder}"
        except Exception as save_error:  # noqa: BLE001 - the original error matters more
            where += f" (saving it to {folder} failed: {save_error})"
    e.add_note(f"dreamlens: the partial result ({results[0].iterations} iterations) {where}; resume= continues it")


def _progress(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="dreaming", unit="it", dynamic_ncols=True)


def _update_bar(bar: Any, ev: Evaluator, K: int) -> None:
    if bar is None:
        return
    vals = ev.hist_vals[0]
    if vals:
        i = int(np.argmax(vals))
        bar.set_postfix(best=f"{vals[i]:.3f}", xe=f"{ev.hist_xe[0][i]:.2f}", prompts=len(vals))
    bar.update(1)


def _call(callback: Callable, it: int, pop: Tensor, pop_f: Tensor, pop_xe: Tensor, ev: Evaluator, model: Any, K: int) -> bool:
    from ..models import decode

    stop = False
    for k in range(K):
        info = IterationInfo(
            iteration=it, objective=k, texts=[decode(model, r) for r in pop[k]],
            activation=pop_f[k].tolist(), xe=pop_xe[k].tolist(),
            best_activation=max(ev.hist_vals[k]) if ev.hist_vals[k] else float("-inf"),
            token_forwards=ev.token_forwards,
        )
        stop = bool(callback(info)) or stop
    return stop
