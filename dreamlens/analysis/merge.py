"""`merge_scans`: the n parts of a scan (`scan(..., part=(i, n))`, the windows of `parts.py`) merged into the
one pass's result (top examples exactly; sketch counts added).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from .errors import ScanError
from .scan import STAT_QUANTILES, ScanResult
from .sketch import QuantileSketch

# what the parts of one scan share (besides their objectives and `scan_key`), as their `meta` names it
SHARED = ("model", "corpus", "tokens", "window", "top_k", "per_document", "batch_size", "stop_at_layer", "bos_token_id")


def _check(parts: list[ScanResult]) -> tuple[int, list[ScanResult]]:
    """The number of parts and the parts in order, or a `ScanError` naming what does not fit."""
    fix = "scan every part with the same model, objectives, corpus and settings, only part=(i, n) differing"
    first = parts[0]
    which = [tuple(p.meta.get("part", (0, 1))) for p in parts]
    for j, p in enumerate(parts[1:], 1):
        if which[j][1] != which[0][1]:
            raise ScanError(f"cannot merge parts of different splits: scan {j} is part {which[j]}, scan 0 is part "
                            f"{which[0]}; split the scan once, into parts (i, n) for i in range(n)")
        if p.objectives != first.objectives:
            k = next((k for k, (a, b) in enumerate(zip(p.objectives, first.objectives)) if a != b), None)
            what = (f"objective {k} is {p.objectives[k]!r} in scan {j}, {first.objectives[k]!r} in scan 0" if k is not None
                    else f"scan {j} has {len(p.objectives)}, scan 0 has {len(first.objectives)}")
            raise ScanError(f"cannot merge scans of different objectives ({what}); {fix}")
        for key in SHARED:
            if p.meta.get(key) != first.meta.get(key):
                raise ScanError(f"cannot merge scans that differ in {key}: scan {j} has {p.meta.get(key)!r}, scan 0 has "
                                f"{first.meta.get(key)!r}; {fix}")
        if p.meta.get("scan_key") != first.meta.get("scan_key"):
            raise ScanError(f"cannot merge scan {j} with scan 0: their model weights, objective vectors or corpus contents "
                            f"differ (the names agree); {fix}")
    n = int(which[0][1])
    got = sorted(int(i) for i, _ in which)
    if got != list(range(n)):
        missing = sorted(set(range(n)) - set(got))
        raise ScanError(f"merging needs each part (i, {n}) for i in 0..{n - 1} exactly once; got parts {sorted(which)}"
                        f"{f', missing {missing}' if missing else ''}; pass the results of scan(..., part=(i, {n})) for every i")
    return n, [p for _, p in sorted(zip(which, parts), key=lambda t: t[0])]


def merge_scans(parts: Sequence[ScanResult]) -> ScanResult:
    """The scans of parts (i, n), i = 0..n-1, of one scan (`scan(..., part=(i, n))`) merged into the result of
    the one pass: the same top examples (rows, order, ties, per-document caps), the sketch's counts added
    (so the same quantiles, `max`, `min` and `frac_active`), `mean` weighted by tokens (equal within float
    rounding), `meta` with `n_tokens` summed. Examples keep the `activation`/`xe` their parts scored (within
    float rounding of the one pass's); to score them exactly as the one pass, merge unscored parts
    (`score=False`) and call `merged.score(model, objectives)` (if any part is unscored, the merged scan is). Parts
    that do not fit are a `ScanError`."""
    parts = list(parts)
    if not parts:
        raise ScanError("no scans to merge; pass the results of scan(..., part=(i, n)) for i in range(n)")
    n, parts = _check(parts)
    first = parts[0]
    meta = first.meta
    n_obj = len(first.objectives)
    n_pos = sum(int(p.meta.get("n_tokens", 0)) for p in parts)
    if n_pos == 0:
        raise ScanError(
            f"the corpus {meta.get('corpus')!r} gave no window of {meta.get('window')} tokens: it is empty or every "
            f"document is shorter than {meta.get('window')} tokens; use a smaller window or more text"
        )
    if "part" in meta and n_pos < int(meta["tokens"]):
        warnings.warn(f"the corpus ran out after {n_pos} tokens (budget {meta['tokens']})", stacklevel=2)

    sketch = QuantileSketch(n_obj, device=first.sketch.counts.device)
    total = np.zeros(n_obj, dtype=np.float64)
    for p in parts:
        sketch.merge(p.sketch)
        if int(p.meta.get("n_tokens", 0)):
            total += p.stats["mean"].to_numpy(np.float64) * p.stats["n"].to_numpy(np.float64)
    stats = pd.DataFrame({
        "objective": list(first.objectives),
        "max": sketch.hi.cpu().numpy(),
        "mean": total / n_pos,
        "frac_active": sketch.positive() / n_pos,
        **{name: sketch.quantile(q) for name, q in STAT_QUANTILES.items()},
        "min": sketch.lo.cpu().numpy(),
        "n": np.full(n_obj, n_pos, dtype=np.int64),
    })
    return ScanResult(list(first.objectives), stats, _merge_examples(parts), sketch, _merge_meta(parts, n_pos, n))


def _merge_examples(parts: list[ScanResult]) -> pd.DataFrame:
    """The one pass's top examples from the parts' (each a greedy top-k under the per-document cap: a
    matroid basis, so the greedy over their union is the greedy over everything). A window's number in the
    one pass orders like (doc, pos), so ties break as there."""
    frames = [p.examples for p in parts if len(p.examples)]
    ex = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0].copy()
    ex = ex.sort_values(["objective", "scan_activation", "doc", "pos"], ascending=[True, False, True, True], kind="stable")
    k, cap = int(parts[0].meta["top_k"]), int(parts[0].meta["per_document"])
    ex = ex[ex.groupby(["objective", "doc"]).cumcount().to_numpy() < cap]
    rank = ex.groupby("objective").cumcount().to_numpy()
    ex = ex[rank < k].reset_index(drop=True)
    ex["rank"] = rank[rank < k].astype(np.int64)
    if not all(p.scored for p in parts):  # some unscored: none scored, so that `merged.score` scores them all
        ex["activation"] = ex["xe"] = np.nan
    return ex


def _merge_meta(parts: list[ScanResult], n_pos: int, n: int) -> dict[str, Any]:
    meta = {k: v for k, v in parts[0].meta.items() if k not in ("part", "windows", "scan_key")}
    meta.update(
        n_tokens=n_pos,
        n_documents=max(int(p.meta.get("n_documents", 0)) for p in parts),
        seconds=round(sum(float(p.meta.get("seconds", 0.0)) for p in parts), 3),
        parts=n,
    )
    return meta
