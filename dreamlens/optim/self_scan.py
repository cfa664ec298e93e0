"""Starts without a dataset: text the model writes itself, scanned for the objective.

Dreams from the top dataset examples go far past dreams from scratch (README, "How well it works"),
but a sweep, or a feature with no corpus at hand, has no examples. The model's own text is the next
best thing: fluent by construction, and varied enough that some of it excites most features. With
`ADAPTConfig(self_scan=s)` and no starts given, a share `s` of the token budget goes, half and half,
to documents the model samples after its start token (one token-forward per token, on its KV cache)
and to a scan of them for the objective (`analysis.scan`); the scan's top windows, `length` tokens
each ending at the max-activating token, become the candidate starts exactly as dataset examples would
(`init_prompts`: each scored as a dream, the members covering their activation-fluency region). Both
halves are charged to the run's budget. The share was chosen on the tuning proxy
(`benchmarks/results/tuning.md`).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from ..analysis.scan import example_spans, scan
from ..errors import DreamError
from ..models import bos_token_id, decode
from ..scoring import kv_classes

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from ..objectives import Objective

DOCUMENT_TOKENS = 64  # tokens per sampled document (after the start token)
TOP_WINDOWS = 32  # windows kept from the scan as candidate starts
PER_DOCUMENT = 4  # at most this many of them from one document


@torch.no_grad()
def sample_documents(
    model: HookedTransformer, n: int, tokens: int, banned: Bool[Tensor, " d_vocab"], gen: torch.Generator
) -> Int[Tensor, "n tokens"]:
    """n documents of `tokens` tokens sampled from the model at temperature 1 after its start token
    (banned tokens excluded), all n at once on one KV cache; `gen` (a CPU generator) draws them."""
    bos = bos_token_id(model)
    if bos is None:
        raise DreamError("self_scan samples text after the model's start token, and this model has none; "
                         "give starts instead (examples=, init_prompts=) or set self_scan=0")
    Cache, _ = kv_classes()
    cache = Cache.init_cache(model.cfg, model.cfg.device, n)
    nxt = torch.full((n, 1), bos, dtype=torch.long)
    out = []
    for _ in range(tokens):
        logits = model(nxt.to(model.cfg.device), past_kv_cache=cache)[:, -1].float().cpu()
        logits[:, banned] = float("-inf")
        nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen)
        out.append(nxt)
    return torch.cat(out, dim=1)


def self_scan_starts(
    model: HookedTransformer,
    objective: Objective,
    budget: int,
    length: int,
    banned: Bool[Tensor, " d_vocab"],
    gen: torch.Generator,
) -> tuple[tuple[tuple[int, ...], ...], int]:
    """The candidate starts of a dream of `length` tokens from about `budget` token-forwards of the
    model's own text: half sampled (`sample_documents`), half the scan of it; the top windows, best
    first, and the token-forwards spent. Empty when no window fired (the caller falls back)."""
    doc_tokens = max(DOCUMENT_TOKENS, 2 * length)
    n = max(1, budget // 2 // doc_tokens)
    ids = sample_documents(model, n, doc_tokens, banned, gen)
    texts = [decode(model, row) for row in ids]
    with warnings.catch_warnings():  # decoded samples may re-tokenize to a few tokens fewer than asked
        warnings.simplefilter("ignore")
        found = scan(model, [objective], texts, tokens=n * doc_tokens, window=length, top_k=TOP_WINDOWS,
                     per_document=PER_DOCUMENT, score=False, cache=False, progress=False)
    spent = n * doc_tokens + int(found.meta["n_tokens"])
    starts = tuple(span for _, span in example_spans(found, 0, length, positive=False))
    return starts, spent
