"""Causal token attribution: each token of a prompt swapped for its top gradient alternatives and random
tokens, re-scored with the dreams' own layout. Computing only: `dreamlens.viz.attribution` shows the drops
with circuitsvis (`Attribution.render()` and `.html()` call it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor

from ..models import bos_token_id, decode, encode
from ..objectives import Objective
from ..objectives import objective as parse_objective
from ..scoring import Layout, banned_mask, make_layout, score, token_gradients
from .errors import AttributionError

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from ..results import DreamResult


@dataclass
class Attribution:
    """What swapping each token of one prompt does to the objective.

    `alt_*` are `[length, k]`: per position, the first `n_gradient` alternatives are the top gradient
    picks (best predicted first), the rest random tokens. `value` and `alt_values` come from the same
    batched scoring pass, so `drop_*` compare like with like."""

    objective: str
    text: str
    ids: np.ndarray  # [length] int
    tokens: list[str]  # each token's own text
    value: float  # the objective on the prompt as it is
    xe: float  # its fluency (mean cross-entropy, nats per token)
    alt_ids: np.ndarray  # [length, k] int
    alt_tokens: list[list[str]]
    alt_values: np.ndarray  # [length, k] float: the objective with that one token swapped
    alt_xe: np.ndarray  # [length, k] float
    n_gradient: int
    prefix: str = ""
    suffix: str = ""
    prefix_tokens: list[str] = field(default_factory=list)
    suffix_tokens: list[str] = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.tokens)

    @property
    def drop_best(self) -> np.ndarray:
        """Per position: value minus the best replacement's value (negative: some swap does better)."""
        return self.value - self.alt_values.max(axis=1)

    @property
    def drop_worst(self) -> np.ndarray:
        """Per position: value minus the worst replacement's value (how much one swap can destroy)."""
        return self.value - self.alt_values.min(axis=1)

    @property
    def sources(self) -> np.ndarray:
        k = self.alt_ids.shape[1]
        return np.array(["gradient"] * self.n_gradient + ["random"] * (k - self.n_gradient))

    def to_dataframe(self) -> pd.DataFrame:
        """One row per position: the token, both drops, and the best and worst replacements."""
        best = self.alt_values.argmax(axis=1)
        worst = self.alt_values.argmin(axis=1)
        rows = range(self.length)
        return pd.DataFrame(
            {
                "position": list(rows),
                "token": self.tokens,
                "id": self.ids.astype(np.int64),
                "drop_best": self.drop_best,
                "drop_worst": self.drop_worst,
                "best_alternative": [self.alt_tokens[p][best[p]] for p in rows],
                "best_value": self.alt_values[np.arange(self.length), best],
                "worst_alternative": [self.alt_tokens[p][worst[p]] for p in rows],
                "worst_value": self.alt_values[np.arange(self.length), worst],
            }
        )

    def alternatives(self) -> pd.DataFrame:
        """One row per (position, alternative): what was swapped in, its value, drop and xe."""
        L, k = self.alt_ids.shape
        return pd.DataFrame(
            {
                "position": np.repeat(np.arange(L), k),
                "token": np.repeat(np.array(self.tokens, dtype=object), k),
                "alternative": [t for row in self.alt_tokens for t in row],
                "alternative_id": self.alt_ids.reshape(-1).astype(np.int64),
                "source": np.tile(self.sources, L),
                "value": self.alt_values.reshape(-1),
                "drop": self.value - self.alt_values.reshape(-1),
                "xe": self.alt_xe.reshape(-1),
            }
        )

    def __repr__(self) -> str:
        return (
            f"Attribution({self.objective!r}, {self.text!r}, value {self.value:.4g}, "
            f"{self.length} tokens x {self.alt_ids.shape[1]} alternatives)"
        )

    # -- shown by `dreamlens.viz.attribution` (analysis computes, viz renders) ---------------------
    def render(self, color_by: str = "drop_best", max_alternatives: int | None = None) -> Any:
        """circuitsvis HTML (a `RenderedHTML`: shown inline in Jupyter, from the self-contained source);
        see `dreamlens.viz.attribution`."""
        return _viz().render_attribution(self, color_by, max_alternatives)

    def html(self, color_by: str = "drop_best", max_alternatives: int | None = None, title: str | None = None) -> str:
        """A whole self-contained HTML page (works offline: circuitsvis's script is inlined)."""
        return _viz().attribution_page(self, color_by, max_alternatives, title)

    def save_html(self, path: str | Path, **kwargs: Any) -> Path:
        """Write `html(**kwargs)` to `path`."""
        return _viz().save_attribution(self, path, **kwargs)


