"""The scoring package's small public pieces: the Evaluator's History and Compute, the one memo of
banned tokens."""

import numpy as np
import pytest
import torch

import dreamlens as dl
from dreamlens import scoring
from dreamlens.errors import DreamError
from dreamlens.scoring import Compute, History, ScoreCache

OBJ = "blocks.1.mlp.hook_post[3]"


def test_history_keeps_distinct_prompts_and_their_best():
    h = History(length=2)
    assert len(h) == 0 and h.best() is None and h.best_value() == float("-inf")
    ids, vals, xe, it, text = h.arrays()
    assert ids.shape == (0, 2) and len(vals) == len(xe) == len(it) == len(text) == 0
    for row, v in (([1, 2], 0.5), ([3, 4], 2.0), ([5, 6], 2.0)):
        key = ScoreCache.key(row)
        assert key not in h
        h.add(key, torch.tensor(row), v, 1.0, 3, "t")
        assert key in h
    assert len(h) == 3 and h.best() == 1 and h.best_value() == 2.0  # the first of equal values
    ids, vals, xe, it, text = h.arrays()
    np.testing.assert_array_equal(ids, [[1, 2], [3, 4], [5, 6]])
    assert vals.dtype == np.float64 and it.dtype == np.int64 and text == ["t"] * 3


def test_compute_adds_merges_and_restores():
    a, b = Compute(), Compute()
    a.add_forward(2, 10)
    a.add_gradient(1, 9)
    a.add_tokens(5)
    b.add_forward(1, 4)
    b.add_reused(1, 3)
    a.merge(b)
    assert a.counts() == (3, 1, 28) and a.reused_rows == 1 and a.saved_token_forwards == 3
    a.restore(7, 8, 9)
    assert a.counts() == (7, 8, 9)


def test_evaluator_counts_and_records_through_compute_and_history(tiny_model):
    layout = scoring.make_layout(tiny_model, 4)
    ev = scoring.Evaluator(tiny_model, [dl.objective(OBJ)], layout)
    a = torch.tensor([[500, 600, 700, 800], [501, 600, 700, 800]])
    f, _, ok = ev.evaluate(a, torch.zeros(2, dtype=torch.long), 0)
    assert ev.compute.n_forward == 2 and ev.compute.token_forwards == 2 * layout.seq_len
    h = ev.history[0]
    assert len(h) == int(ok.sum()) and h.values == [float(v) for v in f[ok]] and h.iteration == [0] * len(h)


def test_the_layout_carries_its_context_text_to_the_retokenization_check(tiny_model):
    layout = scoring.make_layout(tiny_model, 3, "Note:", " end")
    assert (layout.prefix, layout.suffix) == ("Note:", " end")
    assert layout.with_length(5) == scoring.make_layout(tiny_model, 5, "Note:", " end")
    span = torch.tensor([[500, 600, 700]])
    ok, texts = scoring.retokenizes(tiny_model, span, layout)
    full = tiny_model.tokenizer(layout.prefix + texts[0] + layout.suffix, add_special_tokens=False)["input_ids"]
    assert bool(ok[0]) == (full == list(layout.head[layout.n_bos :]) + span[0].tolist() + list(layout.tail))
    bare = scoring.Layout(layout.head, layout.tail, 3, layout.n_bos)  # the context's ids without its text
    assert not scoring.retokenizes(tiny_model, span, bare)[0].any()


def test_batching_comes_from_a_config_and_a_recorder_sees_every_pass(tiny_model):
    cfg = dl.EPOConfig(batch_size=7, max_batch_tokens=300, reuse_prefix=False)
    assert scoring.Batching.of(cfg) == scoring.Batching(batch_size=7, max_batch_tokens=300, reuse_prefix=False)
    rec = scoring.PassRecorder()
    layout = scoring.make_layout(tiny_model, 4)
    ev = scoring.Evaluator(tiny_model, [dl.objective(OBJ)], layout, recorder=rec)
    parents = torch.tensor([[500, 600, 700, 800], [501, 601, 701, 801]])
    ev.gradients(parents, torch.zeros(2, dtype=torch.long), torch.ones(2))
    assert rec.gradient_rows is not None and torch.equal(rec.gradient_rows.cpu(), parents)
    kids = torch.tensor([[500, 600, 700, 900], [900, 601, 701, 801]])
    ev.score_rows(kids, torch.zeros(2, dtype=torch.long))
    starts = sorted(start for start, _, _ in rec.plan)
    assert sum(len(rows) for _, rows, _ in rec.plan) == 2 and starts[-1] > 0  # one child reuses its parent
    assert ev.sibling(3).recorder is rec


def test_banned_mask_is_memoized_once_on_the_model(tiny_model):
    a = scoring.banned_mask(tiny_model, ascii_only=True)
    a[:] = True  # a fresh copy: changing it changes no later call
    b = scoring.banned_mask(tiny_model, ascii_only=True, extra=[7])
    assert not b.all() and b[7]
    memo = tiny_model.__dict__["_dreamlens_banned"]
    assert all(isinstance(k, tuple) for k in memo)
    with pytest.raises(DreamError, match="outside the vocabulary"):
        scoring.banned_mask(tiny_model, extra=[10**9])
