import itertools

import numpy as np
import pytest
import torch

import dreamlens as dl
from dreamlens import scoring
from dreamlens.errors import DreamError
from dreamlens.models import decode, encode
from dreamlens.optim import epo as epo_mod
from dreamlens.results import pareto_front

OBJ = "blocks.1.mlp.hook_post[3]"
SMALL = dict(length=6, population=4, children=8, topk=64, iters=6, restart_every=3, seed=0)


def run(model, **kw):
    return dl.epo(model, kw.pop("objective", OBJ), dl.EPOConfig(**{**SMALL, **kw}), progress=False)


@pytest.fixture(scope="module")
def result(tiny_model):
    return run(tiny_model)


def test_gradient_uses_each_rows_own_penalty(tiny_model):
    layout = scoring.make_layout(tiny_model, 5)
    ids = torch.randint(300, 3000, (3, 5), generator=torch.Generator().manual_seed(1))
    obj = dl.objective(OBJ)
    lam = torch.tensor([0.1, 1.0, 10.0])
    g, _, _ = scoring.token_gradients(tiny_model, [obj], ids, layout, lam)
    g_f, _, _ = scoring.token_gradients(tiny_model, [obj], ids, layout, torch.zeros(3))  # -grad f
    g_1, _, _ = scoring.token_gradients(tiny_model, [obj], ids, layout, torch.ones(3))  # -grad f + grad xe
    g_xe = g_1 - g_f
    for i in range(3):
        torch.testing.assert_close(g[i], g_f[i] + lam[i] * g_xe[i], atol=1e-4, rtol=1e-3)


def test_selection_is_elitist_under_each_members_penalty(tiny_model):
    cfg = dl.EPOConfig(**{**SMALL, "iters": 8, "restart_every": 0})
    lams = cfg.penalties()
    losses = []
    dl.epo(tiny_model, OBJ, cfg, progress=False,
           callback=lambda info: losses.append(-np.array(info.activation) + lams * np.array(info.xe)))
    losses = np.array(losses)
    assert np.all(np.diff(losses, axis=0) <= 1e-9)  # each slot only improves under its own lam
    assert len(set(np.round(lams, 6))) == cfg.population and lams[0] == pytest.approx(0.1) and lams[-1] == pytest.approx(10)


def test_no_restart_at_iteration_zero_and_restart_collapses(tiny_model):
    pops = {}
    dl.epo(tiny_model, OBJ, dl.EPOConfig(**{**SMALL, "iters": 4, "restart_every": 3}), progress=False,
           callback=lambda info: pops.__setitem__(info.iteration, [encode(tiny_model, t) for t in info.texts]))
    # A restart at iteration 0 would put every member within one swap of a single prompt after
    # iteration 1 (pairwise distance <= 2); random members stay far apart.
    dist = max(sum(a != b for a, b in zip(p, q)) for p in pops[1] for q in pops[1])
    assert dist > 2
    # the restart at iteration 3 puts every member on one prompt
    assert len({tuple(p) for p in pops[3]}) == 1


def test_frontier_is_non_dominated_and_complete(result):
    h = result.history
    fr = result.frontier
    assert list(fr.columns[:4]) == ["text", "ids", "activation", "xe"]
    assert fr["xe"].is_monotonic_increasing and fr["activation"].is_monotonic_increasing
    a, x = h["activation"].to_numpy(), h["xe"].to_numpy()
    for _, row in fr.iterrows():  # nothing dominates a frontier point
        dominated = (a >= row.activation) & (x <= row.xe) & ((a > row.activation) | (x < row.xe))
        assert not dominated.any()
    for i in range(len(h)):  # every point off the frontier is dominated by a frontier point
        if not ((fr.activation == a[i]) & (fr.xe == x[i])).any():
            assert ((fr.activation >= a[i]) & (fr.xe <= x[i])).any()


def test_pareto_front_keeps_non_convex_points():
    act = np.array([0.0, 1.0, 1.2, 3.0, 0.5])
    xe = np.array([1.0, 2.0, 5.0, 6.0, 3.0])
    # (5.0, 1.2) lies under the chord between (2,1) and (6,3): a weighted sum never picks it
    assert list(pareto_front(act, xe)) == [0, 1, 2, 3]


def test_best_respects_threshold(result):
    row = result.best(max_xe=float(np.median(result.xe)))
    ok = result.xe <= np.median(result.xe)
    assert row.activation == pytest.approx(result.activation[ok].max())
    with pytest.raises(ValueError, match="no prompt has xe <= -1"):
        result.best(max_xe=-1)


def test_history_has_no_duplicates_and_counts_forwards(result):
    keys = {tuple(r) for r in result.ids}
    assert len(keys) == len(result)
    assert result.n_forward == len(result)  # each distinct prompt forwarded exactly once


