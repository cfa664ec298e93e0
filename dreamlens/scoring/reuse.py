"""Prefix reuse: children computed from their parents' KV caches, over their changed positions only.

A child shares its parent's tokens before its first changed position P, so nothing before P needs
recomputing: parents keep their keys/values (exactly as TransformerLens's KV cache stores them), their
activations at the objectives' hooks and their per-position CE; a child runs over positions P.. only,
attending to its parent's cached keys/values. Its objective values are read from the parent's
activations before P spliced to its own from P on (so max/mean reductions, fixed positions and suffix
context all stay exact), and its xe adds the parent's CE terms before P.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..objectives import Capture, NonFiniteError, ObjectiveError, hook_shape, unembed
from .xe import ce_terms, token_logits

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from ..objectives import Objective
    from .batching import Batcher
    from .layout import Layout


def kv_classes() -> tuple[Any, Any]:
    """TransformerLens's KV cache and KV cache entry classes (under either version's names)."""
    try:
        # lazy: transformer_lens takes seconds to load; no module imports it at its top
        from transformer_lens import (
            TransformerLensKeyValueCache,
            TransformerLensKeyValueCacheEntry,
        )
    except ImportError:  # TransformerLens before 3.x
        # lazy: transformer_lens takes seconds to load; no module imports it at its top
        from transformer_lens.past_key_value_caching import (  # type: ignore[no-redef]  # pyright: ignore[reportMissingImports]
            HookedTransformerKeyValueCache as TransformerLensKeyValueCache,
        )
        from transformer_lens.past_key_value_caching import (  # pyright: ignore[reportMissingImports]
            HookedTransformerKeyValueCacheEntry as TransformerLensKeyValueCacheEntry,
        )
    return TransformerLensKeyValueCache, TransformerLensKeyValueCacheEntry


class KVRecorder:
    """Hands each attention layer an empty KV-cache entry when it has none, so an ordinary forward pass
    leaves every layer's keys and values behind as TransformerLens caches them (whatever the
    architecture does to them: rotary offsets, QK-norm, clipping), without changing the computation."""

    def __init__(self, model: HookedTransformer):
        self.model = model
        self.entries: list[list[Any]] = [[] for _ in range(model.cfg.n_layers)]
        self.handles: list[Any] = []

    def __enter__(self) -> KVRecorder:
        _, Entry = kv_classes()
        cfg = self.model.cfg

        def pre(layer: int, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if kwargs.get("past_kv_cache_entry") is not None:
                return None
            x = kwargs.get("key_input", args[1] if len(args) > 1 else None)
            if not isinstance(x, Tensor):
                return None  # not TransformerLens's attention signature: no entry, and reuse turns off
            entry = Entry.init_cache_entry(cfg, x.device, x.shape[0])
            self.entries[layer].append(entry)
            return args, {**kwargs, "past_kv_cache_entry": entry}

        for i, block in enumerate(self.model.blocks):
            self.handles.append(block.attn.register_forward_pre_hook(lambda m, a, k, i=i: pre(i, m, a, k), with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def take(self) -> tuple[list[Tensor], list[Tensor]]:
        keys = [torch.cat([e.past_keys.detach() for e in es]) for es in self.entries]
        values = [torch.cat([e.past_values.detach() for e in es]) for es in self.entries]
        self.entries = [[] for _ in self.entries]
        return keys, values


@dataclass
class Parents:
    """What the latest pass over parents left for their children (one row per parent)."""

    ids: Tensor  # [R, length] span ids, on the CPU
    keys: list[Tensor]  # per layer [R, seq, kv_heads, d_head]
    values: list[Tensor]
    acts: dict[str, Tensor]  # the objectives' hooks, [R, seq, ...]
    final: Tensor  # [R, n_pred, d_model] final normalized residual at the CE positions
    lse: Tensor  # [R, n_pred] log-normalizer of the logits there
    ce: Tensor  # [R, n_pred] CE of the parent's own next tokens
    owner: Tensor | None = None  # [R] the population each parent belongs to (None: any)

    def match(self, span_ids: Tensor, owner: Tensor | None = None, chunk: int = 4096) -> tuple[Tensor, Tensor]:
        """For each row, the parent sharing the longest prefix with it, and that prefix's length.
        With owners, a row prefers its own population's parents (so a population computes the same
        way whether it runs alone or beside others)."""
        par, shared = [], []
        for i in range(0, span_ids.shape[0], chunk):
            eq = span_ids[i : i + chunk, None, :] == self.ids[None, :, :]  # [n, R, L]
            common = eq.to(torch.int32).cumprod(dim=2).sum(dim=2)  # [n, R]
            if owner is not None and self.owner is not None:
                same = owner[i : i + chunk, None] == self.owner[None, :]
                common = torch.where(same.any(dim=1, keepdim=True) & ~same, -1, common)
            best = common.max(dim=1)
            par.append(best.indices)
            shared.append(best.values)
        return torch.cat(par), torch.cat(shared)


def reuse_obstacle(model: HookedTransformer, objectives: Sequence[Objective]) -> str | None:
    """Why prefix reuse cannot apply to these objectives on this model (None: it can)."""
    # lazy: transformer_lens takes seconds to load; no module imports it at its top
    from transformer_lens import HookedTransformer

    cfg = model.cfg
    if not isinstance(model, HookedTransformer):
        return f"the model is a {type(model).__name__}, not a HookedTransformer"
    if getattr(cfg, "attention_dir", "causal") != "causal":
        return "the model's attention is not causal"
    if not hasattr(model, "blocks") or not all(hasattr(b, "attn") for b in model.blocks):
        return "the model has no TransformerLens attention blocks"
    for h in dict.fromkeys(h for o in objectives for h in o.hooks):
        if h.startswith("unembed."):
            return f"an objective reads {h}"
        try:
            hook_shape(model, h)
        except ObjectiveError:
            return f"an objective reads {h}, which has no single position axis"
    return None


def record_parents(
    model: HookedTransformer,
    hooks: Sequence[str],
    span_ids: Int[Tensor, "n length"],
    seq_len: int,
    fn: Callable[[Tensor, int, int], tuple[Any, ...]],
    batcher: Batcher,
    owner: Tensor | None = None,
) -> tuple[list[tuple[Any, ...]], Parents | None]:
    """Run `fn(ids, lo, hi)` over row batches and keep what children of these rows need: keys/values,
    the activations at `hooks`, and the (CE, log-normalizers, final residual) that `fn` returns last.
    The parents are None when nothing ran, or when an attention layer took no cache entry (reuse
    cannot apply on this model)."""
    acts: dict[str, list[Tensor]] = {h: [] for h in hooks}

    def save(act: Tensor, hook: Any) -> None:
        acts[hook.name].append(act.detach())

    with KVRecorder(model) as rec, model.hooks(fwd_hooks=[(h, save) for h in hooks]):

        def run(lo: int, hi: int) -> Any:
            n_acts = {h: len(a) for h, a in acts.items()}
            n_kv = [len(es) for es in rec.entries]
            try:
                return fn(span_ids[lo:hi], lo, hi)
            except Exception:  # a failed (out-of-memory) batch leaves nothing behind
                for h, a in acts.items():
                    del a[n_acts[h] :]
                for es, k in zip(rec.entries, n_kv):
                    del es[k:]
                raise

        parts = batcher.run(span_ids.shape[0], seq_len, run)
    if not parts or any(len(es) != len(parts) for es in rec.entries):
        return parts, None
    keys, values = rec.take()
    ce, lse, final = (torch.cat([p[-1][i] for p in parts]) for i in range(3))
    parents = Parents(
        ids=span_ids.cpu(), keys=keys, values=values, acts={h: torch.cat(a) for h, a in acts.items()},
        final=final, lse=lse, ce=ce, owner=owner,
    )
    return parts, parents


@torch.no_grad()
def forward_from(
    model: HookedTransformer,
    objectives: Sequence[Objective],
    hooks: Sequence[str],
    tokens: Int[Tensor, "batch seq"],
    layout: Layout,
    start: int,
    parents: Parents,
    par: Int[Tensor, " batch"],
) -> tuple[Float[Tensor, "n_obj batch"], Float[Tensor, " batch"]]:
    """Values and xe of rows that equal their parents before position `start`, computing only
    positions start.. (the parents' keys/values stand in for the rest)."""
    Cache, Entry = kv_classes()
    b, dev = tokens.shape[0], tokens.device
    entries = [
        Entry(past_keys=k[par.to(k.device), :start], past_values=v[par.to(v.device), :start], frozen=True)
        for k, v in zip(parents.keys, parents.values)
    ]
    cache = Cache(entries=entries, previous_attention_mask=torch.ones((b, start), dtype=torch.int, device=dev), frozen=True)
    new = tokens[:, start:]
    acts: dict[str, Tensor] = {}

    def save(act: Tensor, hook: Any) -> None:
        acts[hook.name] = act

    with model.hooks(fwd_hooks=[(h, save) for h in hooks]):
        # An explicit all-ones mask: TransformerLens would otherwise mask every pad-token id it sees.
        resid = model(new, past_kv_cache=cache, attention_mask=torch.ones_like(new), stop_at_layer=model.cfg.n_layers)
        normed = model.ln_final(resid) if model.cfg.normalization_type is not None else resid
    full = {h: torch.cat([parents.acts[h][par, :start], acts[h]], dim=1) for h in hooks}
    logits = unembed(model, normed[:, -1:]) if any(o.needs_logits for o in objectives) else None
    capture = Capture(acts=full, logits=logits, start=layout.start, model=model)
    vals = [o.value(capture) for o in objectives]
    if vals:
        values = torch.stack([v.to(torch.promote_types(v.dtype, torch.float32)) for v in vals])
    else:
        values = torch.zeros((0, b), device=dev)
    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        raise NonFiniteError(
            "the model produced NaN or infinite objective values; usually an overflow in a low-precision dtype "
            "(load the model in float32) or broken weights"
        )
    lo, hi = layout.xe_from - 1, layout.span.stop - 1  # CE positions lo..hi-1 predict tokens lo+1..hi
    j = start - 1 - lo  # the parent's residual at start-1 predicts the child's new token at start
    before = parents.ce[par, :j].sum(dim=1)
    at = parents.lse[par, j] - token_logits(model, parents.final[par, j], tokens[:, start])
    after, _ = ce_terms(model, normed[:, : hi - start], tokens[:, start + 1 : hi + 1])
    xe = (before + at + after.sum(dim=1)) / (hi - lo)
    if not bool(torch.isfinite(xe).all()):
        raise NonFiniteError("the model's fluency (xe) is NaN or infinite; load the model in float32, or check its weights")
    return values, xe
