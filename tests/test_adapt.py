import numpy as np
import pytest
import torch

import dreamlens as dl
from dreamlens import scoring
from dreamlens.errors import DreamError
from dreamlens.models import decode, encode
from dreamlens.optim import adapt as ad
from dreamlens.optim import beam, sampling

OBJ = "blocks.1.mlp.hook_post[3]"
SMALL = dict(length=4, beams=2, beam_lm=2, beam_grad=2, children=4, iters=4, patience=1, seed=0)


pytestmark = pytest.mark.usefixtures("one_thread")


def run(model, callback=None, **kw):
    return dl.adapt(model, kw.pop("objective", OBJ), dl.ADAPTConfig(**{**SMALL, **kw}), progress=False, callback=callback)


@pytest.fixture(scope="module")
def strengths():
    return []


@pytest.fixture(scope="module")
def result(tiny_model, strengths):
    return run(tiny_model, callback=lambda info: strengths.append(info.extra["strength"]))


def _beam(model, objective=OBJ, length=4, beams=3, k_lm=3, k_grad=4, **banned_kw):
    layout = scoring.make_layout(model, length)
    obj = dl.objective(objective)
    ev = scoring.Evaluator(model, [obj], layout)
    banned = scoring.banned_mask(model, **banned_kw)
    trace = beam.BeamTrace()
    lams = torch.tensor(np.logspace(-1, 1, beams))
    pool, f, xe = beam.beam_search(ev, lams, banned, torch.Generator().manual_seed(0), beam.BeamWidths(k_lm, k_grad), trace)
    return trace, pool, f, xe, banned, ev


def test_beam_search_keeps_exactly_b_beams_of_allowed_tokens(tiny_model):
    extra = tuple(range(200, 30000))
    trace, pool, f, _xe, banned, ev = _beam(tiny_model, ascii_only=True, extra=extra)
    assert [b.shape for b in trace.beams] == [(3, t + 1) for t in range(3)]  # the last step returns the pool
    for b in trace.beams:
        assert len({tuple(r) for r in b.tolist()}) == 3  # B distinct partial prompts
        assert not banned[b].any()
    for p in trace.proposals:
        assert not banned[p].any()
        assert p.shape[1] == 3 + 4 and all(len(set(r)) == 7 for r in p.tolist())  # model's and gradient's differ
    assert pool.shape == (3 * 7, 4) and not banned[pool].any()
    assert torch.isfinite(f).any() and len(ev.history[0]) > 0  # full prompts are scored and recorded
    # the first proposals are the model's own favourite next tokens after the start token
    logp = sampling.next_token_logprobs(tiny_model, torch.zeros((1, 0), dtype=torch.long), scoring.make_layout(tiny_model, 4))
    logp[0, banned] = float("-inf")
    assert trace.proposals[0][0, :3].tolist() == logp[0].topk(3).indices.tolist()


def test_beam_search_grows_fluently_until_a_fixed_position_is_readable(tiny_model):
    trace, pool, f, _, _, _ = _beam(tiny_model, objective=OBJ + "@1", length=3, k_grad=2)
    assert [p.shape[1] for p in trace.proposals] == [3, 5, 5]  # no gradient before position 1 exists
    assert pool.shape[1] == 3 and torch.isfinite(f).any()


def test_mutation_strength_rises_on_stagnation_and_falls_on_improvement():
    cfg = dl.ADAPTConfig(patience=2, step=0.25, max_positions=3, topk_min=8, topk_max=256)
    s = ad.MutationStrength()
    weak = (s.positions(cfg, 12), s.topk(cfg), s.temperature(cfg))
    assert weak == (1, 8, pytest.approx(cfg.temp_min))
    s.update(False, cfg)
    assert s.level == 0  # one stalled iteration is within patience
    for _ in range(8):
        s.update(False, cfg)
    assert s.level == 1.0
    strong = (s.positions(cfg, 12), s.topk(cfg), s.temperature(cfg))
    assert strong == (3, 256, pytest.approx(cfg.temp_max))
    s.update(True, cfg)
    assert s.level == 0.75 and s.stall == 0
    assert s.positions(cfg, 12) <= 3 and s.topk(cfg) < 256 and s.temperature(cfg) < cfg.temp_max


