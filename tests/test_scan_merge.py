"""A scan in parts (`scan(..., part=(i, n))`) merged by `merge_scans` against the one pass: the same top
examples (exactly), sketch, statistics and metadata; parts that do not belong together are refused."""

from __future__ import annotations

import copy
import itertools
import random
import warnings
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from dreamlens.analysis import merge_scans
from dreamlens.analysis.errors import ScanError
from dreamlens.analysis.parts import part_windows
from dreamlens.analysis.scan import STAT_QUANTILES, ScanResult, scan
from dreamlens.analysis.sketch import QuantileSketch
from dreamlens.objectives import Direction, Neuron, objective

WINDOW, BUDGET, TOP_K, PER_DOC, BATCH = 8, 200, 6, 2, 4

_RIVER = ("Rivers carry water from the mountains to the sea. Along the way they cut valleys, feed farms, "
          "and give cities a reason to exist; many of the oldest towns stand on their banks.")
DOCS = [
    "The committee met on Tuesday to discuss the budget for the coming year, and the members agreed "
    "that spending on schools and roads should rise while the army would stay the same size.",
    _RIVER,
    "In 1812 the war began, and the young nation found itself fighting a much larger power at sea "
    "and on land. The President asked Congress for money, ships and soldiers.",
    "short",
    _RIVER,  # the same windows again: ties between documents, broken as the one pass breaks them
    "A violin has four strings tuned in fifths. Players press the strings against the fingerboard "
    "and draw a bow across them; the body of the instrument makes the sound louder and warmer.",
    "Coffee was first grown in Ethiopia and Yemen. Traders carried it across the Red Sea, and by the "
    "seventeenth century coffee houses had opened in London, Paris and Vienna.",
    _RIVER,
    "Bees dance to tell the hive where flowers are: the angle of the dance points toward the food and "
    "its length says how far away it is, and the other bees fly straight there.",
]
SETTINGS: dict[str, Any] = dict(tokens=BUDGET, window=WINDOW, top_k=TOP_K, per_document=PER_DOC, batch_size=BATCH, cache=False, progress=False)


def _objectives(model):
    v = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(1))
    return [
        Neuron("blocks.0.mlp.hook_post", 3),
        Direction("blocks.1.hook_resid_post", v),
        objective("blocks.0.mlp.hook_post[5] - 0.5*blocks.1.hook_resid_post[7]"),
        objective("max(blocks.0.mlp.hook_post[1], blocks.1.hook_resid_post[2]@max)"),
        objective('logit[" the"]'),
    ]


@pytest.fixture(scope="module")
def objs(tiny_model):
    return _objectives(tiny_model)


@pytest.fixture(scope="module")
def one_pass(tiny_model, objs):
    return scan(tiny_model, objs, DOCS, score=False, **SETTINGS)


def _parts(model, objs, n, corpus=DOCS, **kw):
    return [scan(model, objs, corpus, part=(i, n), **{**SETTINGS, "score": False, **kw}) for i in range(n)]


def _assert_same(merged: ScanResult, one: ScanResult, *, scored_exactly: bool = True) -> None:
    assert merged.objectives == one.objectives
    if scored_exactly:
        pd.testing.assert_frame_equal(merged.examples, one.examples, check_exact=True)
    else:
        cols = [c for c in one.examples.columns if c not in ("activation", "xe")]
        pd.testing.assert_frame_equal(merged.examples[cols], one.examples[cols], check_exact=True)
        for c in ("activation", "xe"):
            np.testing.assert_allclose(merged.examples[c], one.examples[c], rtol=1e-5, atol=1e-5)
    assert torch.equal(merged.sketch.counts.cpu(), one.sketch.counts.cpu())
    assert torch.equal(merged.sketch.lo.cpu(), one.sketch.lo.cpu()) and torch.equal(merged.sketch.hi.cpu(), one.sketch.hi.cpu())
    exact = ["objective", "max", "frac_active", *STAT_QUANTILES, "min", "n"]
    pd.testing.assert_frame_equal(merged.stats[exact], one.stats[exact], check_exact=True)  # from the same counts
    assert list(merged.stats.columns) == list(one.stats.columns)
    np.testing.assert_allclose(merged.stats["mean"], one.stats["mean"], rtol=1e-12, atol=1e-12)
    for key in ("model", "corpus", "tokens", "n_tokens", "n_documents", "window", "top_k", "per_document", "stop_at_layer",
                "bos_token_id"):
        assert merged.meta[key] == one.meta[key], key