def _viz() -> ModuleType:
    """The renderer of attributions (`viz.attribution`, on a floor below analysis: it needs no scan, no
    optimizer, only the attribution's numbers), so that `attr.render()` works while analysis computes only."""
    from ..viz import attribution  # lazy: circuitsvis and the viz package (matplotlib) load on the first display

    return attribution


# ---------------------------------------------------------------------------------------------
# Computing attributions


def _as_ids(model: HookedTransformer, prompt: str | Sequence[int] | Tensor | np.ndarray) -> list[int]:
    if isinstance(prompt, str):
        ids = encode(model, prompt)
        if not ids:
            raise AttributionError(f"the prompt {prompt!r} has no tokens; give a non-empty text or a list of token ids")
        return ids
    if isinstance(prompt, (Tensor, np.ndarray)):
        if prompt.ndim != 1:
            raise AttributionError(f"token ids must be one prompt, a 1-d sequence; got shape {tuple(prompt.shape)}")
        prompt = prompt.tolist()
    try:
        ids = [int(i) for i in prompt]
    except (TypeError, ValueError) as e:
        raise AttributionError(f"a prompt is a text or a sequence of token ids, got {type(prompt).__name__}: {e}") from None
    if not ids:
        raise AttributionError("the prompt has no tokens; give a non-empty text or a list of token ids")
    V = model.cfg.d_vocab
    bad = [i for i in ids if not 0 <= i < V]
    if bad:
        raise AttributionError(f"token id(s) {bad[:5]} are outside the vocabulary: use 0..{V - 1}")
    return ids


def _random_alternatives(
    spans: Tensor, exclude: Tensor, allowed: Tensor, n: int, gen: torch.Generator
) -> Int[Tensor, "batch length n"]:
    """n distinct allowed tokens per position, none of them in `exclude[b, p]` (the token itself and
    the gradient picks). Drawn with replacement, then filtered: cheap since n << vocabulary."""
    B, L = spans.shape
    out = torch.empty((B, L, n), dtype=torch.long)
    for b in range(B):
        for p in range(L):
            taken = set(exclude[b, p].tolist())
            picks: list[int] = []
            while len(picks) < n:
                for t in allowed[torch.randint(len(allowed), (4 * n,), generator=gen)].tolist():
                    if t not in taken:
                        taken.add(t)
                        picks.append(t)
                        if len(picks) == n:
                            break
            out[b, p] = torch.tensor(picks)
    return out


def _token_texts(model: HookedTransformer, ids: Sequence[int]) -> list[str]:
    return [decode(model, [int(i)]) for i in ids]


def attribute_many(
    model: HookedTransformer,
    objective: Objective | str,
    prompts: Sequence[str | Sequence[int] | Tensor],
    *,
    prefix: str = "",
    suffix: str = "",
    n_gradient: int = 8,
    n_random: int = 8,
    seed: int = 0,
    batch_size: int = 64,
    ascii_only: bool = False,
) -> list[Attribution]:
    """Attributions of several prompts: prompts of equal length share one gradient pass and one
    batched scoring call. See `attribute`."""
    if n_gradient < 0 or n_random < 0 or n_gradient + n_random < 1:
        raise AttributionError(
            f"need at least one alternative per token: n_gradient={n_gradient}, n_random={n_random} (both >= 0)"
        )
    obj = parse_objective(objective)
    obj.validate(model)
    all_ids = [_as_ids(model, p) for p in prompts]
    banned = banned_mask(model, ascii_only=ascii_only)  # memoized on the model: a notebook attributes many prompts
    allowed = torch.nonzero(~banned).flatten()
    if len(allowed) < n_gradient + n_random + 1:
        raise AttributionError(
            f"only {len(allowed)} tokens are allowed; ask for fewer than {len(allowed)} alternatives per token"
        )
    gen = torch.Generator().manual_seed(seed)
    prefix_tokens = _token_texts(model, encode(model, prefix)) if prefix else []
    suffix_tokens = _token_texts(model, encode(model, suffix)) if suffix else []
    out: list[Attribution | None] = [None] * len(all_ids)
    by_len: dict[int, list[int]] = {}
    for i, ids in enumerate(all_ids):
        by_len.setdefault(len(ids), []).append(i)
    for L, rows in by_len.items():
        layout = make_layout(model, L, prefix, suffix)
        spans = torch.tensor([all_ids[i] for i in rows], dtype=torch.long)
        alt, vals, xes, base_v, base_xe = _swap_and_score(
            model, obj, spans, layout, banned, allowed, n_gradient, n_random, gen, batch_size
        )
        for j, i in enumerate(rows):
            ids = all_ids[i]
            out[i] = Attribution(
                objective=str(obj), text=decode(model, ids), ids=np.asarray(ids, dtype=np.int64),
                tokens=_token_texts(model, ids), value=float(base_v[j]), xe=float(base_xe[j]),
                alt_ids=alt[j].numpy(), alt_tokens=[_token_texts(model, r) for r in alt[j].tolist()],
                alt_values=vals[j].numpy(), alt_xe=xes[j].numpy(), n_gradient=n_gradient,
                prefix=prefix, suffix=suffix, prefix_tokens=prefix_tokens, suffix_tokens=suffix_tokens,
            )
    return out  # type: ignore[return-value]