def test_mutation_changes_as_many_positions_as_the_strength_says(tiny_model):
    cfg = dl.ADAPTConfig(children=64, max_positions=3)
    L, V = 6, tiny_model.cfg.d_vocab
    parents = torch.randint(300, 3000, (2, L), generator=torch.Generator().manual_seed(0))
    scores = torch.randn((2, L, V), generator=torch.Generator().manual_seed(1)).double()
    banned = scoring.banned_mask(tiny_model)
    scores[..., banned] = float("-inf")
    strengths = [ad.MutationStrength(level=0.0), ad.MutationStrength(level=1.0)]
    kids = ad.mutate(parents, scores, strengths, cfg, torch.Generator().manual_seed(2)).view(2, 64, L)
    changed = (kids != parents[:, None, :]).sum(dim=2)
    assert changed[0].max() == 1 and changed[1].max() == 3
    assert not banned[kids].any()
    weak_pool = set(scores[0].topk(cfg.topk_min, dim=-1).indices.flatten().tolist())
    assert set(kids[0][kids[0] != parents[0]].tolist()) <= weak_pool  # narrow top-k at strength 0


def test_strength_adapts_during_a_run(result, strengths):
    assert len(strengths) == SMALL["iters"] and all(len(s) == SMALL["beams"] for s in strengths)
    assert max(max(s) for s in strengths) > 0  # some member stalled and got stronger


def test_result_is_valid(result):
    assert result.method == "adapt" and result.iterations == SMALL["iters"]
    assert len({tuple(r) for r in result.ids}) == len(result)
    assert result.token_forwards > 0 and result.n_gradient > 0
    assert (result.iteration == 0).sum() > 0  # the beam search's full prompts


def test_resume_continues_identically(tiny_model, result, tmp_path):
    run(tiny_model, iters=2).save(tmp_path / "half")
    cont = dl.adapt(tiny_model, OBJ, dl.ADAPTConfig(**SMALL), resume=tmp_path / "half", progress=False)
    assert cont.iterations == SMALL["iters"]
    assert np.array_equal(cont.ids, result.ids)
    np.testing.assert_array_equal(cont.activation, result.activation)
    with pytest.raises(DreamError, match="children changed"):
        dl.adapt(tiny_model, OBJ, dl.ADAPTConfig(**{**SMALL, "children": 2}), resume=tmp_path / "half", progress=False)


def test_budget_counts_the_beam_search_and_stops(tiny_model):
    r = run(tiny_model, iters=50, max_token_forwards=400)
    assert r.stopped == "budget" and r.token_forwards >= 400 and r.iterations < 50
    layout = scoring.make_layout(tiny_model, 12)
    cfg = dl.ADAPTConfig(max_token_forwards=8000)
    k_lm, k_grad = beam.beam_sizes(cfg, layout)
    assert (k_lm, k_grad) < (cfg.beam_lm, cfg.beam_grad) and beam.beam_cost(cfg.beams, k_lm, k_grad, layout) <= 4000


def test_penalties_are_scale_free(tiny_model, result):
    # The objective times 10: the same prompts (penalties are in units of the activation's spread).
    r10 = dl.adapt(tiny_model, 10 * dl.objective(OBJ), dl.ADAPTConfig(**SMALL), progress=False)
    assert np.array_equal(r10.ids, result.ids)
    np.testing.assert_allclose(r10.activation, 10 * result.activation, rtol=1e-4, atol=1e-5)


def test_ctrl_c_during_the_beam_search_keeps_a_result(tiny_model, monkeypatch):
    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ad, "beam_search", stop)
    with pytest.warns(UserWarning, match="interrupted"):
        r = run(tiny_model)
    assert r.stopped == "interrupted" and r.iterations == 0 and r.state == {}


