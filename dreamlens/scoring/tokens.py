"""Which tokens the optimizers may propose (banned_mask, memoized on the model), and whether a
prompt's text tokenizes back to its ids (retokenizes), so that every result is reproducible as text."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from ..errors import DreamError
from ..models import bos_token_id, decode

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from .layout import Layout

# The one attribute on the model that memoizes the decoded vocabulary's verdicts, keyed by
# (ascii_only, ban_whitespace_only, start token, tokenizer size, vocabulary size, id(tokenizer)).
_MEMO_ATTR = "_dreamlens_banned"


def banned_mask(
    model: HookedTransformer, *, ascii_only: bool = False, ban_whitespace_only: bool = False, extra: Sequence[int] = ()
) -> Bool[Tensor, " d_vocab"]:
    """Tokens the optimizers never propose: special tokens always, tokens that do not decode to
    themselves (broken byte pieces), optionally non-ASCII and whitespace-only tokens, and `extra`.

    Decoding the whole vocabulary takes seconds: it is done once per model, tokenizer and setting
    (memoized on the model); each call returns a fresh mask the caller may change."""
    tok: Any = model.tokenizer  # a Hugging Face tokenizer (every model dreamlens loads has one)
    V = model.cfg.d_vocab
    memo = model.__dict__.setdefault(_MEMO_ATTR, {})
    key = (bool(ascii_only), bool(ban_whitespace_only), bos_token_id(model), len(tok), V, id(tok))
    if key not in memo:
        memo[key] = _banned_base(model, ascii_only, ban_whitespace_only)
    banned = memo[key].clone()
    for i in extra:
        if not 0 <= int(i) < V:
            raise DreamError(f"banned token id {i} is outside the vocabulary (0..{V - 1})")
        banned[int(i)] = True
    return banned


def _banned_base(model: HookedTransformer, ascii_only: bool, ban_whitespace_only: bool) -> Tensor:
    tok: Any = model.tokenizer
    V = model.cfg.d_vocab
    banned = torch.zeros(V, dtype=torch.bool)
    specials = set(getattr(tok, "all_special_ids", []) or [])
    specials.update(i for i in (bos_token_id(model), tok.eos_token_id, tok.pad_token_id) if i is not None)
    added = getattr(tok, "added_tokens_decoder", {}) or {}
    specials.update(i for i, t in added.items() if getattr(t, "special", False))
    n_tok = len(tok)
    texts = tok.batch_decode([[i] for i in range(min(V, n_tok))], clean_up_tokenization_spaces=False)
    for i, text in enumerate(texts):
        broken = i in specials or "\ufffd" in text or text == ""
        if broken or (ascii_only and not text.isascii()) or (ban_whitespace_only and text.strip() == ""):
            banned[i] = True
    banned[n_tok:] = True  # padding rows of the embedding matrix
    return banned


def retokenizes(
    model: HookedTransformer, span_ids: Int[Tensor, "batch length"], layout: Layout
) -> tuple[Bool[Tensor, " batch"], list[str]]:
    """Whether each prompt's text, placed in its context (the layout's prefix and suffix), tokenizes back
    to exactly its ids; and the texts."""
    rows = span_ids.tolist()
    texts = [decode(model, r) for r in rows]
    tokenizer: Any = model.tokenizer
    full = tokenizer([layout.prefix + t + layout.suffix for t in texts], add_special_tokens=False)["input_ids"]
    head = list(layout.head[layout.n_bos :])
    tail = list(layout.tail)
    ok = [f == head + r + tail for f, r in zip(full, rows)]
    return torch.tensor(ok, dtype=torch.bool), texts
