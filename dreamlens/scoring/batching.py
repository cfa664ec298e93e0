"""How many prompts go through the model at once: memory estimates, the batcher that splits rows into
passes (halving them on out-of-memory), grouping by reuse start, and the fast weight layout."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch
from torch import Tensor

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

T = TypeVar("T")


class BatchingKnobs(Protocol):
    """What `Batching.of` reads from a config (a DreamConfig has them)."""

    @property
    def batch_size(self) -> int: ...
    @property
    def max_batch_tokens(self) -> int | None: ...
    @property
    def reuse_prefix(self) -> bool: ...


@dataclass(frozen=True)
class Batching:
    """How an Evaluator puts prompts through the model: at most `batch_size` prompts and
    `max_batch_tokens` tokens a pass (None: estimated from free memory); children from their parents'
    KV caches (`reuse_prefix`); each distinct prompt forwarded once (`dedup`; off only for
    comparisons); up to `cache_size` prompts' scores kept."""

    batch_size: int = 64
    max_batch_tokens: int | None = None
    reuse_prefix: bool = True
    dedup: bool = True
    cache_size: int = 2_000_000

    @classmethod
    def of(cls, config: BatchingKnobs) -> Batching:
        """A run's batching, from its config's batch_size, max_batch_tokens and reuse_prefix."""
        return cls(batch_size=config.batch_size, max_batch_tokens=config.max_batch_tokens, reuse_prefix=config.reuse_prefix)


# Logits are the largest transient (rows x positions x vocabulary); cross-entropy is computed in row
# chunks of at most this many logit entries (64 MiB in fp32).
CE_CHUNK_ELEMENTS = 1 << 24


def ce_rows(n: int, vocab: int) -> int:
    """Rows per cross-entropy chunk of `n` positions over a `vocab`-sized vocabulary (CE_CHUNK_ELEMENTS)."""
    return max(1, CE_CHUNK_ELEMENTS // max(1, n * vocab))


def _bytes_per_token(model: HookedTransformer, seq_len: int, grad: bool = False) -> int:
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


def estimate_batch_tokens(model: HookedTransformer, seq_len: int, *, grad: bool = False) -> int:
    """Tokens per forward pass that fit in memory: 40% of the free GPU memory, or on a CPU an eighth
    of the available memory, at most 512 MiB (larger passes are no faster there). `grad`: for a
    forward/backward pass, which keeps every layer's activations."""
    device = torch.device(model.cfg.device) if model.cfg.device is not None else torch.device("cpu")
    free = _free_memory(device)
    budget = int(0.4 * free) if device.type == "cuda" else min(free // 8, 512 << 20)
    return max(seq_len, budget // _bytes_per_token(model, seq_len, grad))


def is_oom(e: BaseException) -> bool:
    """Whether an exception is an out-of-memory error (torch's, or a RuntimeError saying so)."""
    oom = getattr(torch, "OutOfMemoryError", None)
    return (oom is not None and isinstance(e, oom)) or (isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


class Batcher:
    """Splits rows into passes of at most `max_tokens` tokens (at least one prompt); on an
    out-of-memory error it halves the pass, goes on, and keeps the smaller size."""

    def __init__(self, max_tokens: int):
        self.max_tokens, self.warned = max(1, int(max_tokens)), False

    def rows(self, tokens_per_row: int) -> int:
        """Rows per pass for rows of `tokens_per_row` tokens."""
        return max(1, self.max_tokens // max(tokens_per_row, 1))

    def run(self, n: int, tokens_per_row: int, fn: Callable[[int, int], T]) -> list[T]:
        """`fn(lo, hi)` over consecutive row ranges covering 0..n; the results in order."""
        out, i = [], 0
        while i < n:
            b = min(self.rows(tokens_per_row), n - i)
            try:
                out.append(fn(i, i + b))
            except Exception as e:
                if not is_oom(e) or b == 1:
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


def pass_tokens(model: HookedTransformer, seq_len: int, batch_size: int, max_batch_tokens: int | None) -> int:
    """Tokens per evaluation pass: `batch_size` whole prompts, within `max_batch_tokens` (default: an
    estimate from free memory). Shorter rows (children computed from a parent's prefix) fit more prompts."""
    cap = batch_size * seq_len
    return min(cap, max_batch_tokens or estimate_batch_tokens(model, seq_len))


def call_cost_tokens(model: HookedTransformer) -> int:
    """A forward pass streams every weight once however few tokens it carries: on a CPU that costs about
    as much as this many tokens of compute (far more on a GPU). Used to decide when children of different
    first-changed positions are better computed together from the smaller position."""
    dev = model.cfg.device
    return 1024 if dev is not None and torch.device(dev).type == "cuda" else 48


def buckets(starts: list[int], counts: list[int], seq: int, batcher: Batcher, call_cost: int) -> list[list[int]]:
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


@contextmanager
def fast_weights(model: HookedTransformer) -> Iterator[None]:
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