def test_dedup_never_drops_a_distinct_prompt(tiny_model):
    layout = scoring.make_layout(tiny_model, 4)
    ev = scoring.Evaluator(tiny_model, [dl.objective(OBJ)], layout)
    a = torch.tensor([[500, 600, 700, 800], [501, 600, 700, 800], [500, 600, 700, 800]])
    f, _x, _ok = ev.evaluate(a, torch.zeros(3, dtype=torch.long), 0)
    assert ev.compute.n_forward == 2 and f[0] == f[2] and f[0] != f[1]
    f2, _, _ = ev.evaluate(a[:2], torch.zeros(2, dtype=torch.long), 1)
    assert ev.compute.n_forward == 2 and torch.equal(f2, f[:2])
    ref, _ = scoring.score(tiny_model, [dl.objective(OBJ)], a, layout)
    torch.testing.assert_close(f.float(), ref[0], atol=1e-5, rtol=1e-5)


def test_banned_tokens_never_appear(tiny_model):
    banned = tuple(range(1000, 40000))
    r = run(tiny_model, banned_tokens=banned, ascii_only=True)
    mask = scoring.banned_mask(tiny_model, ascii_only=True, extra=banned)
    assert not mask[torch.as_tensor(r.ids)].any()
    assert all(t.isascii() for t in r.text)
    specials = {0, 1, 2}
    assert not specials & set(np.unique(r.ids).tolist())


def test_frontier_text_round_trips(tiny_model):
    r = run(tiny_model, prefix="Once upon a time", suffix=" the end")
    for _, row in r.frontier.iterrows():
        assert decode(tiny_model, row.ids) == row.text
        full = encode(tiny_model, "Once upon a time" + row.text + " the end")
        assert full == encode(tiny_model, "Once upon a time") + list(row.ids) + encode(tiny_model, " the end")


def test_reported_scores_equal_reevaluation_of_text(tiny_model, result):
    layout = scoring.make_layout(tiny_model, SMALL["length"])
    fr = result.frontier
    ids = torch.tensor([encode(tiny_model, t) for t in fr.text])
    vals, xe = scoring.score(tiny_model, [dl.objective(OBJ)], ids, layout)
    np.testing.assert_allclose(vals[0].numpy(), fr.activation, atol=1e-5)
    np.testing.assert_allclose(xe.numpy(), fr.xe, atol=1e-5)


def test_same_seed_same_result(tiny_model, result):
    again = run(tiny_model)
    assert np.array_equal(again.ids, result.ids)
    assert np.array_equal(again.activation, result.activation)


def test_resume_continues_identically(tiny_model, result, tmp_path):
    half = run(tiny_model, iters=3)
    half.save(tmp_path / "half")
    cont = dl.epo(tiny_model, OBJ, dl.EPOConfig(**SMALL), resume=tmp_path / "half", progress=False)
    assert cont.iterations == SMALL["iters"]
    assert np.array_equal(cont.ids, result.ids)
    np.testing.assert_array_equal(cont.activation, result.activation)
    with pytest.raises(DreamError, match="population changed"):
        dl.epo(tiny_model, OBJ, dl.EPOConfig(**{**SMALL, "population": 2}), resume=half, progress=False)


def test_ctrl_c_keeps_history(tiny_model):
    def cb(info):
        if info.iteration == 3:
            raise KeyboardInterrupt

    with pytest.warns(UserWarning, match="interrupted"):
        r = run(tiny_model, callback=cb) if False else dl.epo(tiny_model, OBJ, dl.EPOConfig(**SMALL), callback=cb, progress=False)
    assert r.stopped == "interrupted"
    assert r.iterations == 3 and r.iteration.max() == 3  # iteration 3 was complete when the callback ran
    assert len(r) > SMALL["population"]


def test_callback_can_stop_and_crashing_callback_keeps_work(tiny_model):
    r = dl.epo(tiny_model, OBJ, dl.EPOConfig(**SMALL), callback=lambda info: info.iteration >= 2, progress=False)
    assert r.stopped == "callback" and r.iterations == 2

    def bad(info):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom") as caught:  # a failure is a failure, its work kept
        dl.epo(tiny_model, OBJ, dl.EPOConfig(**SMALL), callback=bad, progress=False)
    r = caught.value.dreamlens_result
    assert (r.stopped, r.error, r.iterations) == ("error", "RuntimeError: boom", 1) and len(r) > 0


def test_budget_stops_the_run(tiny_model):
    r = run(tiny_model, iters=50, max_token_forwards=2000)
    assert r.stopped == "budget" and r.token_forwards >= 2000 and r.iterations < 50


def test_save_load_round_trip(result, tmp_path):
    path = result.save(tmp_path / "r")
    assert not any(p.suffix == ".pkl" for p in path.iterdir())
    back = dl.DreamResult.load(path)
    assert back.objective == result.objective and back.config == result.config
    np.testing.assert_array_equal(back.ids, result.ids)
    np.testing.assert_array_equal(back.activation, result.activation)
    assert back.text == result.text
    assert back.frontier.equals(result.frontier)


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(length=0), "length must be at least 1"),
        (dict(length=100), "exceeds the model's context of 64"),
        (dict(population=0), "population must be at least 1"),
        (dict(lam_min=-1.0), "penalties must be positive"),
        (dict(lam_min=5.0, lam_max=1.0), "lam_max"),
        (dict(init_text="hello world"), "has 2 tokens but length is 6"),
        (dict(banned_tokens=(10**6,)), "outside the vocabulary"),
    ],
)
def test_bad_input_fails_before_compute(tiny_model, kw, msg):
    with pytest.raises(DreamError, match=msg):
        run(tiny_model, **kw)


