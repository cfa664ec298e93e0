"""Speed machinery: prefix reuse equals the full pass, deduplication keeps every distinct prompt,
many objectives in one run equal separate runs, and small memory budgets (or out-of-memory errors)
only make batches smaller."""

import warnings

import numpy as np
import pytest
import torch

import dreamlens as dl
from dreamlens import scoring
from dreamlens.errors import DreamError

OBJ = "blocks.1.mlp.hook_post[3]"
SMALL = dict(length=6, population=4, children=8, topk=64, iters=5, restart_every=3, seed=0)
OBJECTIVES = [
    OBJ,  # last position
    "blocks.0.mlp.hook_post[5]@max",
    "blocks.1.hook_resid_post[2]@mean",
    "blocks.1.mlp.hook_post[7]@0",  # a fixed early position: read from the parent
    "blocks.0.attn.hook_z[1,3]@-2",
    'logit[" the"]',
    "blocks.1.mlp.hook_post[3] - 0.5*blocks.0.mlp.hook_post[9]@mean",
]


def family(n_parents, length, n_children, seed=0, vocab=(300, 30000)):
    """Parents, and children that each differ from one parent at one or more positions."""
    g = torch.Generator().manual_seed(seed)
    parents = torch.randint(*vocab, (n_parents, length), generator=g)
    kids = parents.repeat_interleave(n_children, 0).clone()
    n = kids.shape[0]
    pos = torch.randint(length, (n,), generator=g)
    kids[torch.arange(n), pos] = torch.randint(*vocab, (n,), generator=g)
    far = torch.arange(0, n, 5)  # some change a second, later position too
    kids[far, (pos[far] + 2).clamp(max=length - 1)] = torch.randint(*vocab, (len(far),), generator=g)
    return parents, kids


def layouts(model):
    return {
        "bos": scoring.make_layout(model, 8),
        "context": scoring.make_layout(model, 8, "Once upon a time", " and then"),
        "no-start-token": scoring.Layout(head=(), tail=(), length=8, n_bos=0),
    }


