"""Dreams compared with a scan's max-activating dataset examples on the same axes (activation against
cross-entropy): `compare` gives a `Comparison` with its table, summary metrics and the paper's figure.
"""

from __future__ import annotations

import io
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from ..io import atomic_write, atomic_write_text
from . import metrics
from .errors import CompareError, ScanError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .scan import ScanResult


@dataclass
class Comparison:
    """Dreams and top dataset examples of one objective on the same axes: `table` (one row per dream
    frontier point and per dataset example, with the dataset-grounded metrics), `summary` and `figure`."""

    table: pd.DataFrame
    summary: dict[str, Any]
    figure: Figure

    def save(self, folder: str | os.PathLike, name: str = "comparison") -> Path:
        """Write `{name}.png`, `{name}.csv` and `{name}.json` (the summary) into `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / f"{name}.png", self._repr_png_())
        atomic_write_text(folder / f"{name}.csv", self.table.drop(columns=["ids"], errors="ignore").to_csv(index=False))
        atomic_write_text(folder / f"{name}.json", json.dumps(self.summary, indent=1, default=float))
        return folder / f"{name}.png"

    def _repr_png_(self) -> bytes:
        buf = io.BytesIO()
        self.figure.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        return buf.getvalue()


def _dream_parts(dream: Any) -> tuple[str, pd.DataFrame]:
    frontier = getattr(dream, "frontier", None)
    name = getattr(dream, "objective", None)
    if not isinstance(frontier, pd.DataFrame) or name is None:
        raise CompareError(
            f"compare needs a dream result with `.frontier` (a DataFrame: text, ids, activation, xe) and "
            f"`.objective`, got {type(dream).__name__}"
        )
    missing = {"activation", "xe"} - set(frontier.columns)
    if missing:
        raise ScanError(f"the dream's frontier lacks the column(s) {sorted(missing)}; it has {list(frontier.columns)}")
    return str(name), frontier


def compare(dream_result: Any, scan_result: ScanResult, objective_index: int | None = None) -> Comparison:
    """Dreams vs max-activating dataset examples: activation against cross-entropy (the paper's figure).

    `objective_index` picks the scan's objective; by default the one whose string form is the dream's
    objective (or the only one). Both sets are scored the same way: the objective at the last token
    and the mean next-token cross-entropy given the start token."""
    name, frontier = _dream_parts(dream_result)
    if objective_index is None:
        if name in scan_result.objectives:
            objective_index = scan_result.objectives.index(name)
        elif len(scan_result.objectives) == 1:
            objective_index = 0
        else:
            raise ScanError(
                f"the dream's objective {name!r} is not among the scan's {scan_result.objectives}; "
                "pass objective_index= to choose one"
            )
    i = scan_result.index(objective_index)
    if scan_result.objectives[i] != name:
        warnings.warn(f"comparing the dream of {name!r} with the scan of {scan_result.objectives[i]!r}", stacklevel=2)
    top = scan_result.top(i)
    if len(top) and top["xe"].isna().all():
        raise ScanError("the scan's examples were never scored; run scan(..., score=True) or scan_result.score(model)")

    d = frontier.copy()
    d.insert(0, "source", "dream")
    t = top.copy()
    t.insert(0, "source", "dataset")
    cols = ["source", "text", "ids", "activation", "xe"]
    table = pd.concat([d.reindex(columns=cols), t.reindex(columns=cols)], ignore_index=True)
    act = table["activation"].to_numpy(dtype=float)
    table["ratio"] = metrics.activation_ratio(act, scan_result, i)
    table["percentile"] = metrics.dataset_percentile(act, scan_result, i)
    table["beats_dataset"] = metrics.beats_dataset(act, table["xe"].to_numpy(dtype=float), scan_result, i)
    summary = metrics.dream_summary(dream_result, scan_result, i)
    fig = _figure(table, scan_result, i, summary)
    return Comparison(table, summary, fig)


def _figure(table: pd.DataFrame, scan_result: ScanResult, i: int, summary: dict[str, Any]) -> Figure:
    from matplotlib.figure import Figure  # lazy: matplotlib loads only when a comparison is drawn

    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    ds = table[table["source"] == "dataset"]
    dr = table[table["source"] == "dream"].sort_values("xe")
    ax.scatter(ds["xe"], ds["activation"], s=22, c="tab:blue", alpha=0.7, label=f"top {len(ds)} dataset examples")
    ax.plot(dr["xe"], dr["activation"], "-o", c="tab:orange", ms=4, lw=1.5, label="dreams (frontier)")
    ax.axhline(summary["dataset_max"], ls="--", c="gray", lw=1, label=f"dataset max ({summary['dataset_max']:.3g})")
    if not math.isnan(summary["median_top_xe"]):
        ax.axvline(summary["median_top_xe"], ls=":", c="gray", lw=1, label="median xe of top examples")
    ax.set_xlabel("cross-entropy of the prompt (nats/token)")
    ax.set_ylabel("activation")
    n_tok = scan_result.meta.get("n_tokens")
    ax.set_title(f"{scan_result.objectives[i]}" + (f"  ({n_tok:,} dataset tokens)" if n_tok else ""), fontsize=9)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
