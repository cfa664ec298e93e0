"""The one-hot gradient of `-f + lam * xe` equals a naive autograd through a one-hot leaf, with xe
computed from the one-hot as `-(log_softmax(logits) * onehot).sum()` (both the path through the
embeddings and the direct term by which the one-hot selects the log-probability)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import dreamlens as dl
from dreamlens import scoring

OBJ = "blocks.1.mlp.hook_post[5]"


@pytest.fixture(scope="module")
def model64(tiny_model):
    m = copy.deepcopy(tiny_model)
    m.to(torch.float64)
    m.cfg.dtype = torch.float64
    return m


def naive_gradient(model, obj, span_ids, layout, lam):
    """d(-f + lam * xe) / d onehot, by autograd through `onehot @ W_E`, xe read from the one-hot."""
    tokens = layout.assemble(span_ids)
    W_E = model.embed.W_E
    onehot = F.one_hot(span_ids, W_E.shape[0]).to(W_E.dtype).requires_grad_(True)
    sp = layout.span
    with torch.no_grad():
        base = model.embed(tokens)
    embeds = torch.cat([base[:, : sp.start], onehot @ W_E, base[:, sp.stop :]], dim=1)
    values, _ = dl.run_objectives(model, [obj], tokens, embeds=embeds, start=layout.start)
    logits = model.run_with_hooks(tokens, fwd_hooks=[("hook_embed", lambda act, hook: embeds)])
    logp = torch.log_softmax(logits, dim=-1)
    scored = range(layout.xe_from, sp.stop)
    xe = torch.stack([-(logp[:, p - 1] * onehot[:, p - sp.start]).sum(-1) for p in scored], dim=1).mean(dim=1)
    loss = (-values[0] + lam * xe).sum()
    (grad,) = torch.autograd.grad(loss, onehot)
    return grad


@pytest.mark.parametrize(
    "context",
    [
        {},  # start token only
        {"prefix": "Once upon a time", "suffix": " and then"},
        {"no_head": True},  # no start token, no prefix: the first span token is not scored
    ],
)
def test_onehot_gradient_matches_naive_autograd(model64, context):
    L = 6
    if context.get("no_head"):
        layout = scoring.Layout(head=(), tail=(), length=L, n_bos=0)
    else:
        layout = scoring.make_layout(model64, L, context.get("prefix", ""), context.get("suffix", ""))
    ids = torch.randint(300, 3000, (4, L), generator=torch.Generator().manual_seed(3))
    lam = torch.tensor([0.0, 0.3, 2.0, 10.0], dtype=torch.float64)
    obj = dl.objective(OBJ)
    got, _, _ = scoring.token_gradients(model64, [obj], ids, layout, lam)
    want = naive_gradient(model64, obj, ids, layout, lam)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # The direct term is really there: at the last position the fluency gradient is not zero.
    assert float((got[2, -1] - got[0, -1]).abs().max()) > 1e-3


def test_high_penalty_prefers_likely_tokens_at_the_last_position(tiny_model):
    """With a large penalty, the steepest-descent tokens at the last span position are the model's own
    most likely next tokens (the direct term dominates)."""
    layout = scoring.make_layout(tiny_model, 5)
    ids = torch.randint(300, 3000, (1, 5), generator=torch.Generator().manual_seed(4))
    g, _, _ = scoring.token_gradients(tiny_model, [dl.objective(OBJ)], ids, layout, torch.tensor([1e4]))
    logits = tiny_model(layout.assemble(ids))[0, layout.span.stop - 2]
    top_grad = set((-g[0, -1]).topk(5).indices.tolist())
    top_lm = set(logits.topk(5).indices.tolist())
    assert top_grad == top_lm
