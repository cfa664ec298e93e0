"""The shared forward pass: `Capture` (what one pass hands to objectives), `leaves`, `run_objectives`
(validate, one forward, every objective's value), `forward_capture` (the forward alone), `stop_at_layer`,
`default_start`, `unembed` and `soft_cap`. It reads objectives through their protocol only (hooks, validate,
value), so it imports none of them: the protocol (`base.py`) stands on it."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..models import bos_token_id
from .errors import NonFiniteError, ObjectiveError
from .hooks import hook_info, stop_for_hooks

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from .base import Objective


# ---------------------------------------------------------------------------------------------
# What one forward pass hands to objectives


@dataclass
class Capture:
    """Activations of one forward pass: `acts[hook]` as the hook saw it (`[batch, pos, ...]`, or
    `[batch, head, query, key]` for attention patterns); `logits` `[batch, 1, vocab]` at the final
    position when an objective needs them. `start` is the first position that belongs to the prompt
    (positions before it, such as the start token, are never reduced over)."""

    acts: dict[str, Tensor]
    logits: Tensor | None
    start: int = 0
    memo: dict[Any, Any] = field(default_factory=dict)
    model: HookedTransformer | None = None


def leaves(objectives: Sequence[Objective]) -> list[Objective]:
    """The single objectives that `objectives` are made of, in order (a combination gives its terms,
    a maximum its parts, any other objective itself). A forward pass computes these."""
    out: list[Objective] = []
    for o in objectives:
        for _, leaf in o.terms:
            parts = getattr(leaf, "parts", None)  # a non-linear composite (`Max`)
            out.extend(leaves(parts) if parts else [leaf])
    return out


def stop_at_layer(model: HookedTransformer, objectives: Sequence[Objective]) -> int | None:
    """The earliest `stop_at_layer` that computes all `objectives` (None: run the whole model)."""
    if any(o.needs_logits for o in objectives):
        return None
    return stop_for_hooks([h for o in objectives for h in o.hooks])


def default_start(model: HookedTransformer, tokens: Int[Tensor, "batch pos"]) -> int:
    """1 when every row begins with the model's start token (it is not part of the prompt), else 0."""
    bos = bos_token_id(model)
    return int(bos is not None and tokens.shape[1] > 1 and bool((tokens[:, 0] == bos).all()))


def soft_cap(model: HookedTransformer, logits: Float[Tensor, "*shape"]) -> Float[Tensor, "*shape"]:
    """`logits` through the model's output soft-cap, `cap * tanh(logits / cap)` with
    `cap = model.cfg.output_logits_soft_cap` (Gemma 2), as the model's own forward applies it;
    unchanged when the model has no cap. The one place of the soft-cap in dreamlens."""
    cap = getattr(model.cfg, "output_logits_soft_cap", -1.0)
    return cap * torch.tanh(logits / cap) if cap and cap > 0 else logits


def unembed(model: HookedTransformer, normed: Float[Tensor, "batch n d_model"]) -> Float[Tensor, "batch n d_vocab"]:
    """Logits from the final normalized residual stream (as the model's own forward computes them)."""
    return soft_cap(model, model.unembed(normed))


def _check_inputs(
    model: HookedTransformer, tokens: Any, embeds: Tensor | None, start: int | None, final_from: int | None
) -> Tensor:
    if not isinstance(tokens, Tensor):
        raise ObjectiveError(f"tokens must be a LongTensor [batch, pos], got {type(tokens).__name__}")
    if tokens.ndim != 2 or tokens.shape[1] == 0:
        hint = "; for one prompt use tokens[None]" if tokens.ndim == 1 else ""
        raise ObjectiveError(f"tokens must have shape [batch, pos] with pos >= 1, got {list(tokens.shape)}{hint}")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise ObjectiveError(f"tokens must be integer token ids, got dtype {tokens.dtype}")
    n_pos, V = tokens.shape[1], model.cfg.d_vocab
    if n_pos > model.cfg.n_ctx:
        raise ObjectiveError(f"prompts of {n_pos} tokens exceed the model's context of {model.cfg.n_ctx} tokens")
    if tokens.numel():
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= V:
            raise ObjectiveError(f"token id {lo if lo < 0 else hi} is outside the vocabulary (0..{V - 1})")
    if embeds is not None:
        want = [tokens.shape[0], n_pos, model.cfg.d_model]
        if list(embeds.shape) != want:
            raise ObjectiveError(f"embeds must have shape [batch, pos, d_model] = {want}, got {list(embeds.shape)}")
    if start is not None and not (isinstance(start, int) and 0 <= start < n_pos):
        raise ObjectiveError(f"start must be a position in 0..{n_pos - 1}, got {start!r}")
    if final_from is not None and not (isinstance(final_from, int) and 0 <= final_from < n_pos):
        raise ObjectiveError(f"final_from must be a position in 0..{n_pos - 1}, got {final_from!r}")
    return tokens.to(torch.long)


def _check_objectives(objectives: Sequence[Any]) -> list[Objective]:
    """`objectives` as a list, each an objective (a string is parsed where it enters: `dl.objective`)."""
    for o in objectives:
        if isinstance(o, str):
            raise ObjectiveError(f"run_objectives takes objectives, not their string form: pass dl.objective({o!r})")
        if not callable(getattr(o, "value", None)) or not hasattr(o, "terms"):
            raise ObjectiveError(f"run_objectives takes objectives (dl.Objective instances), got {o!r}")
    return list(objectives)


def _rows(mask: Tensor) -> str:
    rows = mask.nonzero().flatten().tolist()
    return f"{rows[:8]}{' ...' if len(rows) > 8 else ''} of {mask.numel()}"


