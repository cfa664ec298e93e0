"""The pages' HTML: jinja2 templates shipped in `viz/templates/` with autoescaping on (every value is
escaped where it lands; only markup the templates themselves made is marked safe), and the cells of
their tables.
"""

from __future__ import annotations

import base64
import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup

from ..io import atomic_write_text


@functools.cache  # one loader of the package's read-only templates (jinja keeps the compiled ones)
def environment() -> Environment:
    """The templates of `dreamlens/viz/templates`, autoescaped."""
    return Environment(
        loader=PackageLoader("dreamlens.viz", "templates"), autoescape=True, undefined=StrictUndefined,
        keep_trailing_newline=True,
    )


def render(template: str, **context: Any) -> str:
    """One template rendered with `context`."""
    return environment().get_template(template).render(**context)


def parts() -> Any:
    """The macros of `parts.html.j2` (table, kv, img, note, neuronpedia, frame, attributions): each
    returns `Markup`."""
    return environment().get_template("parts.html.j2").module


@dataclass(frozen=True)
class Cell:
    """One table cell: its text (escaped where it lands), class, sort key (`data-v`) and hover text."""

    text: Any
    cls: str = ""
    sort: str | None = None
    title: str = ""


def number(v: Any) -> str:
    """A number as 4 significant digits ('n/a' for NaN); anything else as its text."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return "n/a" if math.isnan(f) else f"{f:.4g}"


def cell(v: Any, prompt: bool = False) -> Cell:
    """Prompt texts shown exactly (repr), numbers right-aligned, the rest as text."""
    if prompt:
        return Cell(repr(v) if isinstance(v, str) else "", "prompt")
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return Cell(number(v), "num")
    return Cell(v)


def table(df: pd.DataFrame, prompt_cols: Sequence[str] = ("text",)) -> Markup:
    """An HTML table of a frame: prompt texts shown exactly (repr), numbers right-aligned."""
    cols = list(df.columns)
    rows = [[cell(r[c], c in prompt_cols) for c in cols] for _, r in df.iterrows()]
    return parts().table(cols, rows)


def kv(pairs: Sequence[tuple[str, Any]]) -> Markup:
    """A two-column table of names and values."""
    return parts().kv(list(pairs))


def png(data: bytes, alt: str) -> Markup:
    """An image inlined as a data URL."""
    return parts().img("data:image/png;base64," + base64.b64encode(data).decode(), alt)


def note(text: str) -> Markup:
    return parts().note(text)


def write_page(path: str | os.PathLike, page: str) -> Path:
    """Write an HTML page to `path` atomically, creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, page)