@pytest.mark.parametrize("n", [1, 2, 3])
def test_merged_parts_equal_the_one_pass(tiny_model, objs, one_pass, n):
    parts = _parts(tiny_model, objs, n)
    assert sum(p.meta["n_tokens"] for p in parts) == one_pass.meta["n_tokens"]
    assert all(p.meta["n_tokens"] > 0 for p in parts)
    random.Random(n).shuffle(parts)  # any order
    merged = merge_scans(parts)
    assert merged.meta["parts"] == n and not merged.scored
    _assert_same(merged, one_pass)
    # scored after merging: bitwise the one pass's scoring
    merged.score(tiny_model, objs)
    one = scan(tiny_model, objs, DOCS, **{**SETTINGS, "score": True})
    _assert_same(merged, one)


def test_the_top_examples_have_ties_across_parts(one_pass):
    """The repeated document makes equal candidates in different documents (and parts): the test above checks
    their order; here, that the case occurs."""
    ex = one_pass.examples
    dup = ex.groupby(["objective", "scan_activation"])["doc"].nunique()
    assert (dup > 1).any()


def test_scored_parts_merge_within_rounding(tiny_model, objs):
    one = scan(tiny_model, objs, DOCS, **{**SETTINGS, "score": True})
    parts = _parts(tiny_model, objs, 3, score=True)
    merged = merge_scans(parts)
    assert merged.scored
    _assert_same(merged, one, scored_exactly=False)
    mixed = merge_scans([*parts[:2], scan(tiny_model, objs, DOCS, part=(2, 3), **{**SETTINGS, "score": False})])
    assert not mixed.scored and mixed.examples["activation"].isna().all()  # scored as a whole or not at all


