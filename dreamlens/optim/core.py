"""Machinery shared by every optimizer: prompt layout, scoring (target and fluency from one pass),
one-hot gradients, banned tokens, the re-tokenization check and the cache of scored prompts; and what
makes it fast: prefix reuse on the parents' KV caches, memory-bounded batches, deduplication.

Fluency `xe`: the mean next-token cross-entropy (nats) of the optimized tokens, each predicted from
everything before it (the start token and any prefix context). Without a start token and without a
prefix, the first optimized token has nothing to be predicted from and is not scored.
"""

from __future__ import annotations

import math
import signal
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..errors import DreamlensError
from ..models import bos_token_id, decode, encode
from ..objectives import (
    Capture,
    NonFiniteError,
    Objective,
    ObjectiveError,
    hook_shape,
    run_objectives,
    unembed,
)


class DreamError(DreamlensError, ValueError):
    """Bad optimizer input; the message names the value and the fix."""


def check_vocab_sizes(model: Any, **sizes: int) -> None:
    """Refuse a population, children or top-k larger than the model's vocabulary (each draws tokens from it)."""
    V = int(model.cfg.d_vocab)
    for name, value in sizes.items():
        if value > V:
            raise DreamError(f"{name} {value} is larger than the model's vocabulary ({V} tokens); use {name} <= {V}")


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """For the duration, SIGTERM (a job scheduler's stop) raises KeyboardInterrupt as Ctrl-C does, so
    the run returns (and the CLI saves) its partial result. Only the main thread can take signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
# Memory: how many prompts go through the model at once

# Logits are the largest transient (rows x positions x vocabulary); cross-entropy is computed in row
# chunks of at most this many logit entries (64 MiB in fp32).
CE_CHUNK_ELEMENTS = 1 << 24


def _bytes_per_token(model: Any, seq_len: int, grad: bool = False) -> int:
    """Rough peak bytes per token of one pass: residual copies, q/k/v, attention scores, MLP hidden.
    A backward keeps every layer's activations, so it costs about n_layers times more."""
    c = model.cfg
    d_attn = c.n_heads * c.d_head
    d_mlp = c.d_mlp or 4 * c.d_model
    size = torch.empty((), dtype=c.dtype).element_size()
    if grad:  # autograd keeps each layer's inputs, attention pattern and MLP hidden states, and the
        # logits of the fluency term with their gradient, and the one-hot gradient itself
        per_layer = 16 * c.d_model + 4 * d_attn + 2 * c.n_heads * seq_len + 6 * d_mlp
        return size * (c.n_layers * per_layer + 4 * c.d_vocab)
    return 2 * size * (12 * c.d_model + 4 * d_attn + 2 * c.n_heads * seq_len + 4 * d_mlp)