@pytest.mark.parametrize("where", ["bos", "context", "no-start-token"])
@pytest.mark.parametrize("via", ["gradients", "remember"])
def test_reuse_equals_full_pass_tiny(tiny_model, where, via):
    layout = layouts(tiny_model)[where]
    objs = [dl.objective(o) for o in OBJECTIVES]
    parents, kids = family(4, 8, 24)
    ev = scoring.Evaluator(tiny_model, objs, layout)
    assert ev.reuse, ev.reuse_obstacle
    if via == "gradients":
        ev.gradients(parents, torch.arange(4) % len(objs), torch.linspace(0.1, 10, 4))
    else:
        ev.remember(parents)
    vals, xe = ev.score_rows(kids)
    ref_v, ref_x = scoring.score(tiny_model, objs, kids, layout)
    np.testing.assert_allclose(vals.numpy(), ref_v.double().numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(xe.numpy(), ref_x.double().numpy(), atol=1e-4, rtol=1e-4)
    # reuse really happened, and saved work (without a start token, a new first token needs the full pass)
    assert ev.compute.saved_token_forwards > 0
    expected_full = int((kids[:, 0] != parents.repeat_interleave(24, 0)[:, 0]).sum()) if where == "no-start-token" else 0
    assert ev.compute.reused_rows == len(kids) - expected_full


@pytest.mark.integration
def test_reuse_equals_full_pass_embedded(embedded_model):
    model = embedded_model
    layout = scoring.make_layout(model, 10, "", " The end.")
    objs = [dl.objective(o) for o in ("blocks.5.mlp.hook_post[100]", "blocks.3.hook_resid_post[7]@max", 'logit[" the"]')]
    parents, kids = family(3, 10, 8, seed=1, vocab=(300, 20000))
    with scoring.fast_weights(model):
        ev = scoring.Evaluator(model, objs, layout)
        ev.gradients(parents, torch.zeros(3, dtype=torch.long), torch.ones(3))
        vals, xe = ev.score_rows(kids)
    ref_v, ref_x = scoring.score(model, objs, kids, layout)
    assert ev.compute.reused_rows == len(kids)
    np.testing.assert_allclose(vals.numpy(), ref_v.double().numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(xe.numpy(), ref_x.double().numpy(), atol=1e-4, rtol=1e-4)


def test_reuse_falls_back_where_it_cannot_apply(tiny_model):
    layout = scoring.make_layout(tiny_model, 6)
    obj = dl.objective("blocks.1.attn.hook_pattern[0,-1,2]")  # [batch, head, query, key]: no position axis
    ev = scoring.Evaluator(tiny_model, [obj], layout)
    assert not ev.reuse and "position axis" in ev.reuse_obstacle
    parents, kids = family(2, 6, 6)
    ev.gradients(parents, torch.zeros(2, dtype=torch.long), torch.ones(2))
    vals, _xe = ev.score_rows(kids)
    ref_v, _ref_x = scoring.score(tiny_model, [obj], kids, layout)
    assert ev.compute.reused_rows == 0
    np.testing.assert_allclose(vals.numpy(), ref_v.double().numpy(), atol=1e-6)


def test_reuse_that_disagrees_is_switched_off(tiny_model, monkeypatch):
    layout = scoring.make_layout(tiny_model, 6)
    objs = [dl.objective(OBJ)]
    real = scoring.forward_from
    monkeypatch.setattr(scoring.evaluator, "forward_from", lambda *a, **k: tuple(t + 1.0 for t in real(*a, **k)))
    ev = scoring.Evaluator(tiny_model, objs, layout)
    parents, kids = family(2, 6, 6)
    ev.gradients(parents, torch.zeros(2, dtype=torch.long), torch.ones(2))
    with pytest.warns(UserWarning, match="prefix reuse is off"):
        vals, xe = ev.score_rows(kids)
    assert not ev.reuse
    ref_v, ref_x = scoring.score(tiny_model, objs, kids, layout)
    np.testing.assert_allclose(vals.numpy(), ref_v.double().numpy(), atol=1e-6)
    np.testing.assert_allclose(xe.numpy(), ref_x.double().numpy(), atol=1e-6)


def test_dedup_never_drops_a_distinct_prompt_with_reuse(tiny_model):
    layout = scoring.make_layout(tiny_model, 6)
    objs = [dl.objective(OBJ), dl.objective("blocks.0.mlp.hook_post[5]@max")]
    parents, kids = family(3, 6, 10)
    ev = scoring.Evaluator(tiny_model, objs, layout, scoring.Batching(cache_size=5))  # a tiny cache: evictions on the way
    _, _, ok0 = ev.evaluate(parents, torch.tensor([0, 1, 0]), 0)
    ev.gradients(parents, torch.tensor([0, 1, 0]), torch.ones(3))
    # duplicates inside the batch, prompts equal to their parents, prompts differing at the last token only
    last = parents.clone()
    last[:, -1] += 1
    batch = torch.cat([kids, kids[:7], parents, last])
    owner = torch.arange(len(batch)) % 2
    f, x, ok = ev.evaluate(batch, owner, 1)
    ref_v, ref_x = scoring.score(tiny_model, objs, batch, layout)
    np.testing.assert_allclose(f[ok].numpy(), ref_v[owner, torch.arange(len(batch))][ok].double().numpy(), atol=1e-4)
    np.testing.assert_allclose(x[ok].numpy(), ref_x[ok].double().numpy(), atol=1e-4)
    for k in range(2):  # each owner's history holds every distinct valid prompt it proposed, once
        want = {tuple(r) for r, o, v in zip(batch.tolist(), owner.tolist(), ok.tolist()) if o == k and v}
        want |= {tuple(r) for r, o, v in zip(parents.tolist(), [0, 1, 0], ok0.tolist()) if o == k and v}
        ids, *_ = ev.history[k].arrays()
        got = [tuple(r) for r in ids.tolist()]
        assert len(got) == len(set(got)) and set(got) == want


def test_gradient_rows_are_deduplicated_exactly(tiny_model):
    layout = scoring.make_layout(tiny_model, 6)
    objs = [dl.objective(OBJ), dl.objective("blocks.0.mlp.hook_post[5]")]
    ids = torch.randint(300, 3000, (3, 6), generator=torch.Generator().manual_seed(2))
    pop = ids[[0, 0, 0, 0, 1, 1, 2, 0]]  # a restarted population and repeats
    owner = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1])
    lam = torch.logspace(-1, 1, 8, dtype=torch.float64)
    ev = scoring.Evaluator(tiny_model, objs, layout)
    g = ev.gradients(pop, owner, lam)
    ref = scoring.token_gradients(tiny_model, objs, pop, layout, lam, owner=owner)[0]
    assert ev.compute.n_gradient == 6  # (ids0, owner 0) x4 -> 2 rows; the other four rows are distinct
    torch.testing.assert_close(g, ref, atol=1e-4, rtol=1e-4)


def test_many_objectives_in_one_run_equal_separate_runs(tiny_model):
    objs = [OBJ, "blocks.0.mlp.hook_post[5]@max", "blocks.1.hook_resid_post[2]"]
    cfg = dl.EPOConfig(**SMALL)
    together = dl.dream(tiny_model, objs, "epo", config=cfg, progress=False)
    assert len(together) == len(objs)
    for o, r in zip(objs, together):
        alone = dl.dream(tiny_model, o, "epo", config=cfg, progress=False)
        assert r.objective == alone.objective
        np.testing.assert_array_equal(r.ids, alone.ids)  # the same prompts, in the same order
        np.testing.assert_allclose(r.activation, alone.activation, atol=1e-5)
        np.testing.assert_allclose(r.xe, alone.xe, atol=1e-5)
        assert r.state["population"] == alone.state["population"]


def test_reuse_and_full_runs_select_the_same(tiny_model):
    a = dl.epo(tiny_model, OBJ, dl.EPOConfig(**SMALL), progress=False)
    b = dl.epo(tiny_model, OBJ, dl.EPOConfig(**SMALL, reuse_prefix=False), progress=False)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_allclose(a.activation, b.activation, atol=1e-5)
    assert a.token_forwards < b.token_forwards


