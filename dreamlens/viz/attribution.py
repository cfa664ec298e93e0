"""Token attribution shown with circuitsvis: tokens colored by a drop, the drops and alternatives in each
token's hover text (`TokenView`), one view (`render`, for Jupyter) or a page of them (`page`).

circuitsvis is used through its Python API only: `colored_tokens(...)` returns a `RenderedHTML`, whose
self-contained `local_src` (it inlines circuitsvis's script) is placed, as it is, in a document of our own
(`templates/token_view.html.j2`), and that document in an iframe's `srcdoc` (escaped by jinja). Each view
so carries its own copy of circuitsvis's script (about 1.3 MB).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from circuitsvis.tokens import colored_tokens
from circuitsvis.utils.render import RenderedHTML
from markupsafe import Markup, escape

from ..analysis.errors import AttributionError
from ..io import atomic_write_text
from .html import parts, render

if TYPE_CHECKING:
    from ..analysis.attribution import Attribution

POSITIVE, NEGATIVE = "#1f77b4", "#d62728"  # blue: swapping the token lowers the objective; red: raises it


class OfflineHTML(RenderedHTML):
    """circuitsvis's `RenderedHTML`, always shown from the self-contained source: its own notebook repr
    probes the internet and switches to the CDN when online."""

    def _repr_html_(self) -> str:
        return self.local_src


@dataclass(frozen=True)
class TokenView:
    """Tokens colored by values with one hover text each, drawn by circuitsvis's ColoredTokens."""

    tokens: list[str]
    values: list[float]
    titles: list[str]
    caption: str = ""

    def circuitsvis(self) -> RenderedHTML:
        """circuitsvis's own render of the tokens. The values' scale is symmetric, so 0 is white; token
        strings are HTML-escaped first (ColoredTokens puts them into innerHTML)."""
        vals = [float(v) if np.isfinite(v) else 0.0 for v in self.values]
        scale = max((abs(v) for v in vals), default=0.0) or 1.0
        return colored_tokens([str(escape(t)) for t in self.tokens], [round(v, 6) for v in vals], min_value=-scale,
                              max_value=scale, negative_color=NEGATIVE, positive_color=POSITIVE)

    def document(self, cdn: bool = False) -> str:
        """This view as an HTML document of its own: the caption, circuitsvis's HTML (its self-contained
        `local_src`, or `cdn_src` with `cdn=True`) and the script that sets the hover texts."""
        rendered = self.circuitsvis()
        src = rendered.cdn_src if cdn else rendered.local_src
        return render("token_view.html.j2", caption=self.caption, titles=self.titles, circuitsvis=Markup(src))

    def frame(self, cdn: bool = False) -> Markup:
        """This view in an iframe (its document as `srcdoc`), to place in any page."""
        return parts().frame(self.document(cdn), self.caption)

    def rendered(self) -> OfflineHTML:
        """A `RenderedHTML` of the view (shown inline in Jupyter, from the self-contained source)."""
        return OfflineHTML(str(self.frame()), str(self.frame(cdn=True)))


def tooltips(attr: Attribution, max_alternatives: int | None = None) -> list[str]:
    """The hover text of each position: both drops, then the alternatives, best first."""
    out = []
    for p in range(attr.length):
        order = np.argsort(-attr.alt_values[p], kind="stable")[:max_alternatives]
        lines = [
            f"{attr.tokens[p]!r}  (position {p})",
            f"drop to best swap {attr.drop_best[p]:+.4g}, to worst {attr.drop_worst[p]:+.4g}",
            f"value here {attr.value:.4g}; with each swap (g: gradient pick, r: random):",
        ]
        for j in order:
            src = "g" if j < attr.n_gradient else "r"
            lines.append(f"{attr.alt_values[p, j]:>9.4g}  {src}  {attr.alt_tokens[p][j]!r}")
        out.append("\n".join(lines))
    return out


def token_view(attr: Attribution, color_by: str = "drop_best", max_alternatives: int | None = None) -> TokenView:
    """The view of an attribution: tokens colored by `color_by` ("drop_best" or "drop_worst"), the drops
    and alternatives in each token's hover text; the prefix and suffix shown uncolored."""
    if color_by not in ("drop_best", "drop_worst"):
        raise AttributionError(f"color_by must be 'drop_best' or 'drop_worst', got {color_by!r}")
    drops = np.nan_to_num(getattr(attr, color_by).astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    ctx = "fixed context (not attributed)"
    n_pre, n_suf = len(attr.prefix_tokens), len(attr.suffix_tokens)
    caption = (
        f"{attr.objective} = {attr.value:.4g} (xe {attr.xe:.3g}). Tokens colored by {color_by.replace('_', ' ')}: "
        "blue, the objective drops when this token is swapped; red, a swap raises it. Hover for the alternatives."
    )
    return TokenView(
        tokens=list(attr.prefix_tokens) + list(attr.tokens) + list(attr.suffix_tokens),
        values=[0.0] * n_pre + [float(d) for d in drops] + [0.0] * n_suf,
        titles=[ctx] * n_pre + tooltips(attr, max_alternatives) + [ctx] * n_suf,
        caption=caption,
    )


def render_attribution(attr: Attribution, color_by: str = "drop_best", max_alternatives: int | None = None) -> OfflineHTML:
    """One attribution's view for Jupyter (a circuitsvis `RenderedHTML`, from the self-contained source)."""
    return token_view(attr, color_by, max_alternatives).rendered()


def page(views: Sequence[TokenView], title: str = "dreamlens", intro: str = "") -> str:
    """A self-contained HTML page of token views (no external URL); `intro` is text, shown escaped."""
    return render("attribution_page.html.j2", title=title, intro=intro, views=[v.frame() for v in views])


def attribution_page(attr: Attribution, color_by: str = "drop_best", max_alternatives: int | None = None,
                     title: str | None = None) -> str:
    """A whole self-contained page of one attribution (works offline)."""
    return page([token_view(attr, color_by, max_alternatives)], title=title or f"Token attribution: {attr.objective}")


def save_attribution(attr: Attribution, path: str | Path, **kwargs: Any) -> Path:
    """Write `attribution_page(attr, **kwargs)` to `path` (atomically)."""
    return atomic_write_text(Path(path), attribution_page(attr, **kwargs))
