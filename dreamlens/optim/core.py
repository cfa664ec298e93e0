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

import numpy as np
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


def onehot_inputs(
    model: Any, span_ids: Int[Tensor, "batch length"], layout: Layout
) -> tuple[Int[Tensor, "batch seq"], Float[Tensor, "batch length d_vocab"], Float[Tensor, "batch seq d_model"]]:
    """Tokens, a one-hot leaf for the span (requires grad), and the embeddings with `onehot @ W_E`
    in the span, to be fed through `hook_embed`."""
    tokens = layout.assemble(span_ids)
    W_E = model.embed.W_E
    onehot = F.one_hot(span_ids, W_E.shape[0]).to(W_E.dtype).requires_grad_(True)
    with torch.no_grad():
        base = model.embed(tokens)
    sp = layout.span
    embeds = torch.cat([base[:, : sp.start], onehot @ W_E, base[:, sp.stop :]], dim=1)
    return tokens, onehot, embeds


def token_gradients(
    model: Any,
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
    tokens, onehot, embeds = onehot_inputs(model, span_ids, layout)
    values, xe = forward_scores(model, objectives, tokens, layout, embeds=embeds)
    owner = torch.zeros(span_ids.shape[0], dtype=torch.long) if owner is None else owner
    f = values[owner.to(values.device), torch.arange(values.shape[1], device=values.device)]
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


# ---------------------------------------------------------------------------------------------
# The evaluator: one place that scores candidates, deduplicates, checks re-tokenization, counts
# compute and records history, for every optimizer.

GRADIENT_COST = 3  # a forward+backward pass costs about three forwards per token


class Evaluator:
    """Scores candidate prompts for K objectives at once and records what each optimizer evaluated.

    Each candidate row has an `owner`: the objective (population) it was proposed for. A prompt is
    forwarded once; its values for all K objectives are cached, so a prompt proposed again (by any
    owner) is never recomputed. History rows are kept per owner, once per distinct prompt."""

    def __init__(
        self,
        model: Any,
        objectives: Sequence[Objective],
        layout: Layout,
        *,
        prefix: str = "",
        suffix: str = "",
        batch_size: int = 64,
        cache_size: int = 2_000_000,
    ):
        self.model, self.objectives, self.layout = model, list(objectives), layout
        self.prefix, self.suffix, self.batch_size = prefix, suffix, batch_size
        self.cache = ScoreCache(cache_size)
        k = len(self.objectives)
        self.seen: list[set[bytes]] = [set() for _ in range(k)]
        self.hist_ids: list[list[Tensor]] = [[] for _ in range(k)]
        self.hist_vals: list[list[float]] = [[] for _ in range(k)]
        self.hist_xe: list[list[float]] = [[] for _ in range(k)]
        self.hist_it: list[list[int]] = [[] for _ in range(k)]
        self.hist_text: list[list[str]] = [[] for _ in range(k)]
        self.n_forward = 0
        self.n_gradient = 0
        self.token_forwards = 0

    def restore(self, owner: int, ids: Tensor, values: Sequence[float], xe: Sequence[float], iteration: Sequence[int], text: Sequence[str]) -> None:
        """Load a saved history (for resume): the cache and the seen-set are rebuilt from it."""
        for row, v, x, it, t in zip(ids, values, xe, iteration, text):
            key = ScoreCache.key(row)
            vals = np.full(len(self.objectives), np.nan)
            vals[owner] = v
            cached = self.cache.get(key)
            if cached is not None:
                vals = np.where(np.isnan(vals), cached[0], vals)
            self.cache.put(key, (vals, float(x)))
            self.seen[owner].add(key)
            self.hist_ids[owner].append(torch.as_tensor(row, dtype=torch.long))
            self.hist_vals[owner].append(float(v))
            self.hist_xe[owner].append(float(x))
            self.hist_it[owner].append(int(it))
            self.hist_text[owner].append(str(t))

    def evaluate(
        self, span_ids: Int[Tensor, "n length"], owner: Int[Tensor, " n"], iteration: int
    ) -> tuple[Float[Tensor, " n"], Float[Tensor, " n"], Bool[Tensor, " n"]]:
        """f (for each row's own objective), xe, and whether the row is valid (re-tokenizes).
        Invalid rows get f = -inf and xe = +inf, so no selection ever keeps them."""
        n = span_ids.shape[0]
        ok, texts = retokenizes(self.model, span_ids, self.layout, self.prefix, self.suffix)
        keys = [ScoreCache.key(r) for r in span_ids.cpu()]
        todo: dict[bytes, int] = {}
        for i in range(n):
            if ok[i] and keys[i] not in self.cache and keys[i] not in todo:
                todo[keys[i]] = i
        if todo:
            rows = torch.tensor(list(todo.values()), dtype=torch.long)
            vals, xe = score(self.model, self.objectives, span_ids[rows], self.layout, batch_size=self.batch_size)
            self.n_forward += len(rows)
            self.token_forwards += len(rows) * self.layout.seq_len
            vals_np, xe_np = vals.T.cpu().double().numpy(), xe.cpu().double().numpy()
            for j, key in enumerate(todo):
                self.cache.put(key, (vals_np[j], float(xe_np[j])))
        f = torch.full((n,), float("-inf"), dtype=torch.float64)
        x = torch.full((n,), float("inf"), dtype=torch.float64)
        for i in range(n):
            if not ok[i]:
                continue
            vals_i, xe_i = self.cache.get(keys[i])
            o = int(owner[i])
            v = vals_i[o]
            if np.isnan(v):  # known from a restored history of another owner only: score it now
                vv, xx = score(self.model, self.objectives, span_ids[i : i + 1], self.layout)
                self.n_forward += 1
                self.token_forwards += self.layout.seq_len
                vals_i = vv[:, 0].double().numpy()
                self.cache.put(keys[i], (vals_i, float(xx[0])))
                v = vals_i[o]
            f[i], x[i] = float(v), float(xe_i)
            if keys[i] not in self.seen[o]:
                self.seen[o].add(keys[i])
                self.hist_ids[o].append(span_ids[i].cpu().clone())  # never a view of a live population
                self.hist_vals[o].append(float(v))
                self.hist_xe[o].append(float(xe_i))
                self.hist_it[o].append(iteration)
                self.hist_text[o].append(texts[i])
        return f, x, ok

    def gradients(
        self, span_ids: Int[Tensor, "n length"], owner: Int[Tensor, " n"], lam: Float[Tensor, " n"]
    ) -> Float[Tensor, "n length d_vocab"]:
        """One-hot gradients of each row's `-f_owner + lam * xe`, in one forward/backward."""
        grad = token_gradients(self.model, self.objectives, span_ids, self.layout, lam, owner=owner)[0]
        self.n_gradient += span_ids.shape[0]
        self.token_forwards += GRADIENT_COST * span_ids.shape[0] * self.layout.seq_len
        return grad

    def history_arrays(self, owner: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
        L = self.layout.length
        ids = torch.stack(self.hist_ids[owner]).numpy() if self.hist_ids[owner] else np.zeros((0, L), np.int64)
        return (
            ids,
            np.asarray(self.hist_vals[owner], dtype=np.float64),
            np.asarray(self.hist_xe[owner], dtype=np.float64),
            np.asarray(self.hist_it[owner], dtype=np.int64),
            list(self.hist_text[owner]),
        )


def objective_is_constant(
    model: Any, objective: Objective, span_ids: Int[Tensor, "batch length"], layout: Layout
) -> bool:
    """True when the objective's one-hot gradient is exactly zero for every row (nothing to climb)."""
    tokens, onehot, embeds = onehot_inputs(model, span_ids, layout)
    values, _ = run_objectives(model, [objective], tokens, embeds=embeds, start=layout.start)
    if not values.requires_grad:
        return True
    (grad,) = torch.autograd.grad(values.sum(), onehot, allow_unused=True)
    return grad is None or bool((grad == 0).all())
