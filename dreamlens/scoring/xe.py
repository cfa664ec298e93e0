"""How a candidate prompt is scored: the objectives' values and the fluency `xe` from one forward pass,
for one batch (forward_scores) or many prompts in memory-bounded batches (score).

Fluency `xe`: the mean next-token cross-entropy (nats) of the optimized tokens, each predicted from
everything before it (the start token and any prefix context). Without a start token and without a
prefix, the first optimized token has nothing to be predicted from and is not scored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..objectives import run_objectives
from ..objectives.forward import soft_cap, unembed
from .batching import Batcher, ce_rows

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from ..objectives import Objective
    from .layout import Layout


def logits(model: HookedTransformer, final: Float[Tensor, "batch n d_model"]) -> Float[Tensor, "batch n d_vocab"]:
    """The model's logits from its final residual. TransformerLens's Unembed copies W_U transposed on
    every call (113 MB for a 49k vocabulary): for the plain Unembed multiply by W_U directly."""
    U = model.unembed
    if type(U).__name__ != "Unembed" or not isinstance(getattr(U, "W_U", None), Tensor):
        return unembed(model, final)
    out = final @ U.W_U
    if getattr(U, "b_U", None) is not None:
        out = out + U.b_U
    return soft_cap(model, out)


def token_logits(
    model: HookedTransformer, final: Float[Tensor, "batch d_model"], tok: Int[Tensor, " batch"]
) -> Float[Tensor, " batch"]:
    """The logit of one token per row, without the full unembedding (soft cap included)."""
    W_U = getattr(model.unembed, "W_U", None)
    if W_U is None:
        return unembed(model, final[:, None])[:, 0].gather(1, tok[:, None])[:, 0].float()
    logit = (final.float() * W_U[:, tok].T.float()).sum(dim=-1)
    b_U = getattr(model.unembed, "b_U", None)
    if b_U is not None:
        logit = logit + b_U[tok].float()
    return soft_cap(model, logit)


def ce_terms(
    model: HookedTransformer,
    final: Float[Tensor, "batch n d_model"],
    targets: Int[Tensor, "batch n"],
    chunk: int | None = None,
) -> tuple[Float[Tensor, "batch n"], Float[Tensor, "batch n"]]:
    """Per-position cross-entropy of `targets` given the final residual, and the log-normalizers
    (detached), in row chunks so full logits for a big batch are never held at once."""
    if final.shape[1] == 0:
        z = final.new_zeros(final.shape[:2], dtype=torch.float32)
        return z, z
    rows = chunk or ce_rows(final.shape[1], model.cfg.d_vocab)
    ces, lses = [], []
    for i in range(0, final.shape[0], rows):
        out = logits(model, final[i : i + rows])
        # logsumexp over the vocabulary and the mean in float32 at least; the unembedding stays in the model's
        # dtype (on SmolLM2 in bf16 its rounding moved xe by 0.003 nats, the bf16 forward before it by 0.12)
        out = out.to(torch.promote_types(out.dtype, torch.float32))
        lse = torch.logsumexp(out, dim=-1)
        ces.append(lse - out.gather(-1, targets[i : i + rows, :, None])[..., 0])
        lses.append(lse.detach())
    return torch.cat(ces), torch.cat(lses)


def span_xe(
    model: HookedTransformer,
    final: Float[Tensor, "batch n d_model"],
    tokens: Int[Tensor, "batch seq"],
    layout: Layout,
    chunk: int | None = None,
) -> Float[Tensor, " batch"]:
    """Mean cross-entropy of the span tokens, from the final residual at positions xe_from-1 .. span end-1.

    Computed in row chunks (`chunk` rows, default from CE_CHUNK_ELEMENTS), so full logits for a big
    batch are never held at once."""
    lo, hi = layout.xe_from, layout.span.stop
    return ce_terms(model, final, tokens[:, lo:hi], chunk)[0].mean(dim=1)


def forward_scores(
    model: HookedTransformer,
    objectives: Sequence[Objective],
    tokens: Int[Tensor, "batch seq"],
    layout: Layout,
    *,
    embeds: Float[Tensor, "batch seq d_model"] | None = None,
) -> tuple[Float[Tensor, "n_obj batch"], Float[Tensor, " batch"]]:
    """Targets and xe from one forward pass (differentiable if called with grad enabled)."""
    values, ce, _, _ = full_pass(model, objectives, tokens, layout, embeds=embeds)
    return values, ce.mean(dim=1)


def full_pass(
    model: HookedTransformer,
    objectives: Sequence[Objective],
    tokens: Int[Tensor, "batch seq"],
    layout: Layout,
    *,
    embeds: Float[Tensor, "batch seq d_model"] | None = None,
) -> tuple[
    Float[Tensor, "n_obj batch"],
    Float[Tensor, "batch n_pred"],
    Float[Tensor, "batch n_pred"],
    Float[Tensor, "batch n_pred d_model"],
]:
    """Values, per-position CE of the span, its log-normalizers, and the final residual at the CE
    positions (what prefix reuse keeps of a parent)."""
    values, final = run_objectives(
        model, objectives, tokens, embeds=embeds, start=layout.start, final_from=layout.xe_from - 1
    )
    assert final is not None  # asked for with final_from
    n_pred = layout.span.stop - layout.xe_from
    final = final[:, :n_pred]
    ce, lse = ce_terms(model, final, tokens[:, layout.xe_from : layout.span.stop])
    return values, ce, lse, final


@torch.no_grad()
def score(
    model: HookedTransformer,
    objectives: Sequence[Objective],
    span_ids: Int[Tensor, "batch length"],
    layout: Layout,
    *,
    batch_size: int = 64,
    max_batch_tokens: int | None = None,
) -> tuple[Float[Tensor, "n_obj batch"], Float[Tensor, " batch"]]:
    """Targets and xe of many prompts, in batched forward passes of at most `batch_size` prompts and
    `max_batch_tokens` tokens (halved on out-of-memory)."""
    batcher = Batcher(min(batch_size * layout.seq_len, max_batch_tokens or 1 << 62))
    return score_batched(model, objectives, span_ids, layout, batcher)


def score_batched(
    model: HookedTransformer,
    objectives: Sequence[Objective],
    span_ids: Int[Tensor, "batch length"],
    layout: Layout,
    batcher: Batcher,
) -> tuple[Float[Tensor, "n_obj batch"], Float[Tensor, " batch"]]:
    """`score` with the passes cut by a given batcher (which keeps what it learns about memory)."""

    def run(lo: int, hi: int) -> tuple[Tensor, Tensor]:
        return forward_scores(model, objectives, layout.assemble(span_ids[lo:hi]), layout)

    parts = batcher.run(span_ids.shape[0], layout.seq_len, run)
    if not parts:
        return torch.zeros((len(objectives), 0)), torch.zeros(0)
    return torch.cat([v for v, _ in parts], dim=1), torch.cat([x for _, x in parts])
