"""A dream's length range (`min_length` / `max_length`, ADAPT): insertions and deletions change the length
within the range; every prompt re-tokenizes to its ids in context and is scored exactly as it would be
alone; results of several lengths resume, save and load; a fixed length is what it always was."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import run_cli

import dreamlens as dl
from dreamlens import scoring
from dreamlens.errors import DreamError
from dreamlens.optim.methods import make_config
from dreamlens.optim.moves import resizes
from dreamlens.results import DreamResult, stack_ids

pytestmark = pytest.mark.usefixtures("one_thread")

OBJ = "blocks.1.mlp.hook_post[3]"
RANGE = dict(length=6, min_length=4, max_length=8, beams=3, beam_lm=2, beam_grad=2, children=8, iters=8, patience=1,
             seed=1, shift_share=0.5)


def run(model, **kw):
    return dl.dream(model, OBJ, progress=False, **{**RANGE, **kw})


@pytest.fixture(scope="module")
def result(tiny_model):
    return run(tiny_model)


@pytest.fixture(scope="module")
def with_context(tiny_model):
    return run(tiny_model, prefix="The answer is", suffix=" indeed", seed=2)


def lengths(r: DreamResult) -> list[int]:
    return [len(ids) for ids in r.ids]


def test_a_range_gives_prompts_of_several_lengths_within_it(result, with_context):
    for r in (result, with_context):
        seen = set(lengths(r))
        assert len(seen) > 1 and min(seen) >= 4 and max(seen) <= 8, seen
        assert r.ids.dtype == object and len(r.ids) == len(r.text) == len(r.activation)
        assert np.isfinite(r.activation).all() and np.isfinite(r.xe).all()
        assert len({tuple(ids) for ids in r.ids}) == len(r)  # each prompt scored once
        members = r.state["population"]
        assert all(4 <= len(m) <= 8 for m in members)


@pytest.mark.parametrize("which", ["result", "with_context"])
def test_every_prompt_retokenizes_to_its_ids_in_context(tiny_model, request, which):
    r = request.getfixturevalue(which)
    layout = scoring.make_layout(tiny_model, r.config["length"], r.prefix, r.suffix)
    for ids, text in zip(r.ids, r.text):
        span = torch.as_tensor(np.asarray(ids, dtype=np.int64))[None]
        ok, texts = scoring.retokenizes(tiny_model, span, layout.with_length(len(ids)))
        assert bool(ok[0]) and texts[0] == text


@pytest.mark.parametrize("which", ["result", "with_context"])
def test_scores_equal_a_direct_single_prompt_rescore(tiny_model, request, which):
    r = request.getfixturevalue(which)
    obj = dl.objective(OBJ)
    by_length: dict[int, list[int]] = {}
    for i, n in enumerate(lengths(r)):
        by_length.setdefault(n, []).append(i)
    assert len(by_length) > 1
    for n, rows in by_length.items():
        layout = scoring.make_layout(tiny_model, n, r.prefix, r.suffix)
        for i in rows[:6]:  # each alone: no batch, no padding, no reuse
            span = torch.as_tensor(np.asarray(r.ids[i], dtype=np.int64))[None]
            vals, xe = scoring.score(tiny_model, [obj], span, layout)
            assert float(vals[0, 0]) == pytest.approx(r.activation[i], abs=1e-5), (n, i)
            assert float(xe[0]) == pytest.approx(r.xe[i], abs=1e-5), (n, i)


def test_xe_is_the_mean_per_token(tiny_model, result):
    """xe of a prompt is the mean of its tokens' cross-entropies, whatever its length: prompts of different
    lengths share one frontier (the short and the long ones both on it when they are not dominated)."""
    i = int(np.argmax([len(ids) != RANGE["length"] for ids in result.ids]))
    ids = list(map(int, result.ids[i]))
    layout = scoring.make_layout(tiny_model, len(ids))
    assert layout.head and not layout.tail  # the start token
    tokens = layout.assemble(torch.tensor([ids]))
    with torch.no_grad():
        logp = torch.log_softmax(tiny_model(tokens)[0, :-1].double(), dim=-1)
    ce = -logp[torch.arange(len(ids)), tokens[0, 1:]]
    assert float(ce.mean()) == pytest.approx(result.xe[i], abs=1e-4)
    assert len(result.frontier) >= 1


def test_resume_continues_identically(tiny_model, result, tmp_path):
    run(tiny_model, iters=3).save(tmp_path / "half")
    cont = dl.dream(tiny_model, OBJ, progress=False, resume=tmp_path / "half", **RANGE)
    assert cont.iterations == RANGE["iters"]
    pd.testing.assert_frame_equal(cont.history, result.history, check_exact=True)
    pd.testing.assert_frame_equal(cont.frontier, result.frontier, check_exact=True)
    assert cont.state["population"] == result.state["population"]


def test_save_load_round_trip(result, tmp_path):
    back = DreamResult.load(result.save(tmp_path / "r"))
    pd.testing.assert_frame_equal(back.history, result.history, check_exact=True)
    pd.testing.assert_frame_equal(back.frontier, result.frontier, check_exact=True)
    assert back.ids.dtype == object and [list(a) for a in back.ids] == [list(a) for a in result.ids]
    assert back.config["min_length"] == 4 and back.config["max_length"] == 8


def test_stack_ids_keeps_one_length_a_matrix():
    assert stack_ids([[1, 2], [3, 4]]).shape == (2, 2)
    assert stack_ids([], 5).shape == (0, 5)
    ragged = stack_ids([[1, 2], [3]])
    assert ragged.dtype == object and [list(r) for r in ragged] == [[1, 2], [3]]


def test_a_fixed_length_is_unchanged(tiny_model):
    """min_length = max_length = length is the fixed-length dream, bit for bit."""
    fixed = dict(length=5, beams=2, beam_lm=2, beam_grad=2, children=8, iters=4, seed=3)
    a = dl.dream(tiny_model, OBJ, progress=False, **fixed)
    b = dl.dream(tiny_model, OBJ, progress=False, min_length=5, max_length=5, **fixed)
    pd.testing.assert_frame_equal(a.history, b.history, check_exact=True)
    assert a.ids.dtype == np.int64 and a.ids.shape[1] == 5


def test_resizes_change_the_length_by_one_within_the_range():
    gen = torch.Generator().manual_seed(0)
    parents = torch.arange(20).view(2, 10)
    logp = torch.zeros((2, 10, 50))
    banned = torch.zeros(50, dtype=torch.bool)
    banned[:40] = True  # inserted tokens come from the allowed ones (40..49)
    kids = resizes(parents, logp, banned, 16, gen, (8, 12))
    assert len(kids) == 32 and {len(k) for k in kids} == {9, 11}
    for j, k in enumerate(kids):
        p = parents[j // 16].tolist()
        if len(k) == 9:  # one token dropped
            assert any(p[:i] + p[i + 1 :] == k.tolist() for i in range(10))
        else:  # one allowed token inserted
            new = [t for t in k.tolist() if t not in p]
            assert len(new) == 1 and 40 <= new[0] < 50
            i = k.tolist().index(new[0])
            assert k.tolist()[:i] + k.tolist()[i + 1 :] == p
    assert {len(k) for k in resizes(parents, logp, banned, 8, gen, (10, 12))} == {11}  # at the shortest: insertions
    assert {len(k) for k in resizes(parents, logp, banned, 8, gen, (8, 10))} == {9}  # at the longest: deletions
    assert resizes(parents, logp, banned, 8, gen, (10, 10)) == []


def test_length_evaluators_group_by_length_and_charge_each_token(tiny_model):
    layout = scoring.make_layout(tiny_model, 4)
    base = scoring.Evaluator(tiny_model, [dl.objective(OBJ)], layout, scoring.Batching(reuse_prefix=False))
    evs = scoring.LengthEvaluators(base)
    gen = torch.Generator().manual_seed(0)
    allowed = torch.nonzero(~scoring.banned_mask(tiny_model)).flatten()
    rows = [allowed[torch.randint(len(allowed), (n,), generator=gen)] for n in (4, 6, 4, 6, 5)]
    f, xe, ok = evs.evaluate(rows, torch.zeros(5, dtype=torch.long), 0)
    head = len(layout.head)
    assert base.compute.token_forwards == sum(head + len(r) for r, good in zip(rows, ok.tolist()) if good)
    assert len(base.history[0]) == int(ok.sum()) and set(evs.by_length) == {4, 5, 6}
    for r, fi, xi, good in zip(rows, f, xe, ok):
        if good:
            v, x = scoring.score(tiny_model, [dl.objective(OBJ)], r[None], layout.with_length(len(r)))
            assert float(v[0, 0]) == pytest.approx(float(fi), abs=1e-5) and float(x[0]) == pytest.approx(float(xi), abs=1e-5)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (dict(length=6, min_length=7), r"min_length \(7\) must be <= length \(6\)"),
        (dict(length=6, max_length=5), r"max_length \(5\) must be >= length \(6\)"),
        (dict(length=6, min_length=0), "min_length must be None .* or at least 1"),
        (dict(length=6, max_length=2.5), "max_length must be None .* or at least 1"),
    ],
)
def test_bad_ranges_are_refused(options, match):
    with pytest.raises(DreamError, match=match):
        dl.ADAPTConfig(**options).validate()


@pytest.mark.parametrize("method", ["epo", "gcg"])
def test_epo_and_gcg_refuse_a_range_naming_adapt(tiny_model, method):
    with pytest.raises(DreamError, match="method='adapt'"):
        dl.dream(tiny_model, OBJ, method, length=5, max_length=7, iters=1, progress=False)
    make_config(method, length=5, min_length=5, max_length=5).validate()  # no range: fine


def test_a_range_beyond_the_context_is_refused(tiny_model):
    with pytest.raises(DreamError, match="max_length=80"):
        dl.dream(tiny_model, OBJ, length=6, max_length=80, iters=1, progress=False)


def test_cli_dreams_a_range_and_reports_it(tmp_path, capsys, tiny_cli):
    out = tmp_path / "dream"
    rc, text, err = run_cli(capsys, "dream", OBJ, "--length", "5", "--min-length", "4", "--max-length", "7", "--iters", "4",
                            "--children", "8", "--seed", "1", "--out", out)
    assert rc == 0, err
    assert "frontier" in text.lower()
    r = DreamResult.load(out)
    assert r.config["min_length"] == 4 and r.config["max_length"] == 7 and len(set(lengths(r))) > 1
    rc, _, err = run_cli(capsys, "report", out, "--out", tmp_path / "page.html", "--attributions", "2")
    assert rc == 0, err
    assert (tmp_path / "page.html").read_text().count("<html") == 1
