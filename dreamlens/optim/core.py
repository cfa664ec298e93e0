"""Machinery shared by every optimizer: prompt layout, scoring (target and fluency from one pass),
one-hot gradients, banned tokens, the re-tokenization check and the cache of scored prompts.

Fluency `xe`: the mean next-token cross-entropy (nats) of the optimized tokens, each predicted from
everything before it (the start token and any prefix context). Without a start token and without a
prefix, the first optimized token has nothing to be predicted from and is not scored.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..models import bos_token_id, decode, encode
from ..objectives import Objective, run_objectives, unembed


class DreamError(ValueError):
    """Bad optimizer input; the message names the value and the fix."""


# ---------------------------------------------------------------------------------------------
# Layout: [start token] + prefix context + optimized span + suffix context


@dataclass(frozen=True)
class Layout:
    """Where the optimized tokens sit in the sequences the model sees."""

    head: tuple[int, ...]  # start token (if any) + prefix context ids
    tail: tuple[int, ...]  # suffix context ids
    length: int  # optimized tokens
    n_bos: int  # 1 if head begins with the start token

    @property
    def span(self) -> slice:
        return slice(len(self.head), len(self.head) + self.length)

    @property
    def seq_len(self) -> int:
        return len(self.head) + self.length + len(self.tail)

    @property
    def xe_from(self) -> int:
        """First optimized position that is scored (the first needs a token before it)."""
        return len(self.head) if self.head else len(self.head) + 1

    @property
    def start(self) -> int:
        """First position that belongs to the prompt for position reductions (after the start token)."""
        return self.n_bos

    def assemble(self, span_ids: Int[Tensor, "batch length"]) -> Int[Tensor, "batch seq"]:
        b = span_ids.shape[0]
        dev = span_ids.device
        head = torch.tensor(self.head, dtype=torch.long, device=dev).expand(b, -1)
        tail = torch.tensor(self.tail, dtype=torch.long, device=dev).expand(b, -1)
        return torch.cat([head, span_ids, tail], dim=1)


def make_layout(model: Any, length: int, prefix: str = "", suffix: str = "") -> Layout:
    if not isinstance(length, int) or length < 1:
        raise DreamError(f"length must be a positive number of tokens, got {length!r}")
    bos = bos_token_id(model)
    head = ([bos] if bos is not None else []) + (encode(model, prefix) if prefix else [])
    tail = encode(model, suffix) if suffix else []
    total = len(head) + length + len(tail)
    if total > model.cfg.n_ctx:
        raise DreamError(
            f"length {length} plus context ({total - length} tokens) exceeds the model's context of "
            f"{model.cfg.n_ctx} tokens; use length <= {model.cfg.n_ctx - total + length}"
        )
    if length == 1 and not head:
        raise DreamError("with no start token and no prefix, a 1-token prompt has no fluency to score; use length >= 2")
    return Layout(tuple(head), tuple(tail), length, int(bos is not None))


# ---------------------------------------------------------------------------------------------
# Scoring


def span_xe(
    model: Any,
    final: Float[Tensor, "batch n d_model"],
    tokens: Int[Tensor, "batch seq"],
    layout: Layout,
    chunk: int = 64,
) -> Float[Tensor, " batch"]:
    """Mean cross-entropy of the span tokens, from the final residual at positions xe_from-1 .. span end-1.

    Computed in row chunks, so full logits for a big batch are never held at once."""
    lo, hi = layout.xe_from, layout.span.stop
    targets = tokens[:, lo:hi]
    out = []
    for i in range(0, final.shape[0], chunk):
        logits = unembed(model, final[i : i + chunk]).float()
        ce = F.cross_entropy(logits.flatten(0, 1), targets[i : i + chunk].flatten(), reduction="none")
        out.append(ce.view(logits.shape[0], -1).mean(dim=1))
    return torch.cat(out)


def forward_scores(
    model: Any,
    objectives: Sequence[Objective],
    tokens: Int[Tensor, "batch seq"],
    layout: Layout,
    *,
    embeds: Float[Tensor, "batch seq d_model"] | None = None,
) -> tuple[Float[Tensor, "n_obj batch"], Float[Tensor, " batch"]]:
    """Targets and xe from one forward pass (differentiable if called with grad enabled)."""
    values, final = run_objectives(
        model, objectives, tokens, embeds=embeds, start=layout.start, final_from=layout.xe_from - 1
    )
    n_pred = layout.span.stop - layout.xe_from
    xe = span_xe(model, final[:, :n_pred], tokens, layout)
    return values, xe


@torch.no_grad()
def score(
    model: Any,
    objectives: Sequence[Objective],
    span_ids: Int[Tensor, "batch length"],
    layout: Layout,
    *,
    batch_size: int = 64,
) -> tuple[Float[Tensor, "n_obj batch"], Float[Tensor, " batch"]]:
    """Targets and xe of many prompts, in batched forward passes."""
    vals, xes = [], []
    for i in range(0, span_ids.shape[0], batch_size):
        v, x = forward_scores(model, objectives, layout.assemble(span_ids[i : i + batch_size]), layout)
        vals.append(v)
        xes.append(x)
    if not vals:
        return torch.zeros((len(objectives), 0)), torch.zeros(0)
    return torch.cat(vals, dim=1), torch.cat(xes)


def token_gradients(
    model: Any,
    objective: Objective,
    span_ids: Int[Tensor, "batch length"],
    layout: Layout,
    lam: Float[Tensor, " batch"],
) -> tuple[Float[Tensor, "batch length d_vocab"], Float[Tensor, " batch"], Float[Tensor, " batch"]]:
    """Gradient of each row's loss `-f + lam * xe` w.r.t. the one-hot encoding of its span tokens.

    Rows are independent, so one backward of the summed loss gives every row its own gradient under its
    own penalty. Also returns f and xe of the rows (from the same pass)."""
    tokens = layout.assemble(span_ids)
    W_E = model.embed.W_E
    onehot = F.one_hot(span_ids, W_E.shape[0]).to(W_E.dtype).requires_grad_(True)
    with torch.no_grad():
        base = model.embed(tokens)
    sp = layout.span
    embeds = torch.cat([base[:, : sp.start], onehot @ W_E, base[:, sp.stop :]], dim=1)
    values, xe = forward_scores(model, [objective], tokens, layout, embeds=embeds)
    f = values[0]
    loss = (-f + lam.to(f) * xe).sum()
    (grad,) = torch.autograd.grad(loss, onehot)
    return grad, f.detach(), xe.detach()


# ---------------------------------------------------------------------------------------------
# Allowed tokens and reproducible text


def banned_mask(
    model: Any, *, ascii_only: bool = False, ban_whitespace_only: bool = False, extra: Sequence[int] = ()
) -> Bool[Tensor, " d_vocab"]:
    """Tokens the optimizers never propose: special tokens always, tokens that do not decode to
    themselves (broken byte pieces), optionally non-ASCII and whitespace-only tokens, and `extra`."""
    tok = model.tokenizer
    V = model.cfg.d_vocab
    banned = torch.zeros(V, dtype=torch.bool)
    specials = set(getattr(tok, "all_special_ids", []) or [])
    specials.update(i for i in (bos_token_id(model), tok.eos_token_id, tok.pad_token_id) if i is not None)
    added = getattr(tok, "added_tokens_decoder", {}) or {}
    specials.update(i for i, t in added.items() if getattr(t, "special", False))
    n_tok = len(tok)
    texts = tok.batch_decode([[i] for i in range(min(V, n_tok))], clean_up_tokenization_spaces=False)
    for i, text in enumerate(texts):
        if i in specials or "\ufffd" in text or text == "":
            banned[i] = True
        elif ascii_only and not text.isascii():
            banned[i] = True
        elif ban_whitespace_only and text.strip() == "":
            banned[i] = True
    banned[n_tok:] = True  # padding rows of the embedding matrix
    for i in extra:
        if not 0 <= int(i) < V:
            raise DreamError(f"banned token id {i} is outside the vocabulary (0..{V - 1})")
        banned[int(i)] = True
    return banned


def retokenizes(
    model: Any, span_ids: Int[Tensor, "batch length"], layout: Layout, prefix: str = "", suffix: str = ""
) -> tuple[Bool[Tensor, " batch"], list[str]]:
    """Whether each prompt's text, placed in its context, tokenizes back to exactly its ids; and the texts."""
    rows = span_ids.tolist()
    texts = [decode(model, r) for r in rows]
    full = model.tokenizer([prefix + t + suffix for t in texts], add_special_tokens=False)["input_ids"]
    head = list(layout.head[layout.n_bos :])
    tail = list(layout.tail)
    ok = [f == head + r + tail for f, r in zip(full, rows)]
    return torch.tensor(ok, dtype=torch.bool), texts


class ScoreCache:
    """Scored prompts keyed by their ids, so no prompt is evaluated twice (bounded, least recent out)."""

    def __init__(self, max_size: int = 2_000_000):
        self.max_size = max_size
        self._d: OrderedDict[bytes, tuple[float, float]] = OrderedDict()

    @staticmethod
    def key(ids: Sequence[int] | Tensor) -> bytes:
        if isinstance(ids, Tensor):
            return ids.to(torch.int64).cpu().numpy().tobytes()
        return torch.tensor(list(ids), dtype=torch.int64).numpy().tobytes()

    def get(self, key: bytes) -> tuple[float, float] | None:
        v = self._d.get(key)
        if v is not None:
            self._d.move_to_end(key)
        return v

    def put(self, key: bytes, value: tuple[float, float]) -> None:
        self._d[key] = value
        self._d.move_to_end(key)
        if len(self._d) > self.max_size:
            self._d.popitem(last=False)

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, key: bytes) -> bool:
        return key in self._d
