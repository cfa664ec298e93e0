"""Starts without a dataset (`ADAPTConfig.self_scan`, `optim.self_scan`): the model's own text, sampled
and scanned for the objective, charged to the budget."""

import numpy as np
import pytest
import torch

import dreamlens as dl
from dreamlens import scoring
from dreamlens.errors import DreamError
from dreamlens.optim.self_scan import sample_documents, self_scan_starts

OBJ = "blocks.1.mlp.hook_post[3]"
L = 5
BUDGET = 3000

pytestmark = pytest.mark.usefixtures("one_thread")


def banned(model):
    return scoring.banned_mask(model)


def test_sampled_documents_are_seeded_and_avoid_banned_tokens(tiny_model):
    mask = banned(tiny_model)
    a = sample_documents(tiny_model, 3, 10, mask, torch.Generator().manual_seed(1))
    b = sample_documents(tiny_model, 3, 10, mask, torch.Generator().manual_seed(1))
    c = sample_documents(tiny_model, 3, 10, mask, torch.Generator().manual_seed(2))
    assert a.shape == (3, 10) and torch.equal(a, b) and not torch.equal(a, c)
    assert not mask[a].any()  # the start token and other special tokens are never sampled
    state = torch.random.get_rng_state()
    sample_documents(tiny_model, 2, 4, mask, torch.Generator().manual_seed(0))
    assert torch.equal(state, torch.random.get_rng_state())  # the global generator is left alone


def test_self_scan_starts_are_the_scans_top_windows(tiny_model):
    obj = dl.objective(OBJ)
    starts, spent = self_scan_starts(tiny_model, obj, 2000, L, banned(tiny_model), torch.Generator().manual_seed(0))
    n = 2000 // 2 // 64  # documents of 64 tokens: half the share sampled, half scanned
    assert 0 < len(starts) <= 32 and all(len(s) == L for s in starts)
    assert len(set(starts)) == len(starts)
    assert n * 64 < spent <= 2 * n * 64 + 64  # the sampling and the scan of (about) as many tokens
    vals, _ = scoring.score(tiny_model, [obj], torch.tensor(starts), scoring.make_layout(tiny_model, L))
    assert float(vals[0].max()) > 0  # the windows are where the neuron fires


def test_a_self_scan_dream_starts_from_the_sampled_windows_and_charges_them(tiny_model):
    gen = torch.Generator().manual_seed(0)  # a generator of their own, seeded with the run's seed
    starts, spent = self_scan_starts(tiny_model, dl.objective(OBJ), int(0.3 * BUDGET), L, banned(tiny_model), gen)
    r = dl.dream(tiny_model, OBJ, self_scan=0.3, max_token_forwards=BUDGET, length=L, progress=False)
    first = {tuple(ids) for ids, it in zip(r.ids, r.iteration) if it == 0}
    assert first == set(starts)  # every start scored at iteration 0, nothing else
    assert r.token_forwards >= spent + len(starts) * (L + 1)  # sampling, scan and the scoring of the starts
    plain = dl.dream(tiny_model, OBJ, self_scan=0, max_token_forwards=BUDGET, length=L, progress=False)
    assert {tuple(ids) for ids, it in zip(plain.ids, plain.iteration) if it == 0} != first
    again = dl.dream(tiny_model, OBJ, self_scan=0.3, max_token_forwards=BUDGET, length=L, progress=False)
    assert list(again.text) == list(r.text)  # seeded: the same run twice


def test_self_scan_with_a_length_range_keeps_every_prompt_retokenizing(tiny_model):
    r = dl.dream(tiny_model, OBJ, self_scan=0.3, max_token_forwards=BUDGET, length=L, max_length=L + 2,
                 progress=False)
    lengths = {len(ids) for ids in r.ids}
    assert L in lengths and lengths <= set(range(L, L + 3))
    for n in lengths:
        rows = [ids for ids in r.ids if len(ids) == n]
        ok, _ = scoring.retokenizes(tiny_model, torch.as_tensor(np.stack(rows)), scoring.make_layout(tiny_model, n))
        assert bool(ok.all())


def first_prompts(result):
    return {tuple(ids) for ids, it in zip(result.ids, result.iteration) if it == 0}


def test_the_default_self_scans_with_a_budget_and_no_starts(tiny_model):
    cfg = dl.ADAPTConfig(max_token_forwards=BUDGET)
    assert cfg.self_scan is None and cfg.self_scan_share() == dl.optim.config.SELF_SCAN_SHARE > 0
    assert dl.ADAPTConfig().self_scan_share() == 0  # no budget: the beam search
    assert dl.ADAPTConfig(max_token_forwards=BUDGET, init_text="a b").self_scan_share() == 0  # starts given
    assert dl.ADAPTConfig(max_token_forwards=BUDGET, init_ids=(1, 2), self_scan=0.3).self_scan_share() == 0
    assert dl.ADAPTConfig(max_token_forwards=BUDGET, self_scan=0).self_scan_share() == 0
    share = dl.optim.config.SELF_SCAN_SHARE
    default = dl.dream(tiny_model, OBJ, max_token_forwards=BUDGET, length=L, progress=False)
    explicit = dl.dream(tiny_model, OBJ, self_scan=share, max_token_forwards=BUDGET, length=L, progress=False)
    beam = dl.dream(tiny_model, OBJ, self_scan=0, max_token_forwards=BUDGET, length=L, progress=False)
    assert list(default.text) == list(explicit.text)
    starts, _ = self_scan_starts(tiny_model, dl.objective(OBJ), int(share * BUDGET), L, banned(tiny_model),
                                 torch.Generator().manual_seed(0))
    assert first_prompts(default) == set(starts) != first_prompts(beam)


def test_the_default_falls_back_to_the_beam_search_without_a_start_token(tiny_model, monkeypatch):
    import dreamlens.optim.adapt as adapt_module

    monkeypatch.setattr(adapt_module, "bos_token_id", lambda model: None)
    default = dl.dream(tiny_model, OBJ, max_token_forwards=BUDGET, length=L, progress=False)
    beam = dl.dream(tiny_model, OBJ, self_scan=0, max_token_forwards=BUDGET, length=L, progress=False)
    assert list(default.text) == list(beam.text)


@pytest.mark.parametrize("options, needle", [
    ({"self_scan": 0.3}, "set max_token_forwards"),

    ({"self_scan": 1.0, "max_token_forwards": 1000}, "self_scan is a share of the budget in [0, 1)"),
])
def test_self_scan_errors(tiny_model, options, needle):
    with pytest.raises(DreamError) as e:
        dl.dream(tiny_model, OBJ, length=L, progress=False, **options)
    assert needle in str(e.value)


def test_self_scan_and_examples_together_are_refused_before_any_work(tiny_model):
    with pytest.raises(DreamError) as e:
        dl.dream(tiny_model, OBJ, self_scan=0.3, max_token_forwards=BUDGET, length=L, progress=False,
                 examples=[(0, (5, 6, 7, 8, 9))])
    assert "drop self_scan or examples=" in str(e.value)


def test_start_kind_names_the_self_scan():
    assert dl.ADAPTConfig(max_token_forwards=BUDGET).start_kind() == "self-scan"
    assert dl.ADAPTConfig().start_kind() == "random"  # no budget: the beam search
    assert dl.ADAPTConfig(max_token_forwards=BUDGET, self_scan=0).start_kind() == "random"
    assert dl.ADAPTConfig(max_token_forwards=BUDGET, init_text="a b").start_kind() == "given"
    assert dl.EPOConfig(max_token_forwards=BUDGET).start_kind() == "random"
