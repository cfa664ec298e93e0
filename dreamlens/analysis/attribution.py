"""Causal token attribution: each token of a prompt swapped for its top gradient alternatives and random
tokens, re-scored with the dreams' own layout; `Attribution.render()` shows the drops with circuitsvis.
"""

from __future__ import annotations

import html
import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor

from ..models import decode, encode
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

    # -- rendering -------------------------------------------------------------------------------
    def tooltips(self, max_alternatives: int | None = None) -> list[str]:
        """The hover text of each position: both drops, then the alternatives, best first."""
        out = []
        for p in range(self.length):
            order = np.argsort(-self.alt_values[p], kind="stable")[:max_alternatives]
            lines = [
                f"{self.tokens[p]!r}  (position {p})",
                f"drop to best swap {self.drop_best[p]:+.4g}, to worst {self.drop_worst[p]:+.4g}",
                f"value here {self.value:.4g}; with each swap (g: gradient pick, r: random):",
            ]
            for j in order:
                src = "g" if j < self.n_gradient else "r"
                lines.append(f"{self.alt_values[p, j]:>9.4g}  {src}  {self.alt_tokens[p][j]!r}")
            out.append("\n".join(lines))
        return out

    def view(self, color_by: str = "drop_best", max_alternatives: int | None = None) -> TokenView:
        """The circuitsvis view of this attribution: tokens colored by `color_by` ("drop_best" or
        "drop_worst"), the drops and alternatives in each token's hover text."""
        if color_by not in ("drop_best", "drop_worst"):
            raise AttributionError(f"color_by must be 'drop_best' or 'drop_worst', got {color_by!r}")
        drops = np.nan_to_num(getattr(self, color_by).astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        ctx = "fixed context (not attributed)"
        n_pre, n_suf = len(self.prefix_tokens), len(self.suffix_tokens)
        caption = (
            f"{self.objective} = {self.value:.4g} (xe {self.xe:.3g}). Tokens colored by {color_by.replace('_', ' ')}: "
            "blue, the objective drops when this token is swapped; red, a swap raises it. Hover for the alternatives."
        )
        return TokenView(
            tokens=list(self.prefix_tokens) + list(self.tokens) + list(self.suffix_tokens),
            values=[0.0] * n_pre + [float(d) for d in drops] + [0.0] * n_suf,
            titles=[ctx] * n_pre + self.tooltips(max_alternatives) + [ctx] * n_suf,
            caption=caption,
        )

    def render(self, color_by: str = "drop_best", max_alternatives: int | None = None) -> Any:
        """circuitsvis HTML (a `RenderedHTML`: shown inline in Jupyter, from the self-contained source)."""
        return self.view(color_by, max_alternatives).rendered()

    def html(self, color_by: str = "drop_best", max_alternatives: int | None = None, title: str | None = None) -> str:
        """A whole self-contained HTML page (works offline: the circuitsvis script is inlined)."""
        return page([self.view(color_by, max_alternatives)], title=title or f"Token attribution: {self.objective}")

    def save_html(self, path: str | Path, **kwargs: Any) -> Path:
        path = Path(path)
        path.write_text(self.html(**kwargs), encoding="utf-8")
        return path


# ---------------------------------------------------------------------------------------------
# circuitsvis views. circuitsvis's ColoredTokens puts each token string into innerHTML, so token strings
# are HTML-escaped; every value is passed as JSON made safe for the <script> it sits in; the hover text
# is set as a DOM `title` property (never parsed as HTML). Pages inline circuitsvis's script once.


def js_literal(obj: Any) -> str:
    """JSON that is safe inside a <script> element: no `</script>`, `<!--` or line separators."""
    s = json.dumps(obj, ensure_ascii=True, allow_nan=False)
    return s.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


STYLE = """
.dreamlens-view { margin: 0.6em 0 1.2em; }
.dreamlens-view .colored-tokens { padding-bottom: 4px !important; }
.dreamlens-view .colored-tokens > span { cursor: help; }
.dreamlens-view .colored-tokens > div { display: none; } /* circuitsvis's popup: the title says more */
.dreamlens-view .caption { font: 13px system-ui, sans-serif; color: #444; margin: 4px 0; }
"""

# Sets each token's hover text once React has rendered the tokens (it renders asynchronously).
_TITLES_JS = """window.dreamlensTitles = window.dreamlensTitles || function (id, titles) {
  var root = document.getElementById(id);
  function apply() {
    var spans = root.querySelectorAll(".colored-tokens > span");
    if (spans.length < titles.length) return false;
    for (var i = 0; i < titles.length; i++) spans[i].title = titles[i];
    root.setAttribute("data-titled", "1");
    return true;
  }
  if (!apply()) {
    var obs = new MutationObserver(function () { if (apply()) obs.disconnect(); });
    obs.observe(root, {childList: true, subtree: true});
  }
};"""


@dataclass
class TokenView:
    """Tokens colored by values with one hover text each, rendered by circuitsvis's ColoredTokens."""

    tokens: list[str]
    values: list[float]
    titles: list[str]
    caption: str = ""

    def props(self) -> dict[str, Any]:
        vals = [float(v) if np.isfinite(v) else 0.0 for v in self.values]
        scale = max((abs(v) for v in vals), default=0.0) or 1.0  # symmetric, so 0 is white
        return {
            "tokens": [html.escape(t, quote=True) for t in self.tokens],
            "values": [round(v, 6) for v in vals],
            "minValue": -scale,
            "maxValue": scale,
            "positiveColor": "#1f77b4",
            "negativeColor": "#d62728",
        }

    def _circuitsvis(self) -> Any:
        from circuitsvis.tokens import colored_tokens

        p = self.props()
        return colored_tokens(p["tokens"], p["values"], min_value=p["minValue"], max_value=p["maxValue"],
                              negative_color=p["negativeColor"], positive_color=p["positiveColor"])

    def _fixed(self, src: str) -> str:
        """circuitsvis's HTML with its props made safe, and its self-closing div closed."""
        props = self.props()
        order = ["tokens", "values", "minValue", "maxValue", "negativeColor", "positiveColor"]
        unsafe = json.dumps({k: props[k] for k in order})
        head, sep, tail = src.rpartition(unsafe)
        if not sep:
            raise RuntimeError("unexpected circuitsvis HTML layout: cannot find the props it was given")
        src = head + js_literal({k: props[k] for k in order}) + tail
        return re.sub(r'^(\s*<div id="[^"]*" style="[^"]*")\s*/>', r"\1></div>", src, count=1)

    def rendered(self) -> Any:
        """circuitsvis's own `RenderedHTML` (self-contained `local_src`), with the hover texts."""
        raw = self._circuitsvis()
        wrap = f"dl-view-{uuid.uuid4().hex[:12]}"
        head = (
            f'<style>{STYLE}</style><div class="dreamlens-view" id="{wrap}">'
            f'<div class="caption">{html.escape(self.caption)}</div>'
        )
        tail = f"</div><script>{_TITLES_JS}\nwindow.dreamlensTitles({js_literal(wrap)}, {js_literal(self.titles)});</script>"
        return _offline_html(head + self._fixed(raw.local_src) + tail, head + self._fixed(raw.cdn_src) + tail)

    def html(self) -> str:
        """This view inside a page that already holds circuitsvis's script (see `page`)."""
        wrap, div = (f"dl-view-{uuid.uuid4().hex[:12]}" for _ in range(2))
        return (
            f'<div class="dreamlens-view" id="{wrap}"><div class="caption">{html.escape(self.caption)}</div>'
            f'<div id="{div}"></div><script>CircuitsVis.render({js_literal(div)}, CircuitsVis.ColoredTokens, '
            f"{js_literal(self.props())}); dreamlensTitles({js_literal(wrap)}, {js_literal(self.titles)});</script></div>"
        )


def circuitsvis_script() -> str:
    """The circuitsvis library as inline JavaScript, taken from circuitsvis's own `local_src`."""
    local = TokenView(["a"], [0.0], [""])._circuitsvis().local_src
    start = local.find(">", local.find("<script")) + 1
    end = local.rfind("CircuitsVis.render(")
    if start <= 0 or end < start:
        raise RuntimeError("unexpected circuitsvis HTML layout: cannot find its inlined script")
    # The source-map comment is dropped so that nothing is ever fetched, even with DevTools open.
    return local[start:end].replace("//# sourceMappingURL=iife.js.map", "")


def _offline_html(local_src: str, cdn_src: str) -> Any:
    """circuitsvis's RenderedHTML, always shown from the self-contained source: its own notebook repr
    probes the internet and switches to the CDN when online."""
    from circuitsvis.utils.render import RenderedHTML

    class OfflineHTML(RenderedHTML):
        def _repr_html_(self) -> str:
            return self.local_src

    return OfflineHTML(local_src, cdn_src)


def head_scripts() -> str:
    """What a page needs once, in its <head>, before any `TokenView.html()`."""
    return f"<style>{STYLE}</style><script>{circuitsvis_script()}</script><script>{_TITLES_JS}</script>"


def page(views: Sequence[TokenView], title: str = "dreamlens", intro: str = "") -> str:
    """A self-contained HTML page of token views (circuitsvis inlined once, no external URL)."""
    body = "\n".join(v.html() for v in views)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title>{head_scripts()}"
        "<style>body { font-family: system-ui, sans-serif; margin: 2em; }</style>"
        f"</head><body><h1>{html.escape(title)}</h1>{intro}\n{body}\n</body></html>\n"
    )


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
    from ..models import bos_token_id

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