def test_empty_parts_and_a_corpus_that_runs_out(tiny_model, objs):
    big = 10_000  # more than the corpus has: the one pass warns, so does the merge; late parts are empty
    with pytest.warns(UserWarning, match="ran out"):
        one = scan(tiny_model, objs, DOCS, **{**SETTINGS, "tokens": big, "score": False})
    n = 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a part warns of nothing
        parts = _parts(tiny_model, objs, n, tokens=big)
    assert any(p.meta["n_tokens"] == 0 for p in parts)
    empty = next(p for p in parts if p.meta["n_tokens"] == 0)
    assert len(empty.examples) == 0 and empty.stats["mean"].isna().all()
    with pytest.warns(UserWarning, match="ran out"):
        merged = merge_scans(parts)
    _assert_same(merged, one)
    # more parts than batches: some are empty, the merge is the same
    n_windows = -(-BUDGET // WINDOW)
    n_batches = -(-n_windows // BATCH)
    many = _parts(tiny_model, objs, n_batches + 2)
    assert sum(p.meta["n_tokens"] == 0 for p in many) == 2
    _assert_same(merge_scans(many), scan(tiny_model, objs, DOCS, **{**SETTINGS, "score": False}))


def test_part_windows_cover_the_one_pass_in_whole_batches():
    for tokens, window, batch, n in [(200, 8, 4, 3), (1000, 7, 5, 4), (9, 8, 64, 3), (64, 8, 2, 4)]:
        ranges = [part_windows((i, n), tokens=tokens, window=window, batch_size=batch) for i in range(n)]
        n_windows = -(-tokens // window)
        assert ranges[0][0] == 0 and ranges[-1][1] == n_windows
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
        assert all(lo % batch == 0 and lo <= hi for lo, hi in ranges)
    assert part_windows((1, 2), tokens=200, window=8, batch_size=4) == (12, 25)  # 7 batches: 3 + 4


def test_a_merged_scan_saves_and_loads(tiny_model, objs, one_pass, tmp_path):
    merged = merge_scans(_parts(tiny_model, objs, 2))
    back = ScanResult.load(merged.save(tmp_path / "merged"))
    _assert_same(back, one_pass)


def test_parts_are_cached_apart_from_the_one_pass(tiny_model, objs, one_pass, tmp_path):
    settings = {**SETTINGS, "cache": tmp_path, "score": False}
    one = scan(tiny_model, objs, DOCS, **settings)
    parts = [scan(tiny_model, objs, DOCS, part=(i, 2), **settings) for i in range(2)]
    assert len(list(tmp_path.iterdir())) == 3  # the one pass and each part: three keys
    again = [scan(tiny_model, objs, DOCS, part=(i, 2), **settings) for i in range(2)]
    assert all(p.from_cache for p in again) and scan(tiny_model, objs, DOCS, **settings).from_cache
    assert [p.meta["windows"] for p in again] == [p.meta["windows"] for p in parts]
    _assert_same(merge_scans(again), one)
    _assert_same(merge_scans(again), one_pass)


def test_a_single_whole_scan_merges_to_itself(one_pass):
    merged = merge_scans([one_pass])
    _assert_same(merged, one_pass)


def test_parts_that_do_not_belong_together_are_refused(tiny_model, objs):
    parts = _parts(tiny_model, objs, 2)
    with pytest.raises(ScanError, match="different objectives"):
        merge_scans([parts[0], _parts(tiny_model, objs[:2], 2)[1]])
    with pytest.raises(ScanError, match="differ in window"):
        merge_scans([parts[0], _parts(tiny_model, objs, 2, window=6)[1]])
    with pytest.raises(ScanError, match="differ in top_k"):
        merge_scans([parts[0], _parts(tiny_model, objs, 2, top_k=3)[1]])
    with pytest.raises(ScanError, match="corpus contents"):  # both "custom" lists of texts: told apart by the key
        merge_scans([parts[0], _parts(tiny_model, objs, 2, corpus=DOCS[::-1])[1]])
    other = copy.deepcopy(tiny_model)  # the same name, other weights
    with torch.no_grad():
        other.blocks[0].mlp.W_in.add_(0.1)
    with pytest.raises(ScanError, match="model weights"):
        merge_scans([parts[0], _parts(other, objs, 2)[1]])
    with pytest.raises(ScanError, match="different splits"):
        merge_scans([parts[0], _parts(tiny_model, objs, 3)[1]])
    with pytest.raises(ScanError, match=r"missing \[1\]"):
        merge_scans([parts[0]])
    with pytest.raises(ScanError, match="exactly once"):
        merge_scans([parts[0], parts[0]])
    with pytest.raises(ScanError, match="no scans"):
        merge_scans([])
    with pytest.raises(ScanError, match="cannot merge a sketch"):  # a sketch that is not these objectives'
        bad = copy.copy(parts[1])
        bad.sketch = QuantileSketch(1)
        merge_scans([parts[0], bad])


@pytest.mark.parametrize("part", [(2, 2), (0, 0), (-1, 2), (0.5, 2), (True, 2), "0/2", (0, 1, 2)])
def test_a_bad_part_is_refused(tiny_model, objs, part: Any):
    with pytest.raises(ScanError, match=r"part must be \(i, n\)"):
        scan(tiny_model, objs, DOCS, part=part, **SETTINGS)


def test_a_generator_corpus_cannot_be_scanned_in_parts(tiny_model, objs):
    with pytest.raises(ScanError, match="readable again"):
        scan(tiny_model, objs, (d for d in DOCS), part=(0, 2), **SETTINGS)
