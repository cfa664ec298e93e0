"""One-hot token gradients: how each prompt's loss `-f + lam * xe` changes if one of its tokens were
swapped for another, from one forward/backward pass (what EPO, GCG and ADAPT propose children from)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from .batching import ce_rows
from .xe import full_pass, logits

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from ..objectives import Objective
    from .layout import Layout


def onehot_inputs(
    model: HookedTransformer, span_ids: Int[Tensor, "batch length"], layout: Layout
) -> tuple[Int[Tensor, "batch seq"], Float[Tensor, "batch length d_vocab"], Float[Tensor, "batch seq d_model"]]:
    """Tokens, a one-hot leaf for the span (requires grad), and the embeddings with `onehot @ W_E`
    in the span, to be fed through `hook_embed`."""
    tokens = layout.assemble(span_ids)
    W_E = model.embed.W_E
    onehot = F.one_hot(span_ids, W_E.shape[0]).to(W_E.dtype).requires_grad_(True)
    with torch.no_grad():
        base = model.embed(tokens)
    sp = layout.span
    embeds = torch.cat([base[:, : sp.start], _embed_ln(model, onehot @ W_E), base[:, sp.stop :]], dim=1)
    return tokens, onehot, embeds


def _embed_ln(model: HookedTransformer, x: Tensor) -> Tensor:
    # Models such as Bloom normalize right after the embedding lookup (inside `embed`, before hook_embed).
    return model.embed.ln(x) if getattr(model.cfg, "post_embedding_ln", False) else x


def token_gradients(
    model: HookedTransformer,
    objectives: Sequence[Objective],
    span_ids: Int[Tensor, "batch length"],
    layout: Layout,
    lam: Float[Tensor, " batch"],
    *,
    owner: Int[Tensor, " batch"] | None = None,
) -> tuple[Float[Tensor, "batch length d_vocab"], Float[Tensor, " batch"], Float[Tensor, " batch"]]:
    """Gradient of each row's loss `-f + lam * xe` w.r.t. the one-hot encoding of its span tokens,
    where f is the row's own objective (`objectives[owner[row]]`, default the first).

    Rows are independent, so one backward of the summed loss gives every row its own gradient under its
    own penalty. Also returns f and xe of the rows (from the same pass)."""
    grad, f, xe, _ = gradient_pass(model, objectives, span_ids, layout, lam, owner)
    return grad, f, xe


def gradient_pass(
    model: HookedTransformer,
    objectives: Sequence[Objective],
    span_ids: Int[Tensor, "batch length"],
    layout: Layout,
    lam: Float[Tensor, " batch"],
    owner: Int[Tensor, " batch"] | None,
) -> tuple[
    Float[Tensor, "batch length d_vocab"],
    Float[Tensor, " batch"],
    Float[Tensor, " batch"],
    tuple[Float[Tensor, "batch n_pred"], Float[Tensor, "batch n_pred"], Float[Tensor, "batch n_pred d_model"]],
]:
    """token_gradients, plus the per-position CE, log-normalizers and final residual (for prefix reuse).

    The exact gradient of `-f + lam * xe` through `onehot @ W_E`, with xe computed from the one-hot
    (`xe = mean_p -(log_softmax(logits_{p-1}) . onehot_p)`), has two parts:
    - the path through the embeddings: the span's embeddings are the leaf, and
      (d loss / d embedding) @ W_E^T is that part, without a [rows, length, vocab] one-hot forward;
    - the direct term: the one-hot at p selects which log-probability is read, so
      d xe / d onehot_p[v] also holds `-log p(v | t_<p) / n_pred`. It is added from the final residual
      the pass already has (logits in row chunks), times each row's penalty. Without it the fluency
      penalty could not steer the proposals at the last position at all."""
    tokens = layout.assemble(span_ids)
    W_E = model.embed.W_E.detach()
    with torch.no_grad():
        base = model.embed(tokens)
    leaf = W_E[span_ids].clone().requires_grad_(True)
    sp = layout.span
    embeds = torch.cat([base[:, : sp.start], _embed_ln(model, leaf), base[:, sp.stop :]], dim=1)
    values, ce, lse, final = full_pass(model, objectives, tokens, layout, embeds=embeds)
    xe = ce.mean(dim=1)
    owner = torch.zeros(span_ids.shape[0], dtype=torch.long) if owner is None else owner
    f = values[owner.to(values.device), torch.arange(values.shape[1], device=values.device)]
    loss = (-f + lam.to(f) * xe).sum()
    (g,) = torch.autograd.grad(loss, leaf)
    grad = g @ W_E.T
    final = final.detach()
    add_selection_term(model, grad, final, lse, layout, lam)
    return grad, f.detach(), xe.detach(), (ce.detach(), lse, final)


@torch.no_grad()
def add_selection_term(
    model: HookedTransformer,
    grad: Float[Tensor, "batch length d_vocab"],
    final: Float[Tensor, "batch n_pred d_model"],
    lse: Float[Tensor, "batch n_pred"],
    layout: Layout,
    lam: Float[Tensor, " batch"],
) -> None:
    """Add, in place, the direct part of `lam * d xe / d onehot`: at each scored span position p,
    `lam * (logsumexp - logit_v) / n_pred = -lam * log p(v | t_<p) / n_pred` for every token v.
    `final` is the final residual at positions xe_from-1 .. span end-2 (the ones predicting the scored
    span tokens) and `lse` their log-normalizers."""
    n_pred = final.shape[1]
    if n_pred == 0:
        return
    dtype = torch.promote_types(grad.dtype, torch.float32)
    lam = lam.to(device=grad.device, dtype=dtype)
    if not bool((lam != 0).any()):
        return
    off = layout.xe_from - layout.span.start  # the first span token is unscored without a start token or prefix
    rows = ce_rows(n_pred, model.cfg.d_vocab)
    for i in range(0, final.shape[0], rows):
        out = logits(model, final[i : i + rows]).to(dtype)  # [r, n_pred, vocab]
        term = (lse[i : i + rows, :, None].to(dtype) - out) * (lam[i : i + rows, None, None] / n_pred)
        grad[i : i + rows, off : off + n_pred] += term.to(grad.dtype)