def test_tiny_memory_budget_still_completes(tiny_model):
    # Passes of one prompt each. (The trajectory may differ from a default run's: one-prompt matrix
    # products round differently in the last bit, and the top-k order of near-equal gradients with it.)
    small = dl.epo(tiny_model, OBJ, dl.EPOConfig(**SMALL, max_batch_tokens=3), progress=False)
    assert small.stopped == "completed" and small.iterations == SMALL["iters"]
    layout = scoring.make_layout(tiny_model, SMALL["length"])
    vals, xe = scoring.score(tiny_model, [dl.objective(OBJ)], torch.as_tensor(small.ids), layout)
    np.testing.assert_allclose(small.activation, vals[0].numpy(), atol=1e-4)
    np.testing.assert_allclose(small.xe, xe.numpy(), atol=1e-4)
    ev = scoring.Evaluator(tiny_model, [dl.objective(OBJ)], layout, scoring.Batching(max_batch_tokens=3))
    assert ev.batcher.rows(7) == 1 and ev.grad_batcher.rows(7) == 1  # one prompt per pass
    parents, kids = family(2, 6, 10)
    ev.gradients(parents, torch.zeros(2, dtype=torch.long), torch.ones(2))
    v1, x1 = ev.score_rows(kids)
    big = scoring.Evaluator(tiny_model, [dl.objective(OBJ)], layout)
    big.gradients(parents, torch.zeros(2, dtype=torch.long), torch.ones(2))
    v2, x2 = big.score_rows(kids)
    np.testing.assert_allclose(v1.numpy(), v2.numpy(), atol=1e-5)
    np.testing.assert_allclose(x1.numpy(), x2.numpy(), atol=1e-5)


def test_out_of_memory_halves_the_batch_and_goes_on(tiny_model):
    layout = scoring.make_layout(tiny_model, 6)
    objs = [dl.objective(OBJ)]
    parents, kids = family(2, 6, 12)

    def limit(act, hook):  # a "device" that holds at most 5 prompts per pass
        if act.shape[0] > 5:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    ev = scoring.Evaluator(tiny_model, objs, layout, scoring.Batching(batch_size=64))
    with tiny_model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", limit)]), pytest.warns(UserWarning, match="out of memory"):
        ev.gradients(parents, torch.zeros(2, dtype=torch.long), torch.ones(2))
        vals, _xe = ev.score_rows(kids)
        g = ev.gradients(kids[:9], torch.zeros(9, dtype=torch.long), torch.ones(9))
    assert ev.batcher.rows(layout.seq_len) <= 5 and ev.grad_batcher.rows(layout.seq_len) <= 5
    ref_v, _ref_x = scoring.score(tiny_model, objs, kids, layout)
    np.testing.assert_allclose(vals.numpy(), ref_v.double().numpy(), atol=1e-4)
    ref_g = scoring.token_gradients(tiny_model, objs, kids[:9], layout, torch.ones(9))[0]
    torch.testing.assert_close(g, ref_g, atol=1e-4, rtol=1e-4)
    with pytest.raises(RuntimeError, match="boom"):  # other errors are not swallowed
        scoring.Batcher(100).run(3, 1, lambda lo, hi: (_ for _ in ()).throw(RuntimeError("boom")))


def test_fast_weights_are_bitwise_equal_and_restored(tiny_model):
    tokens = torch.randint(300, 3000, (3, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = tiny_model(tokens)
        with scoring.fast_weights(tiny_model):
            assert not tiny_model.blocks[0].mlp.W_in.is_contiguous()
            inside = tiny_model(tokens)
            with scoring.fast_weights(tiny_model):  # nested: nothing to do, and the outer layout survives
                assert torch.equal(tiny_model(tokens), ref)
            assert not tiny_model.blocks[0].mlp.W_in.is_contiguous()
    assert torch.equal(ref, inside)
    assert all(p.is_contiguous() for p in tiny_model.parameters())


def test_batches_follow_the_memory_estimate(tiny_model):
    n = scoring.estimate_batch_tokens(tiny_model, 10)
    assert n >= 10
    ev = scoring.Evaluator(tiny_model, [dl.objective(OBJ)], scoring.make_layout(tiny_model, 6), scoring.Batching(batch_size=4))
    assert ev.batcher.rows(7) == 4  # batch_size whole prompts per pass
    assert ev.batcher.rows(2) == 14  # shorter rows (reused prefixes) fit more prompts in the same tokens


def test_bad_memory_budget_is_refused(tiny_model):
    with pytest.raises(DreamError, match="max_batch_tokens"):
        dl.epo(tiny_model, OBJ, dl.EPOConfig(**SMALL, max_batch_tokens=0), progress=False)


def test_buckets_merge_small_groups_and_keep_big_ones():
    b = scoring.Batcher(10_000)
    assert scoring.buckets([1, 2, 3], [2, 2, 2], 13, b, call_cost=32) == [[1, 2, 3]]
    assert scoring.buckets([1, 12], [500, 500], 13, b, call_cost=1) == [[1], [12]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert scoring.buckets([], [], 13, b, call_cost=32) == []
