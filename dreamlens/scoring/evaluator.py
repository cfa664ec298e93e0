"""The evaluator every optimizer scores candidates through: deduplication, the re-tokenization check,
prefix reuse, what it spent (Compute) and every prompt it scored per objective (History)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..results import stack_ids
from .batching import Batcher, Batching, buckets, call_cost_tokens, estimate_batch_tokens, pass_tokens
from .cache import ScoreCache
from .gradients import gradient_pass
from .recorder import PassRecorder
from .reuse import Parents, forward_from, record_parents, reuse_obstacle
from .tokens import retokenizes
from .xe import full_pass, score, score_batched

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from ..objectives import Objective
    from .layout import Layout

GRADIENT_COST = 3  # a forward+backward pass costs about three forwards per token


class History:
    """Every distinct prompt scored for one objective, in the order it was first scored: its ids, value,
    xe, iteration and text (what a DreamResult stores). Read `values`, `xe` etc.; add through the
    Evaluator."""

    def __init__(self, length: int):
        self.length = length
        self.ids: list[Tensor] = []
        self.values: list[float] = []
        self.xe: list[float] = []
        self.iteration: list[int] = []
        self.text: list[str] = []
        self._seen: set[bytes] = set()

    def __len__(self) -> int:
        return len(self.values)

    def __contains__(self, key: bytes) -> bool:
        """Whether the prompt with this ScoreCache key is in the history."""
        return key in self._seen

    def add(self, key: bytes, ids: Tensor, value: float, xe: float, iteration: int, text: str) -> None:
        """Append one prompt (`key`: its ScoreCache key)."""
        self._seen.add(key)
        self.ids.append(ids)
        self.values.append(float(value))
        self.xe.append(float(xe))
        self.iteration.append(int(iteration))
        self.text.append(str(text))

    def best(self) -> int | None:
        """Index of the highest value (the first one on ties); None when empty."""
        return int(np.argmax(self.values)) if self.values else None

    def best_value(self) -> float:
        """The highest value (-inf when empty)."""
        return max(self.values) if self.values else float("-inf")

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
        """ids [n, length] (prompts of several lengths: one row each, `results.stack_ids`), values, xe,
        iteration (numpy) and texts."""
        return (
            stack_ids([r.numpy() for r in self.ids], self.length),
            np.asarray(self.values, dtype=np.float64),
            np.asarray(self.xe, dtype=np.float64),
            np.asarray(self.iteration, dtype=np.int64),
            list(self.text),
        )


@dataclass
class Compute:
    """What an evaluator has spent: prompts forwarded, gradient rows, and token-forwards (a gradient
    pass counts GRADIENT_COST per token); and, for benchmarks, what prefix reuse saved."""

    n_forward: int = 0  # prompts scored in forward passes
    n_gradient: int = 0  # prompts through forward+backward passes
    token_forwards: int = 0
    reused_rows: int = 0  # candidates computed from a parent's prefix
    saved_token_forwards: int = 0  # positions not recomputed thanks to reuse

    def add_tokens(self, n: int) -> None:
        """Count `n` token-forwards spent outside the evaluator (sampling, the model's next-token steps)."""
        self.token_forwards += n

    def add_forward(self, prompts: int, tokens: int) -> None:
        self.n_forward += prompts
        self.token_forwards += tokens

    def add_gradient(self, rows: int, tokens: int) -> None:
        self.n_gradient += rows
        self.token_forwards += tokens

    def add_reused(self, rows: int, saved_tokens: int) -> None:
        self.reused_rows += rows
        self.saved_token_forwards += saved_tokens

    def merge(self, other: Compute) -> None:
        """Add another evaluator's spending to this one."""
        self.add_forward(other.n_forward, other.token_forwards)
        self.add_gradient(other.n_gradient, 0)
        self.add_reused(other.reused_rows, other.saved_token_forwards)

    def counts(self) -> tuple[int, int, int]:
        """(n_forward, n_gradient, token_forwards), as a DreamResult reports them."""
        return self.n_forward, self.n_gradient, self.token_forwards

    def restore(self, n_forward: int, n_gradient: int, token_forwards: int) -> None:
        """Continue from a saved run's counts (for resume)."""
        self.n_forward, self.n_gradient, self.token_forwards = n_forward, n_gradient, token_forwards


class Evaluator:
    """Scores candidate prompts for K objectives at once and records what each optimizer evaluated.

    Each candidate row has an `owner`: the objective (population) it was proposed for. A prompt is
    forwarded once; its values for all K objectives are cached, so a prompt proposed again (by any
    owner) is never recomputed. `history[k]` keeps owner k's rows, once per distinct prompt; `compute`
    counts what was spent.

    Candidates are placed, and checked to re-tokenize, in the `layout`'s context. `batching` (default
    `Batching()`): `dedup=False` (for comparisons only) forwards every row and every gradient row,
    repeats included. Prefix reuse (`reuse_prefix`): the latest `gradients` pass (or `remember`) leaves
    its prompts' keys/values behind; a candidate that shares a prefix with one of them is computed from
    its first differing position on. Batches hold at most `batch_size` prompts and `max_batch_tokens`
    tokens (default: estimated from free memory); on out-of-memory they are halved. A `recorder`
    (benchmarks only) is told every pass group and gradient pass."""

    def __init__(
        self,
        model: HookedTransformer,
        objectives: Sequence[Objective],
        layout: Layout,
        batching: Batching | None = None,
        *,
        recorder: PassRecorder | None = None,
    ):
        batching = Batching() if batching is None else batching
        self.model, self.objectives, self.layout, self.batching = model, list(objectives), layout, batching
        self.recorder = recorder
        self.cache = ScoreCache(batching.cache_size)
        self.history = [History(layout.length) for _ in self.objectives]
        self.compute = Compute()
        self.reuse_obstacle = reuse_obstacle(model, self.objectives) if batching.reuse_prefix else "reuse=False"
        self.reuse = self.reuse_obstacle is None
        self._checked = False  # reuse is compared once with the full pass before it is trusted
        self._parents: Parents | None = None
        self._hooks = list(dict.fromkeys(h for o in self.objectives for h in o.hooks))
        max_tokens = batching.max_batch_tokens
        self.batcher = Batcher(pass_tokens(model, layout.seq_len, batching.batch_size, max_tokens))
        self.grad_batcher = Batcher(max_tokens or estimate_batch_tokens(model, layout.seq_len, grad=True))
        self.call_cost = call_cost_tokens(model)

    def sibling(self, length: int) -> Evaluator:
        """An evaluator of spans of `length` tokens in the same context, with the same settings, that
        shares this one's cache, histories and compute (so prompts of a length range are scored once,
        recorded in one history, and charged to one budget), and its recorder. Its prefix reuse is its own."""
        batching = replace(self.batching, reuse_prefix=self.reuse, cache_size=self.cache.max_size)
        other = Evaluator(self.model, self.objectives, self.layout.with_length(length), batching, recorder=self.recorder)
        other.cache, other.history, other.compute = self.cache, self.history, self.compute
        other.reuse_obstacle, other._checked = self.reuse_obstacle, self._checked  # reuse was checked on this model
        return other

    def forget_parents(self) -> None:
        """Drop what the latest gradient pass left for prefix reuse: candidates get full passes until the
        next one (so that what a candidate costs never depends on passes of earlier iterations)."""
        self._parents = None

    @property
    def parents(self) -> Parents | None:
        """What the latest gradient (or remember) pass left for prefix reuse (for benchmarks)."""
        return self._parents

    def restore(
        self,
        owner: int,
        ids: Sequence[Any] | Tensor | np.ndarray,
        values: Sequence[float] | np.ndarray,
        xe: Sequence[float] | np.ndarray,
        iteration: Sequence[int] | np.ndarray,
        text: Sequence[str],
    ) -> None:
        """Load a saved history (for resume): the cache and the history are rebuilt from it."""
        for row, v, x, it, t in zip(ids, values, xe, iteration, text):
            key = ScoreCache.key(row)
            vals = np.full(len(self.objectives), np.nan)
            vals[owner] = v
            cached = self.cache.get(key)
            if cached is not None:
                vals = np.where(np.isnan(vals), cached[0], vals)
            self.cache.put(key, (vals, float(x)))
            self.history[owner].add(key, torch.as_tensor(row, dtype=torch.long), v, x, it, t)

    def evaluate(
        self, span_ids: Int[Tensor, "n length"], owner: Int[Tensor, " n"], iteration: int
    ) -> tuple[Float[Tensor, " n"], Float[Tensor, " n"], Bool[Tensor, " n"]]:
        """f (for each row's own objective), xe, and whether the row is valid (re-tokenizes).
        Invalid rows get f = -inf and xe = +inf, so no selection ever keeps them."""
        n = span_ids.shape[0]
        ok, texts = retokenizes(self.model, span_ids, self.layout)
        keys = [ScoreCache.key(r) for r in span_ids.cpu()]
        first: dict[bytes, int] = {}  # each distinct prompt's first row
        for i in range(n):
            if ok[i]:
                first.setdefault(keys[i], i)
        known: dict[bytes, tuple[np.ndarray, float]] = {}  # taken now: later puts may evict them
        if self.batching.dedup:
            for key in first:
                got = self.cache.get(key)
                if got is not None:
                    known[key] = got
            rows_list = [i for key, i in first.items() if key not in known]
        else:  # for comparisons only: every valid row is forwarded
            rows_list = [i for i in range(n) if ok[i]]
        fresh: dict[int, tuple[np.ndarray, float]] = {}
        if rows_list:
            rows = torch.tensor(rows_list, dtype=torch.long)
            vals, xe = self.score_rows(span_ids[rows], torch.as_tensor(owner).cpu()[rows])
            vals_np, xe_np = vals.T.cpu().double().numpy(), xe.cpu().double().numpy()
            for j, i in enumerate(rows_list):
                fresh[i] = (vals_np[j], float(xe_np[j]))
                self.cache.put(keys[i], fresh[i])
        f = torch.full((n,), float("-inf"), dtype=torch.float64)
        x = torch.full((n,), float("inf"), dtype=torch.float64)
        for i in range(n):
            if not ok[i]:
                continue
            vals_i, xe_i = fresh.get(i) or known.get(keys[i]) or fresh[first[keys[i]]]
            o = int(owner[i])
            v = vals_i[o]
            if np.isnan(v):  # known from a restored history of another owner only: score it now
                vv, xx = score(self.model, self.objectives, span_ids[i : i + 1], self.layout)
                self.compute.add_forward(1, self.layout.seq_len)
                vals_i = vv[:, 0].double().numpy()
                self.cache.put(keys[i], (vals_i, float(xx[0])))
                v = vals_i[o]
            f[i], x[i] = float(v), float(xe_i)
            if keys[i] not in self.history[o]:  # a copy: never a view of a live population
                self.history[o].add(keys[i], span_ids[i].cpu().clone(), v, xe_i, iteration, texts[i])
        return f, x, ok

    @torch.no_grad()
    def score_rows(
        self, span_ids: Int[Tensor, "n length"], owner: Int[Tensor, " n"] | None = None
    ) -> tuple[Float[Tensor, "n_obj n"], Float[Tensor, " n"]]:
        """Values (all objectives) and xe of these prompts, with prefix reuse where a parent is known
        (of the row's `owner` population, when given); counts the compute. No caching, no history."""
        n, L = span_ids.shape
        head, seq = len(self.layout.head), self.layout.seq_len
        device = self.model.cfg.device
        span_ids = span_ids.to(device)
        starts = torch.zeros(n, dtype=torch.long)
        par = torch.zeros(n, dtype=torch.long)
        if self.reuse and self._parents is not None:
            par, shared = self._parents.match(span_ids.cpu(), None if owner is None else torch.as_tensor(owner).cpu())
            starts = head + shared.clamp(max=L - 1).long()  # recompute at least the last span token
        vals = torch.zeros((len(self.objectives), n), dtype=torch.float64)
        xe = torch.zeros(n, dtype=torch.float64)
        rec = self.recorder
        if rec is not None:
            rec.scoring()

        def score_full(idx: Tensor) -> None:
            rows = span_ids[idx.to(device)]
            v, x = score_batched(self.model, self.objectives, rows, self.layout, self.batcher)
            vals[:, idx], xe[idx] = v.double().cpu(), x.double().cpu()
            self.compute.add_tokens(len(idx) * seq)
            if rec is not None:
                rec.pass_group(0, rows, None)

        full = torch.nonzero(starts == 0).flatten()  # no parent; or no start token and a new first token
        if len(full):
            score_full(full)
        reused = starts[starts > 0]
        if len(reused):
            distinct, counts = torch.unique(reused, return_counts=True)
            groups = buckets(distinct.tolist(), counts.tolist(), seq, self.batcher, self.call_cost)
        else:
            groups = []
        for group in groups:  # a group runs from its smallest start: equal lengths, shared passes
            start = group[0]
            idx = torch.nonzero((starts >= start) & (starts <= group[-1])).flatten()
            if not self._checked:
                self._check(span_ids[idx[:2].to(device)], start, par[idx[:2]])
            if not self.reuse:  # switched off by the check
                score_full(idx)
                continue
            rows = span_ids[idx.to(device)]
            tokens = self.layout.assemble(rows)
            p = par[idx].to(device)
            if rec is not None:
                rec.pass_group(start, rows, p)

            def run(lo: int, hi: int, tokens: Tensor = tokens, p: Tensor = p, start: int = start) -> tuple[Tensor, Tensor]:
                assert self._parents is not None
                return forward_from(
                    self.model, self.objectives, self._hooks, tokens[lo:hi], self.layout, start, self._parents, p[lo:hi]
                )

            parts = self.batcher.run(len(idx), seq - start, run)
            vals[:, idx] = torch.cat([v for v, _ in parts], dim=1).double().cpu()
            xe[idx] = torch.cat([x for _, x in parts]).double().cpu()
            self.compute.add_tokens(len(idx) * (seq - start))
            self.compute.add_reused(len(idx), len(idx) * start)
        self.compute.add_forward(n, 0)
        return vals, xe

    def _check(self, span_ids: Tensor, start: int, par: Tensor) -> bool:
        """Prefix reuse against the full pass on a couple of rows, once; off (with a warning) if they differ."""
        assert self._parents is not None
        tokens = self.layout.assemble(span_ids)
        v_r, x_r = forward_from(
            self.model, self.objectives, self._hooks, tokens, self.layout, start, self._parents, par.to(tokens.device)
        )
        v_f, x_f = score(self.model, self.objectives, span_ids, self.layout)
        self.compute.add_tokens(span_ids.shape[0] * self.layout.seq_len)
        scale = 1.0 + max(float(v_f.abs().max()) if v_f.numel() else 0.0, float(x_f.abs().max()))
        err = max(float((v_r - v_f).abs().max()) if v_f.numel() else 0.0, float((x_r - x_f).abs().max()))
        self._checked = True
        if err > 1e-3 * scale:
            self.reuse, self.reuse_obstacle = False, f"it differed from the full pass by {err:.3g} on this model"
            warnings.warn(f"prefix reuse is off: {self.reuse_obstacle}; every candidate gets a full pass", stacklevel=4)
            return False
        return True

    def gradients(
        self, span_ids: Int[Tensor, "n length"], owner: Int[Tensor, " n"], lam: Float[Tensor, " n"]
    ) -> Float[Tensor, "n length d_vocab"]:
        """One-hot gradients of each row's `-f_owner + lam * xe`, in forward/backward passes; the rows
        become the parents whose prefixes the next candidates reuse.

        Rows that repeat a prompt for the same owner (a population after a restart, or neighbouring
        penalties that chose the same member) are computed once at their smallest and largest penalty;
        the gradient is linear in lam, so the others are interpolated between those two."""
        n = span_ids.shape[0]
        lam = torch.as_tensor(lam, dtype=torch.float64).cpu()
        owner = torch.as_tensor(owner).cpu()
        groups: dict[tuple[bytes, int], list[int]] = {}
        for i, row in enumerate(span_ids.cpu()):
            key = (ScoreCache.key(row), int(owner[i])) if self.batching.dedup else (b"", i)
            groups.setdefault(key, []).append(i)
        rows: list[int] = []
        plan = []
        for members in groups.values():
            ls = lam[members]
            a, b = members[int(ls.argmin())], members[int(ls.argmax())]
            plan.append((members, len(rows), len(rows) + int(a != b)))
            rows.extend([a, b] if a != b else [a])
        idx = torch.tensor(rows, dtype=torch.long)
        sub_lam, sub_owner = lam[idx], owner[idx]
        W_E = self.model.embed.W_E
        g = torch.empty((len(rows), self.layout.length, W_E.shape[0]), dtype=W_E.dtype, device=W_E.device)

        def run(ids: Tensor, lo: int, hi: int) -> tuple[Any, ...]:
            grad_part, *rest = gradient_pass(self.model, self.objectives, ids, self.layout, sub_lam[lo:hi], sub_owner[lo:hi])
            g[lo:hi] = grad_part  # filled in place: the passes' parts are never all held at once
            return (None, *rest)

        self._passes(span_ids[idx], run, owner=sub_owner)
        if len(rows) == n and rows == list(range(n)):
            grad = g
        else:
            grad = g.new_empty((n, *g.shape[1:]))
            for members, ia, ib in plan:
                la, lb = float(sub_lam[ia]), float(sub_lam[ib])
                for i in members:
                    t = 0.0 if lb == la else (float(lam[i]) - la) / (lb - la)
                    grad[i] = g[ia] if t == 0.0 else g[ib] if t == 1.0 else torch.lerp(g[ia], g[ib], t)
        self.compute.add_gradient(len(rows), GRADIENT_COST * len(rows) * self.layout.seq_len)
        if self.recorder is not None:
            self.recorder.gradient_pass(span_ids[idx])
        return grad

    @torch.no_grad()
    def remember(self, span_ids: Int[Tensor, "n length"]) -> None:
        """Run these prompts once (no gradient) so that candidates can reuse their prefixes; for
        optimizers that propose children without a gradient pass over the parents."""
        if not self.reuse:
            return

        def run(ids: Tensor, lo: int, hi: int) -> tuple[Any, ...]:
            _, ce, lse, final = full_pass(self.model, self.objectives, self.layout.assemble(ids), self.layout)
            return (None, None, None, (ce, lse, final))

        self._passes(span_ids, run, self.batcher)
        self.compute.add_tokens(span_ids.shape[0] * self.layout.seq_len)

    def _passes(
        self, span_ids: Tensor, fn: Callable[[Tensor, int, int], tuple[Any, ...]], batcher: Batcher | None = None,
        owner: Tensor | None = None,
    ) -> list[Any]:
        """Run `fn(ids, lo, hi)` over row batches; with reuse on, also keep what children need
        (`reuse.record_parents`)."""
        device = self.model.cfg.device
        span_ids = span_ids.to(device)
        batcher = batcher or self.grad_batcher
        if not self.reuse:
            return batcher.run(span_ids.shape[0], self.layout.seq_len, lambda lo, hi: fn(span_ids[lo:hi], lo, hi))
        parts, parents = record_parents(self.model, self._hooks, span_ids, self.layout.seq_len, fn, batcher, owner)
        if parents is not None:
            self._parents = parents
        elif parts:  # an attention layer took no cache entry
            self.reuse, self.reuse_obstacle = False, "the model's attention layers do not take KV-cache entries"
            warnings.warn(f"prefix reuse is off: {self.reuse_obstacle}; every candidate gets a full pass", stacklevel=3)
        return parts