def _swap_and_score(
    model: HookedTransformer, obj: Objective, spans: Tensor, layout: Layout, banned: Tensor, allowed: Tensor,
    n_gradient: int, n_random: int, gen: torch.Generator, batch_size: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    B, L = spans.shape
    K = n_gradient + n_random
    device = model.cfg.device
    picks = torch.empty((B, L, 0), dtype=torch.long)
    if n_gradient:
        grad = token_gradients(model, [obj], spans.to(device), layout, torch.zeros(B))[0].detach().cpu().float()
        grad[..., banned] = float("inf")
        grad.scatter_(2, spans.unsqueeze(-1), float("inf"))  # never the token itself
        picks = (-grad).topk(n_gradient, dim=-1).indices
    if n_random:
        exclude = torch.cat([spans.unsqueeze(-1), picks], dim=-1)
        picks = torch.cat([picks, _random_alternatives(spans, exclude, allowed, n_random, gen)], dim=-1)
    swapped = spans[:, None, None, :].repeat(1, L, K, 1)  # [B, L(position), K, L]
    for p in range(L):
        swapped[:, p, :, p] = picks[:, p, :]
    rows = torch.cat([spans, swapped.view(-1, L)])
    vals, xe = score(model, [obj], rows.to(device), layout, batch_size=batch_size)
    vals, xe = vals[0].cpu().double(), xe.cpu().double()
    return picks, vals[B:].view(B, L, K), xe[B:].view(B, L, K), vals[:B], xe[:B]


def attribute(
    model: HookedTransformer,
    objective: Objective | str,
    text_or_ids: str | Sequence[int] | Tensor,
    *,
    prefix: str = "",
    suffix: str = "",
    n_gradient: int = 8,
    n_random: int = 8,
    seed: int = 0,
    batch_size: int = 64,
    ascii_only: bool = False,
) -> Attribution:
    """Causal token attribution of one prompt.

    Each token in turn is replaced by `n_gradient` alternatives (the tokens whose one-hot gradient
    predicts the largest gain in the objective) and `n_random` random tokens (special and broken tokens
    never), and the objective is re-evaluated on every swapped prompt, with the same layout as a dream
    (start token, `prefix` and `suffix` context). The prompt is a text or a list of token ids."""
    return attribute_many(
        model, objective, [text_or_ids], prefix=prefix, suffix=suffix, n_gradient=n_gradient,
        n_random=n_random, seed=seed, batch_size=batch_size, ascii_only=ascii_only,
    )[0]


def attribute_frontier(
    model: HookedTransformer, result: DreamResult, *, max_prompts: int = 8, **kwargs: Any
) -> list[Attribution]:
    """Attributions of a dream's frontier prompts (up to `max_prompts`, spread along the frontier from
    the most fluent to the most activating), in the result's own context."""
    bos = bos_token_id(model)
    if result.bos_token_id != bos:
        raise AttributionError(
            f"the dream was scored after start token {result.bos_token_id!r} but this model uses {bos!r}: "
            f"values would not match; call dreamlens.set_bos_token_id(model, {result.bos_token_id!r}) first"
        )
    frontier = result.frontier
    if len(frontier) == 0:
        return []
    pick = np.unique(np.linspace(0, len(frontier) - 1, min(max_prompts, len(frontier))).round().astype(int))
    prompts = [list(map(int, frontier["ids"].iloc[i])) for i in pick]
    return attribute_many(model, result.objective, prompts, prefix=result.prefix, suffix=result.suffix, **kwargs)