def forward_capture(
    model: HookedTransformer,
    objectives: Sequence[Objective],
    tokens: Int[Tensor, "batch pos"],
    *,
    embeds: Float[Tensor, "batch pos d_model"] | None = None,
    start: int | None = None,
    stop: int | None = None,
    final: bool = False,
) -> tuple[Capture, Float[Tensor, "batch pos d_model"] | None]:
    """One forward pass with the hooks of `objectives` (Objective instances): the `Capture` their
    `value`s read, and the final normalized residual stream at every position (or None).

    Nothing is validated (`run_objectives` checks objectives, tokens and positions first). The pass
    runs blocks up to `stop` (None: `stop_at_layer(model, objectives)`, the fewest that compute
    them; an explicit `stop` must be at least that). It runs every block and `ln_final` instead when
    `final` is set, or an objective needs logits or a hook after the last block; only then is the
    residual stream returned (after `ln_final`, `[batch, pos, d_model]`). `capture.logits` holds the
    logits at the final position (`[batch, 1, vocab]`) when an objective needs them, else None.
    `embeds` replaces the token embeddings; `start` defaults to `default_start(model, tokens)`.
    Gradients flow when called outside `torch.no_grad()`."""
    parts = leaves(objectives)
    hooks = list(dict.fromkeys(h for o in parts for h in o.hooks))
    start = default_start(model, tokens) if start is None else start
    acts: dict[str, Tensor] = {}

    def save(act: Tensor, hook: Any) -> None:
        acts[hook.name] = act

    fwd_hooks: list[tuple[str | Callable, Callable]] = [(h, save) for h in hooks]
    if embeds is not None:
        fwd_hooks.insert(0, ("hook_embed", lambda act, hook: embeds.to(act.dtype)))
    needs_logits = any(o.needs_logits for o in parts)
    if stop is None:
        stop = stop_at_layer(model, parts)
    needs_final = final or stop is None or needs_logits
    normed = logits = None
    with model.hooks(fwd_hooks=fwd_hooks):
        resid = model(tokens, stop_at_layer=model.cfg.n_layers if needs_final else stop)
        if needs_final:
            # ln_final runs on every position, so its hooks see the whole prompt; it is cheap.
            normed = model.ln_final(resid) if model.cfg.normalization_type is not None else resid
            if any(h.startswith("unembed.") for h in hooks):  # asked for: full logits, hooks fire
                logits = unembed(model, normed)[:, -1:]
    if needs_logits and logits is None:
        logits = unembed(model, normed[:, -1:])  # type: ignore[index]
    return Capture(acts=acts, logits=logits, start=start, model=model), normed


def run_objectives(
    model: HookedTransformer,
    objectives: Sequence[Objective],
    tokens: Int[Tensor, "batch pos"],
    *,
    embeds: Float[Tensor, "batch pos d_model"] | None = None,
    start: int | None = None,
    final_from: int | None = None,
    check_finite: bool = True,
) -> tuple[Float[Tensor, "n_objectives batch"], Float[Tensor, "batch n d_model"] | None]:
    """One forward pass computing every objective for every row.

    Everything is validated first (objectives against the model, token ids, positions), so a bad input
    fails before any compute. The pass stops after the deepest hook needed, unless `final_from` is given
    or an objective needs logits or a hook after the last block: then it runs every block and also
    returns the final normalized residual stream at positions `final_from:` (the unembedding is left to
    the caller, so full `[batch, pos, vocab]` logits are never materialized). `embeds` replaces the
    token embeddings (for gradients through one-hot inputs); `tokens` still gives the shape. Gradients
    flow when called outside `torch.no_grad()`. Values are float32 (float64 for a float64 model);
    NaN or infinite values raise `NonFiniteError` unless `check_finite=False`.
    """
    objectives = _check_objectives(objectives)
    tokens = _check_inputs(model, tokens, embeds, start, final_from)
    parts = leaves(objectives)
    hooks = list(dict.fromkeys(h for o in parts for h in o.hooks))
    if all(h in model.hook_dict for h in hooks):
        hook_info(model, hooks)  # one shape probe for all hooks (unknown names: validate explains)
    for o in parts:
        o.validate(model)
    start = default_start(model, tokens) if start is None else start
    for o in parts:
        o.check_positions(model, tokens.shape[1], start)

    capture, normed = forward_capture(model, parts, tokens, embeds=embeds, start=start, final=final_from is not None)
    if objectives:
        vals = [o.value(capture) for o in objectives]
        dtype = functools.reduce(torch.promote_types, [v.dtype for v in vals], torch.float32)
        values = torch.stack([v.to(dtype) for v in vals])
    else:
        values = torch.zeros((0, tokens.shape[0]), device=tokens.device)
    final = normed[:, final_from:] if final_from is not None else None  # type: ignore[index]
    if check_finite:
        bad = ~torch.isfinite(values.detach())
        if bool(bad.any()):
            where = "; ".join(f"{str(o)!r} in rows {_rows(row)}" for o, row in zip(objectives, bad) if row.any())
            raise NonFiniteError(
                f"the model produced NaN or infinite values for {where}. Usually an overflow in a low-precision "
                "dtype (load the model in float32) or broken weights or inputs; nothing was passed on."
            )
        if final is not None:
            bad_rows = ~torch.isfinite(final.detach()).flatten(1).all(dim=1)
            if bool(bad_rows.any()):
                raise NonFiniteError(
                    f"the model's final residual stream (used for fluency) is NaN or infinite in rows "
                    f"{_rows(bad_rows)}; load the model in float32, or check its weights and inputs"
                )
    return values, final