def test_init_text_skips_the_beam_search(tiny_model):
    text = decode(tiny_model, encode(tiny_model, " the cat sat down")[:4])
    r = run(tiny_model, init_text=text, iters=1)
    first = r.history[r.history.iteration == 0]
    assert list(first.text) == [text]


# -- every method through dream(): the same result checks ------------------------------------------

METHOD_KW = {
    "adapt": {**SMALL, "iters": 2},
    "epo": dict(length=4, population=2, children=4, topk=32, iters=2, seed=0),
    "gcg": dict(length=4, children=6, topk=32, iters=2, seed=0),
}


@pytest.mark.parametrize("method", ["adapt", "epo", "gcg"])
def test_every_method_returns_a_valid_result(tiny_model, method, tmp_path):
    prefix, suffix = "Once upon a time", " the end"
    r = dl.dream(tiny_model, OBJ, method, prefix=prefix, suffix=suffix, progress=False, **METHOD_KW[method])
    assert isinstance(r, dl.DreamResult) and r.method == method and len(r) > 0
    h, fr = r.history, r.frontier
    assert fr["xe"].is_monotonic_increasing and fr["activation"].is_monotonic_increasing
    a, x = h["activation"].to_numpy(), h["xe"].to_numpy()
    for _, row in fr.iterrows():  # nothing dominates a frontier point
        assert not ((a >= row.activation) & (x <= row.xe) & ((a > row.activation) | (x < row.xe))).any()
        assert decode(tiny_model, row.ids) == row.text  # and its text reproduces its ids in context
        assert encode(tiny_model, prefix + row.text + suffix) == encode(tiny_model, prefix) + list(row.ids) + encode(tiny_model, suffix)
    layout = scoring.make_layout(tiny_model, 4, prefix, suffix)
    vals, xe = scoring.score(tiny_model, [dl.objective(OBJ)], torch.tensor([encode(tiny_model, t) for t in fr.text]), layout)
    np.testing.assert_allclose(vals[0].numpy(), fr.activation, atol=1e-4)
    np.testing.assert_allclose(xe.numpy(), fr.xe, atol=1e-4)
    back = dl.DreamResult.load(r.save(tmp_path / method))
    assert back.method == method and back.config == r.config and back.frontier.equals(fr)
    np.testing.assert_array_equal(back.ids, r.ids)


def test_dream_refuses_unknown_methods_and_options(tiny_model):
    with pytest.raises(DreamError, match="did you mean 'adapt'"):
        dl.dream(tiny_model, OBJ, "adpat")
    with pytest.raises(DreamError, match=r"'population' is not an option of adapt.*option of epo"):
        dl.dream(tiny_model, OBJ, "adapt", population=4)
    with pytest.raises(DreamError, match="did you mean 'children'"):
        dl.dream(tiny_model, OBJ, "epo", childs=4)
    with pytest.raises(DreamError, match="takes a EPOConfig"):
        dl.dream(tiny_model, OBJ, "epo", config=dl.ADAPTConfig())


def test_dream_defaults_to_adapt(tiny_model):
    from dreamlens.optim.methods import DEFAULT_METHOD, make_config

    assert DEFAULT_METHOD == "adapt"
    assert make_config(config=dl.ADAPTConfig(beams=2), iters=5) == dl.ADAPTConfig(beams=2, iters=5)


def test_demo_is_the_default_method_after_the_chat_user_turn(tiny_model):
    from dreamlens import cli
    from dreamlens.optim.methods import DEFAULT_METHOD, METHODS

    cfg = cli.demo_config(None, 12_000, "dreams/demo")
    assert isinstance(cfg, METHODS[DEFAULT_METHOD][1]) and cfg.checkpoint_dir == "dreams/demo"
    assert cfg.prefix == cli.DEMO_PREFIX and cfg.length == 8 and cfg.max_token_forwards == 12_000
    ids = encode(tiny_model, cli.DEMO_PREFIX)  # the embedded tokenizer: the special token, not its letters
    assert ids[0] == tiny_model.tokenizer.convert_tokens_to_ids("<|im_start|>") and len(ids) == 3
    assert cli.demo_config("gpt2", 3000).prefix == ""  # another model's chat template may differ
