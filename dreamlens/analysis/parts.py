"""A scan in parts: which windows `scan(..., part=(i, n))` reads (whole batches of the one pass's), and what
the parts share (`scan_key`), so that `merge.merge_scans` can merge them into the one pass's result.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ScanError
from .scan_cache import cache_key, corpus_fingerprint

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from ..objectives import Objective


def check_part(part: Any) -> tuple[int, int]:
    """`part` as (i, n), or a `ScanError` saying what a part is."""
    ok = isinstance(part, (tuple, list)) and len(part) == 2
    ok = ok and all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in part)
    if not ok or not 0 <= part[0] < part[1]:
        raise ScanError(f"part must be (i, n) with 0 <= i < n, got {part!r}; e.g. part=(0, 4) scans the first of 4 parts")
    return int(part[0]), int(part[1])


def part_windows(part: tuple[int, int], *, tokens: int, window: int, batch_size: int) -> tuple[int, int]:
    """The windows [lo, hi) (numbered in the order the one pass reads them) that part i of n scans: the
    one pass's batches split into n contiguous runs as even as can be, so each part feeds the model the
    very batches the one pass does (bitwise the same values). Parts past the end of the corpus are empty,
    and so is any part beyond the number of batches."""
    i, n = check_part(part)
    n_windows = -(-tokens // window)
    n_batches = -(-n_windows // batch_size)
    return min(i * n_batches // n * batch_size, n_windows), min((i + 1) * n_batches // n * batch_size, n_windows)


def part_settings(
    model: HookedTransformer, objectives: Sequence[Objective], corpus: Any, part: Any, **params: Any
) -> dict[str, Any]:
    """What `scan(..., part=(i, n))` adds to its cache key and `meta`: `part`, its `windows`, the
    `batch_size` (batches are the unit of splitting) and `scan_key`, a hash of everything the n parts share
    (model weights, corpus, objectives, settings), which `merge_scans` checks."""
    i, n = check_part(part)
    corpus_key = corpus_fingerprint(corpus)
    if corpus_key is None:
        raise ScanError(
            "a scan in parts reads its corpus once per part, so the corpus must be readable again: None, a corpus "
            "name, a path or a list of texts, not an iterator or generator; pass list(texts)"
        )
    windows = part_windows((i, n), tokens=params["tokens"], window=params["window"], batch_size=params["batch_size"])
    return {"part": [i, n], "windows": list(windows), "batch_size": params["batch_size"],
            "scan_key": cache_key(model, objectives, corpus_key, parts=n, **params)}