def _free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def estimate_batch_tokens(model: Any, seq_len: int, *, grad: bool = False) -> int:
    """Tokens per forward pass that fit in memory: 40% of the free GPU memory, or on a CPU an eighth
    of the available memory, at most 512 MiB (larger passes are no faster there). `grad`: for a
    forward/backward pass, which keeps every layer's activations."""
    device = torch.device(model.cfg.device) if model.cfg.device is not None else torch.device("cpu")
    free = _free_memory(device)
    budget = int(0.4 * free) if device.type == "cuda" else min(free // 8, 512 << 20)
    return max(seq_len, budget // _bytes_per_token(model, seq_len, grad))


def _is_oom(e: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None)
    return (oom is not None and isinstance(e, oom)) or (isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


class _Batcher:
    """Splits rows into passes of at most `max_tokens` tokens (at least one prompt); on an
    out-of-memory error it halves the pass, goes on, and keeps the smaller size."""

    def __init__(self, max_tokens: int):
        self.max_tokens, self.warned = max(1, int(max_tokens)), False

    def rows(self, tokens_per_row: int) -> int:
        return max(1, self.max_tokens // max(tokens_per_row, 1))

    def run(self, n: int, tokens_per_row: int, fn: Any) -> list[Any]:
        out, i = [], 0
        while i < n:
            b = min(self.rows(tokens_per_row), n - i)
            try:
                out.append(fn(i, i + b))
            except Exception as e:
                if not _is_oom(e) or b == 1:
                    raise
                self.max_tokens = max(1, (b // 2) * tokens_per_row)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if not self.warned:
                    warnings.warn(f"out of memory with {b} prompts per pass; going on with {b // 2}", stacklevel=3)
                    self.warned = True
                continue
            i += b
        return out


def _pass_tokens(model: Any, seq_len: int, batch_size: int, max_batch_tokens: int | None) -> int:
    """Tokens per evaluation pass: `batch_size` whole prompts, within `max_batch_tokens` (default: an
    estimate from free memory). Shorter rows (children computed from a parent's prefix) fit more prompts."""
    cap = batch_size * seq_len
    return min(cap, max_batch_tokens or estimate_batch_tokens(model, seq_len))


# A forward pass streams every weight once however few tokens it carries: on a CPU that costs about as
# much as this many tokens of compute (far more on a GPU). Used to decide when children of different
# first-changed positions are better computed together from the smaller position.
def _call_cost_tokens(model: Any) -> int:
    dev = model.cfg.device
    return 1024 if dev is not None and torch.device(dev).type == "cuda" else 48


@contextmanager
def fast_weights(model: Any) -> Iterator[None]:
    """Lay the weights out in memory the way TransformerLens's forward reads them, for the duration.

    TransformerLens transposes and copies W_in/W_gate/W_out, W_Q/W_K/W_V, W_O and W_U on every pass
    (hundreds of MB of copying per pass, whatever the batch). Inside this context each such parameter
    keeps its shape, values and storage, but its storage holds the transposed layout, so the copy is a
    no-op; results are bitwise equal. On exit the ordinary layout is restored. The rearranging goes
    through one scratch buffer the size of the largest weight, so memory does not grow."""
    changed: list[tuple[Any, tuple[int, ...]]] = []
    scratch: dict[tuple[Any, Any], Tensor] = {}

    def buffer(like: Tensor) -> Tensor:
        key = (like.device, like.dtype)
        if key not in scratch or scratch[key].numel() < like.numel():
            scratch[key] = torch.empty(like.numel(), dtype=like.dtype, device=like.device)
        return scratch[key][: like.numel()]

    def rearrange(p: Any, perm: tuple[int, ...]) -> None:
        """Rewrite p's storage in the order of `p.permute(perm)`, and make p a view of it."""
        if not isinstance(p, torch.nn.Parameter) or not p.is_floating_point() or p.dim() != len(perm):
            return
        data = p.data
        if not data.is_contiguous() or data.permute(*perm).is_contiguous():
            return  # an unusual layout, or already rearranged (a nested context)
        inv = tuple(perm.index(i) for i in range(len(perm)))
        shape = tuple(data.shape[i] for i in perm)
        tmp = buffer(data).view(shape)
        tmp.copy_(data.permute(*perm))
        data.view(-1).copy_(tmp.view(-1))
        p.data = data.view(-1).view(shape).permute(*inv)
        changed.append((p, perm))

    def restore(p: Any, perm: tuple[int, ...]) -> None:
        data = p.data  # a permuted view of a contiguous storage
        flat = data.permute(*perm).reshape(-1)  # a view: that permutation is contiguous
        tmp = buffer(data).view(data.shape)
        tmp.copy_(data)
        flat.copy_(tmp.view(-1))
        p.data = flat.view(data.shape)

    cfg = model.cfg
    try:
        with torch.no_grad():
            for block in getattr(model, "blocks", []):
                mlp, attn = getattr(block, "mlp", None), getattr(block, "attn", None)
                if type(mlp).__name__ == "GatedMLP":
                    for name in ("W_in", "W_gate", "W_out"):
                        rearrange(getattr(mlp, name, None), (1, 0))
                if attn is not None and not getattr(cfg, "load_in_4bit", False):
                    if not (getattr(cfg, "use_split_qkv_input", False) or getattr(cfg, "use_attn_in", False)):
                        grouped = "_W_K" in attn._parameters
                        for name in ("W_Q", "_W_K", "_W_V") if grouped else ("W_Q", "W_K", "W_V"):
                            rearrange(attn._parameters.get(name), (0, 2, 1))
                    if not getattr(cfg, "use_attn_result", False):
                        rearrange(attn._parameters.get("W_O"), (2, 0, 1))
            if type(getattr(model, "unembed", None)).__name__ == "Unembed":
                rearrange(model.unembed._parameters.get("W_U"), (1, 0))
        yield
    finally:
        with torch.no_grad():
            for p, perm in changed:
                restore(p, perm)
        scratch.clear()


def _buckets(starts: list[int], counts: list[int], seq: int, batcher: _Batcher, call_cost: int) -> list[list[int]]:
    """Groups sorted distinct start positions so that each group runs from its smallest start; the
    grouping minimizes (passes x call_cost + computed tokens), by dynamic programming."""
    g = len(starts)
    best = [0.0] + [math.inf] * g
    cut = [0] * (g + 1)
    for j in range(1, g + 1):
        rows = 0
        for i in range(j, 0, -1):  # group starts[i-1 .. j-1], run from starts[i-1]
            rows += counts[i - 1]
            width = seq - starts[i - 1]
            cost = best[i - 1] + math.ceil(rows / batcher.rows(width)) * call_cost + rows * width
            if cost < best[j]:
                best[j], cut[j] = cost, i - 1
    groups, j = [], g
    while j > 0:
        groups.append(starts[cut[j] : j])
        j = cut[j]
    return groups[::-1]


# ---------------------------------------------------------------------------------------------
# Scoring


def _logits(model: Any, final: Float[Tensor, "batch n d_model"]) -> Float[Tensor, "batch n d_vocab"]:
    """The model's logits from its final residual. TransformerLens's Unembed copies W_U transposed on
    every call (113 MB for a 49k vocabulary): for the plain Unembed multiply by W_U directly."""
    U = model.unembed
    if type(U).__name__ != "Unembed" or not isinstance(getattr(U, "W_U", None), Tensor):
        return unembed(model, final)
    logits = final @ U.W_U
    if getattr(U, "b_U", None) is not None:
        logits = logits + U.b_U
    cap = getattr(model.cfg, "output_logits_soft_cap", -1.0)
    return cap * torch.tanh(logits / cap) if cap and cap > 0 else logits


def _ce_rows(n: int, vocab: int) -> int:
    return max(1, CE_CHUNK_ELEMENTS // max(1, n * vocab))


def _ce_terms(
    model: Any, final: Float[Tensor, "batch n d_model"], targets: Int[Tensor, "batch n"], chunk: int | None = None
) -> tuple[Float[Tensor, "batch n"], Float[Tensor, "batch n"]]:
    """Per-position cross-entropy of `targets` given the final residual, and the log-normalizers
    (detached), in row chunks so full logits for a big batch are never held at once."""
    if final.shape[1] == 0:
        z = final.new_zeros(final.shape[:2], dtype=torch.float32)
        return z, z
    rows = chunk or _ce_rows(final.shape[1], model.cfg.d_vocab)
    ces, lses = [], []
    for i in range(0, final.shape[0], rows):
        logits = _logits(model, final[i : i + rows])
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        lse = torch.logsumexp(logits, dim=-1)
        ces.append(lse - logits.gather(-1, targets[i : i + rows, :, None])[..., 0])
        lses.append(lse.detach())
    return torch.cat(ces), torch.cat(lses)


def span_xe(
    model: Any,
    final: Float[Tensor, "batch n d_model"],
    tokens: Int[Tensor, "batch seq"],
    layout: Layout,
    chunk: int | None = None,
) -> Float[Tensor, " batch"]:
    """Mean cross-entropy of the span tokens, from the final residual at positions xe_from-1 .. span end-1.

    Computed in row chunks (`chunk` rows, default from CE_CHUNK_ELEMENTS), so full logits for a big
    batch are never held at once."""
    lo, hi = layout.xe_from, layout.span.stop
    return _ce_terms(model, final, tokens[:, lo:hi], chunk)[0].mean(dim=1)


def forward_scores(
    model: Any,
    objectives: Sequence[Objective],
    tokens: Int[Tensor, "batch seq"],
    layout: Layout,
    *,
    embeds: Float[Tensor, "batch seq d_model"] | None = None,
) -> tuple[Float[Tensor, "n_obj batch"], Float[Tensor, " batch"]]:
    """Targets and xe from one forward pass (differentiable if called with grad enabled)."""
    values, ce, _, _ = _full_pass(model, objectives, tokens, layout, embeds=embeds)
    return values, ce.mean(dim=1)


def _full_pass(
    model: Any,
    objectives: Sequence[Objective],
    tokens: Int[Tensor, "batch seq"],
    layout: Layout,
    *,
    embeds: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Values, per-position CE of the span, its log-normalizers, and the final residual at the CE positions."""
    values, final = run_objectives(
        model, objectives, tokens, embeds=embeds, start=layout.start, final_from=layout.xe_from - 1
    )
    n_pred = layout.span.stop - layout.xe_from
    final = final[:, :n_pred]
    ce, lse = _ce_terms(model, final, tokens[:, layout.xe_from : layout.span.stop])
    return values, ce, lse, final


@torch.no_grad()
def score(
    model: Any,
    objectives: Sequence[Objective],
    span_ids: Int[Tensor, "batch length"],
    layout: Layout,
    *,
    batch_size: int = 64,
    max_batch_tokens: int | None = None,
) -> tuple[Float[Tensor, "n_obj batch"], Float[Tensor, " batch"]]:
    """Targets and xe of many prompts, in batched forward passes of at most `batch_size` prompts and
    `max_batch_tokens` tokens (halved on out-of-memory)."""
    return _score_full(model, objectives, span_ids, layout, _Batcher(min(batch_size * layout.seq_len, max_batch_tokens or 1 << 62)))


def _score_full(model: Any, objectives: Sequence[Objective], span_ids: Tensor, layout: Layout, batcher: _Batcher) -> tuple[Tensor, Tensor]:
    def run(lo: int, hi: int) -> tuple[Tensor, Tensor]:
        return forward_scores(model, objectives, layout.assemble(span_ids[lo:hi]), layout)

    parts = batcher.run(span_ids.shape[0], layout.seq_len, run)
    if not parts:
        return torch.zeros((len(objectives), 0)), torch.zeros(0)
    return torch.cat([v for v, _ in parts], dim=1), torch.cat([x for _, x in parts])


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
    embeds = torch.cat([base[:, : sp.start], _embed_ln(model, onehot @ W_E), base[:, sp.stop :]], dim=1)
    return tokens, onehot, embeds


def _embed_ln(model: Any, x: Tensor) -> Tensor:
    # Models such as Bloom normalize right after the embedding lookup (inside `embed`, before hook_embed).
    return model.embed.ln(x) if getattr(model.cfg, "post_embedding_ln", False) else x


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
    grad, f, xe, _ = _gradient_pass(model, objectives, span_ids, layout, lam, owner)
    return grad, f, xe


def _gradient_pass(
    model: Any, objectives: Sequence[Objective], span_ids: Tensor, layout: Layout, lam: Tensor, owner: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor, Tensor]]:
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
    values, ce, lse, final = _full_pass(model, objectives, tokens, layout, embeds=embeds)
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
    model: Any,
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
    rows = _ce_rows(n_pred, model.cfg.d_vocab)
    for i in range(0, final.shape[0], rows):
        logits = _logits(model, final[i : i + rows]).to(dtype)  # [r, n_pred, vocab]
        term = (lse[i : i + rows, :, None].to(dtype) - logits) * (lam[i : i + rows, None, None] / n_pred)
        grad[i : i + rows, off : off + n_pred] += term.to(grad.dtype)


# ---------------------------------------------------------------------------------------------
# Prefix reuse. A child shares its parent's tokens before its first changed position P, so nothing
# before P needs recomputing: parents keep their keys/values (exactly as TransformerLens's KV cache
# stores them), their activations at the objectives' hooks and their per-position CE; a child runs
# over positions P.. only, attending to its parent's cached keys/values. Its objective values are read
# from the parent's activations before P spliced to its own from P on (so max/mean reductions, fixed
# positions and suffix context all stay exact), and its xe adds the parent's CE terms before P.


def _kv_classes() -> tuple[Any, Any]:
    try:
        from transformer_lens import (
            TransformerLensKeyValueCache,
            TransformerLensKeyValueCacheEntry,
        )
    except ImportError:  # TransformerLens before 3.x
        from transformer_lens.past_key_value_caching import (  # type: ignore[no-redef]
            HookedTransformerKeyValueCache as TransformerLensKeyValueCache,
        )
        from transformer_lens.past_key_value_caching import (
            HookedTransformerKeyValueCacheEntry as TransformerLensKeyValueCacheEntry,
        )
    return TransformerLensKeyValueCache, TransformerLensKeyValueCacheEntry


class _KVRecorder:
    """Hands each attention layer an empty KV-cache entry when it has none, so an ordinary forward pass
    leaves every layer's keys and values behind as TransformerLens caches them (whatever the
    architecture does to them: rotary offsets, QK-norm, clipping), without changing the computation."""

    def __init__(self, model: Any):
        self.model = model
        self.entries: list[list[Any]] = [[] for _ in range(model.cfg.n_layers)]
        self.handles: list[Any] = []

    def __enter__(self) -> _KVRecorder:
        _, Entry = _kv_classes()
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
class _Parents:
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


def _reuse_obstacle(model: Any, objectives: Sequence[Objective]) -> str | None:
    """Why prefix reuse cannot apply to these objectives on this model (None: it can)."""
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


def _token_logits(model: Any, final: Float[Tensor, "batch d_model"], tok: Int[Tensor, " batch"]) -> Float[Tensor, " batch"]:
    """The logit of one token per row, without the full unembedding (soft cap included)."""
    W_U = getattr(model.unembed, "W_U", None)
    if W_U is None:
        return unembed(model, final[:, None])[:, 0].gather(1, tok[:, None])[:, 0].float()
    logit = (final.float() * W_U[:, tok].T.float()).sum(dim=-1)
    b_U = getattr(model.unembed, "b_U", None)
    if b_U is not None:
        logit = logit + b_U[tok].float()
    cap = getattr(model.cfg, "output_logits_soft_cap", -1.0)
    return cap * torch.tanh(logit / cap) if cap and cap > 0 else logit


@torch.no_grad()
def _forward_from(
    model: Any,
    objectives: Sequence[Objective],
    hooks: Sequence[str],
    tokens: Int[Tensor, "batch seq"],
    layout: Layout,
    start: int,
    parents: _Parents,
    par: Int[Tensor, " batch"],
) -> tuple[Tensor, Tensor]:
    """Values and xe of rows that equal their parents before position `start`, computing only
    positions start.. (the parents' keys/values stand in for the rest)."""
    Cache, Entry = _kv_classes()
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
    values = torch.stack([v.to(torch.promote_types(v.dtype, torch.float32)) for v in vals]) if vals else torch.zeros((0, b), device=dev)
    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        raise NonFiniteError(
            "the model produced NaN or infinite objective values; usually an overflow in a low-precision dtype "
            "(load the model in float32) or broken weights"
        )
    lo, hi = layout.xe_from - 1, layout.span.stop - 1  # CE positions lo..hi-1 predict tokens lo+1..hi
    j = start - 1 - lo  # the parent's residual at start-1 predicts the child's new token at start
    before = parents.ce[par, :j].sum(dim=1)
    at = parents.lse[par, j] - _token_logits(model, parents.final[par, j], tokens[:, start])
    after, _ = _ce_terms(model, normed[:, : hi - start], tokens[:, start + 1 : hi + 1])
    xe = (before + at + after.sum(dim=1)) / (hi - lo)
    if not bool(torch.isfinite(xe).all()):
        raise NonFiniteError("the model's fluency (xe) is NaN or infinite; load the model in float32, or check its weights")
    return values, xe


# ---------------------------------------------------------------------------------------------
# Allowed tokens and reproducible text


def banned_mask(
    model: Any, *, ascii_only: bool = False, ban_whitespace_only: bool = False, extra: Sequence[int] = ()
) -> Bool[Tensor, " d_vocab"]:
    """Tokens the optimizers never propose: special tokens always, tokens that do not decode to
    themselves (broken byte pieces), optionally non-ASCII and whitespace-only tokens, and `extra`."""
    tok = model.tokenizer
    V = model.cfg.d_vocab
    # Decoding the whole vocabulary takes seconds: done once per model and setting (memoized on it).
    memo = model.__dict__.setdefault("_dreamlens_banned", {})
    key = (bool(ascii_only), bool(ban_whitespace_only), bos_token_id(model), len(tok), V, id(tok))
    if key not in memo:
        memo[key] = _banned_base(model, ascii_only, ban_whitespace_only)
    banned = memo[key].clone()
    for i in extra:
        if not 0 <= int(i) < V:
            raise DreamError(f"banned token id {i} is outside the vocabulary (0..{V - 1})")
        banned[int(i)] = True
    return banned


def _banned_base(model: Any, ascii_only: bool, ban_whitespace_only: bool) -> Tensor:
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
    owner) is never recomputed. History rows are kept per owner, once per distinct prompt.

    `dedup=False` (for comparisons only) forwards every row and every gradient row, repeats included.
    Prefix reuse (`reuse=True`): the latest `gradients` pass (or `remember`) leaves its prompts'
    keys/values behind; a candidate that shares a prefix with one of them is computed from its first
    differing position on. Batches hold at most `batch_size` prompts and `max_batch_tokens` tokens
    (default: estimated from free memory); on out-of-memory they are halved."""

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
        reuse: bool = True,
        dedup: bool = True,
        max_batch_tokens: int | None = None,
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
        self.dedup = dedup
        self.reuse_obstacle = _reuse_obstacle(model, self.objectives) if reuse else "reuse=False"
        self.reuse = self.reuse_obstacle is None
        self._checked = False  # reuse is compared once with the full pass before it is trusted
        self._parents: _Parents | None = None
        self._hooks = list(dict.fromkeys(h for o in self.objectives for h in o.hooks))
        self.batcher = _Batcher(_pass_tokens(model, layout.seq_len, batch_size, max_batch_tokens))
        self.grad_batcher = _Batcher(max_batch_tokens or estimate_batch_tokens(model, layout.seq_len, grad=True))
        self.call_cost = _call_cost_tokens(model)
        self.last_plan: list[tuple[int, Tensor, Tensor | None]] = []
        self.last_gradient_rows: Tensor | None = None
        self.reused_rows = 0  # candidates computed from a parent's prefix
        self.saved_token_forwards = 0  # positions not recomputed thanks to reuse

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
        first: dict[bytes, int] = {}  # each distinct prompt's first row
        for i in range(n):
            if ok[i]:
                first.setdefault(keys[i], i)
        known: dict[bytes, tuple[np.ndarray, float]] = {}  # taken now: later puts may evict them
        if self.dedup:
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
        self.last_plan = []  # (start, rows, parents) of each pass group: for benchmarks

        def score_full(idx: Tensor) -> None:
            rows = span_ids[idx.to(device)]
            v, x = _score_full(self.model, self.objectives, rows, self.layout, self.batcher)
            vals[:, idx], xe[idx] = v.double().cpu(), x.double().cpu()
            self.token_forwards += len(idx) * seq
            self.last_plan.append((0, rows, None))

        full = torch.nonzero(starts == 0).flatten()  # no parent; or no start token and a new first token
        if len(full):
            score_full(full)
        reused = starts[starts > 0]
        if len(reused):
            distinct, counts = torch.unique(reused, return_counts=True)
            groups = _buckets(distinct.tolist(), counts.tolist(), seq, self.batcher, self.call_cost)
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
            self.last_plan.append((start, rows, p))

            def run(lo: int, hi: int, tokens: Tensor = tokens, p: Tensor = p, start: int = start) -> tuple[Tensor, Tensor]:
                return _forward_from(self.model, self.objectives, self._hooks, tokens[lo:hi], self.layout, start, self._parents, p[lo:hi])

            parts = self.batcher.run(len(idx), seq - start, run)
            vals[:, idx] = torch.cat([v for v, _ in parts], dim=1).double().cpu()
            xe[idx] = torch.cat([x for _, x in parts]).double().cpu()
            self.token_forwards += len(idx) * (seq - start)
            self.saved_token_forwards += len(idx) * start
            self.reused_rows += len(idx)
        self.n_forward += n
        return vals, xe

    def _check(self, span_ids: Tensor, start: int, par: Tensor) -> bool:
        """Prefix reuse against the full pass on a couple of rows, once; off (with a warning) if they differ."""
        tokens = self.layout.assemble(span_ids)
        v_r, x_r = _forward_from(self.model, self.objectives, self._hooks, tokens, self.layout, start, self._parents, par.to(tokens.device))
        v_f, x_f = score(self.model, self.objectives, span_ids, self.layout)
        self.token_forwards += span_ids.shape[0] * self.layout.seq_len
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
            key = (ScoreCache.key(row), int(owner[i])) if self.dedup else (b"", i)
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
            grad_part, *rest = _gradient_pass(self.model, self.objectives, ids, self.layout, sub_lam[lo:hi], sub_owner[lo:hi])
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
        self.n_gradient += len(rows)
        self.token_forwards += GRADIENT_COST * len(rows) * self.layout.seq_len
        self.last_gradient_rows = span_ids[idx]
        return grad

    @torch.no_grad()
    def remember(self, span_ids: Int[Tensor, "n length"]) -> None:
        """Run these prompts once (no gradient) so that candidates can reuse their prefixes; for
        optimizers that propose children without a gradient pass over the parents."""
        if not self.reuse:
            return

        def run(ids: Tensor, lo: int, hi: int) -> tuple[Any, ...]:
            _, ce, lse, final = _full_pass(self.model, self.objectives, self.layout.assemble(ids), self.layout)
            return (None, None, None, (ce, lse, final))

        self._passes(span_ids, run, self.batcher)
        self.token_forwards += span_ids.shape[0] * self.layout.seq_len

    def _passes(self, span_ids: Tensor, fn: Any, batcher: _Batcher | None = None, owner: Tensor | None = None) -> list[Any]:
        """Run `fn(ids, lo, hi)` over row batches; with reuse on, also keep what children need
        (`_Parents`): keys/values, the objectives' activations, and the CE terms `fn` returns last."""
        device = self.model.cfg.device
        span_ids = span_ids.to(device)
        batcher = batcher or self.grad_batcher
        n = span_ids.shape[0]
        if not self.reuse:
            return batcher.run(n, self.layout.seq_len, lambda lo, hi: fn(span_ids[lo:hi], lo, hi))
        acts: dict[str, list[Tensor]] = {h: [] for h in self._hooks}

        def save(act: Tensor, hook: Any) -> None:
            acts[hook.name].append(act.detach())

        with _KVRecorder(self.model) as rec, self.model.hooks(fwd_hooks=[(h, save) for h in self._hooks]):

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

            parts = batcher.run(n, self.layout.seq_len, run)
        if not parts:
            return parts
        if any(len(es) != len(parts) for es in rec.entries):  # an attention layer took no cache entry
            self.reuse, self.reuse_obstacle = False, "the model's attention layers do not take KV-cache entries"
            warnings.warn(f"prefix reuse is off: {self.reuse_obstacle}; every candidate gets a full pass", stacklevel=3)
            return parts
        keys, values = rec.take()
        ce, lse, final = (torch.cat([p[-1][i] for p in parts]) for i in range(3))
        self._parents = _Parents(
            ids=span_ids.cpu(), keys=keys, values=values, acts={h: torch.cat(a) for h, a in acts.items()},
            final=final, lse=lse, ce=ce, owner=owner,
        )
        return parts


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


def check_not_constant(model: Any, objective: Objective, span_ids: Int[Tensor, "batch length"], layout: Layout) -> None:
    """Raise a DreamError, before any search, when the objective has nothing to climb on these prompts."""
    if not objective_is_constant(model, objective, span_ids, layout):
        return
    from ..objectives import SAELatent

    gated = [o for _, o in objective._terms() if isinstance(o, SAELatent) and not o.pre_activation]
    if gated:
        hint = (
            f"an SAE latent ({gated[0]}) is exactly 0 with zero gradient wherever it does not fire (below its "
            "ReLU/JumpReLU threshold or outside the top k): dream its pre-activation instead (the string "
            "form 'sae_pre:...', or SAELatent(..., pre_activation=True)), or start from a text where it "
            "fires (init_text)"
        )
    else:
        hint = "a hook before the tokens can influence it, or a dead unit; pick another target"
    raise DreamError(
        f"the objective {str(objective)!r} has zero gradient for every token of the initial prompts: it is "
        f"constant here ({hint})"
    )