def test_constant_objective_is_refused(tiny_model):
    with pytest.raises(DreamError, match="constant"):
        run(tiny_model, objective="blocks.1.hook_resid_post[3]@0", prefix="Hello")  # reads the prefix only


def test_silent_sae_latent_points_to_its_pre_activation(tiny_model):
    from sae_lens import TopKSAE, TopKSAEConfig

    torch.manual_seed(0)
    sae = TopKSAE(TopKSAEConfig(d_in=64, d_sae=16, k=1))
    sae.cfg.metadata.hook_name = "blocks.1.hook_resid_post"
    with torch.no_grad():
        sae.b_enc[5] = -1e4  # never among the top 1: the latent is 0, with zero gradient, everywhere
    with pytest.raises(DreamError, match=r"constant here \(an SAE latent .* dream its pre-activation"):
        run(tiny_model, objective=dl.SAELatent(sae, 5))
    pre = run(tiny_model, objective=dl.SAELatent(sae, 5, pre_activation=True))  # the fix works
    assert np.isfinite(pre.activation).all()


def test_unknown_hook_is_refused(tiny_model):
    with pytest.raises(dl.ObjectiveError, match="did you mean 'blocks.1.mlp.hook_post'"):
        run(tiny_model, objective="blocks.1.mlp.hook_pots[3]")


def test_many_objectives_give_one_result_each(tiny_model):
    objs = [OBJ, "blocks.0.mlp.hook_post[5]"]
    rs = dl.epo(tiny_model, objs, dl.EPOConfig(**SMALL), progress=False)
    assert [r.objective for r in rs] == objs
    solo = run(tiny_model, objective=objs[1])
    np.testing.assert_allclose(rs[1].activation.max(), solo.activation.max(), rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Options beyond the paper: sampled starts, model-sampled children, restarts on stagnation


def test_sampled_start_at_low_temperature_is_greedy_text(tiny_model):
    from dreamlens.optim.sampling import next_token_logprobs, sample_prompts

    layout = scoring.make_layout(tiny_model, 4)
    banned = scoring.banned_mask(tiny_model)
    ids, spent = sample_prompts(tiny_model, 2, layout, banned, torch.Generator().manual_seed(0), temperature=1e-6)
    assert ids is not None and spent == 2 * sum(len(layout.head) + t for t in range(4))
    greedy = torch.zeros((1, 0), dtype=torch.long)
    for _ in range(4):
        logp = next_token_logprobs(tiny_model, greedy, layout)
        logp[:, banned] = float("-inf")
        greedy = torch.cat([greedy, logp.argmax(dim=-1, keepdim=True)], dim=1)
    assert ids.tolist() == [greedy[0].tolist()] * 2


def test_sampled_start_is_more_fluent_than_random_tokens(tiny_model):
    sampled = run(tiny_model, init="sample", iters=0, population=6)
    rand = run(tiny_model, iters=0, population=6)
    assert sampled.token_forwards > rand.token_forwards  # the sampling is counted
    assert float(np.mean(sampled.xe)) < float(np.mean(rand.xe))


def test_lm_children_take_the_models_tokens(tiny_model):
    K, M, L, V, C = 1, 2, 5, tiny_model.cfg.d_vocab, 6
    pop = torch.randint(300, 3000, (K, M, L), generator=torch.Generator().manual_seed(2))
    grad = torch.randn(K * M, L, V, generator=torch.Generator().manual_seed(3))
    logp = torch.full((K * M, L, V), float("-inf"))
    logp[:, :, 777] = 0.0  # the "model" is sure of token 777 everywhere
    banned = torch.zeros(V, dtype=torch.bool)
    kids = epo_mod.propose_children(pop, grad, banned, 16, C, [torch.Generator().manual_seed(4)], logp, n_lm=2)
    kids = kids.view(M, C, L)
    changed = kids != pop[0][:, None, :]
    assert bool((kids[:, -2:][changed[:, -2:]] == 777).all()) and bool(changed[:, -2:].any())
    assert not bool((kids[:, :-2][changed[:, :-2]] == 777).any())  # the gradient's children


def test_restart_on_stagnation(tiny_model):
    pops = []
    cfg = dl.EPOConfig(**{**SMALL, "iters": 10, "restart_every": 0, "restart_patience": 1})
    dl.epo(tiny_model, OBJ, cfg, progress=False,
           callback=lambda info: pops.append((list(info.texts), list(info.activation), list(info.xe))) and None)
    lams = cfg.penalties()
    restarts = 0
    for (_, f0, x0), (texts, f1, x1) in itertools.pairwise(pops):
        improved = any(-a1 + lam * b1 < -a0 + lam * b0 - 1e-12 for a0, b0, a1, b1, lam in zip(f0, x0, f1, x1, lams))
        if len(set(texts)) == 1:
            restarts += 1
        elif not improved:
            raise AssertionError("an iteration without improvement did not restart the population")
    assert restarts >= 1
