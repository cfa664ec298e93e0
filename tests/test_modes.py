"""Modes (issue 17): K dreams of one objective, distinct by the stated definition (no mode uses the key
tokens of an earlier mode, nor their embedding neighbours); K = 1 is the ordinary dream; nearest examples."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import dreamlens as dl
from dreamlens.errors import OutputError
from dreamlens.optim.modes import Modes, ModeSettings, attribution_cost, embedding_neighbours, key_tokens

pytestmark = pytest.mark.usefixtures("one_thread")

OBJ = "blocks.1.mlp.hook_post[3]"
EPO = dict(length=5, population=3, children=6, topk=32, iters=4, seed=1)


@pytest.fixture(scope="module")
def modes(tiny_model):
    return dl.dream(tiny_model, OBJ, "epo", modes=3, progress=False, mode_settings=ModeSettings(limit=20.0), **EPO)


def test_one_mode_is_the_ordinary_dream(tiny_model):
    one = dl.dream(tiny_model, OBJ, "epo", modes=1, progress=False, **EPO)
    plain = dl.dream(tiny_model, OBJ, "epo", progress=False, **EPO)
    assert isinstance(one, Modes) and len(one) == 1 and one.found == [1]
    pd.testing.assert_frame_equal(one[0].history, plain.history, check_exact=True)


def test_modes_are_distinct_by_the_definition(tiny_model, modes):
    assert len(modes) == 3 and sorted(modes.found) == [1, 2, 3]
    by_found = {f: i for i, f in enumerate(modes.found)}
    first = by_found[1]
    assert modes.banned[first] == []
    # the first mode's key tokens are tokens of its best prompt, found by attribution
    best = [int(t) for t in modes.best(first)["ids"]]
    assert modes.key_tokens[first] and set(modes.key_tokens[first]) <= set(best)
    for f in (2, 3):
        i = by_found[f]
        earlier = [modes.key_tokens[by_found[g]] for g in range(1, f)]
        must_avoid = set(embedding_neighbours(tiny_model, [t for ks in earlier for t in ks], ModeSettings().neighbours))
        assert must_avoid and must_avoid <= set(modes.banned[i])
        used = {int(t) for row in modes[i].ids for t in row}
        assert not used & must_avoid, "a later mode used a key token of an earlier one"
    # ranked: best activation at the limit first
    ranks = [float(modes.best(i)["activation"]) for i in range(len(modes))]
    assert ranks == sorted(ranks, reverse=True)


def test_key_tokens_are_the_costliest_swaps():
    class Att:  # what key_tokens reads of an Attribution
        ids = np.array([10, 11, 12, 13])
        value = 5.0
        alt_values = np.array([[4.0, 4.5, 1.0], [0.0, 1.0, 2.0], [6.0, 6.0, 6.0], [5.0, 4.0, 4.9]])

    # drops (value - median): 0.5, 4.0, -1.0, 0.1: positive ones, largest first
    assert key_tokens(Att(), 2) == [11, 10]
    assert key_tokens(Att(), 9) == [11, 10, 13]


def test_embedding_neighbours_include_the_token_and_its_closest(tiny_model):
    w = tiny_model.W_E.detach()
    near = embedding_neighbours(tiny_model, [7], 4)
    assert 7 in near and len(near) == 4
    cos = torch.nn.functional.cosine_similarity(w[7:8], w, dim=-1)
    assert set(near) == set(cos.topk(4).indices.tolist())


def test_budget_leaves_room_for_the_attribution(tiny_model):
    from dreamlens.scoring import make_layout

    budget = 3000
    m = dl.dream(tiny_model, OBJ, "epo", modes=2, progress=False, max_token_forwards=budget,
                 **{**EPO, "iters": 50}, mode_settings=ModeSettings(limit=50.0))
    cost = attribution_cost(make_layout(tiny_model, EPO["length"]).seq_len, EPO["length"], ModeSettings().n_alternatives)
    second = m[m.found.index(2)]
    assert second.config["max_token_forwards"] == budget - cost
    assert m.attribution_token_forwards == cost
    with pytest.raises(dl.DreamError, match="leaves nothing for a mode"):
        dl.dream(tiny_model, OBJ, "epo", modes=2, progress=False, max_token_forwards=cost, **EPO)


def test_modes_save_and_load(tmp_path, modes):
    modes.save(tmp_path / "m")
    back = Modes.load(tmp_path / "m")
    assert back.found == modes.found and back.key_tokens == modes.key_tokens and back.banned == modes.banned
    for a, b in zip(back, modes):
        pd.testing.assert_frame_equal(a.history, b.history, check_exact=True)
    pd.testing.assert_frame_equal(back.to_frame(), modes.to_frame())
    with pytest.raises(OutputError, match="already holds modes"):
        modes.save(tmp_path / "m")
    one = Modes(modes.objective, modes.dreams[:1], [1], [[]], [[]], modes.limit)
    one.save(tmp_path / "m", overwrite=True)  # fewer modes: the earlier save's extra folders go
    assert sorted(p.name for p in (tmp_path / "m").glob("mode_*")) == ["mode_1"] and len(Modes.load(tmp_path / "m")) == 1


@pytest.mark.parametrize(("kw", "match"), [
    ({"modes": 0}, "modes must be a positive integer"),
    ({"modes": 2, "resume": "x"}, "cannot resume"),
    ({"mode_settings": ModeSettings()}, "only with modes"),
    ({"modes": 2, "mode_settings": ModeSettings(n_key=0)}, "n_key must be a positive integer"),
])
def test_bad_mode_arguments_are_refused(tiny_model, kw, match):
    with pytest.raises(dl.DreamError, match=match):
        dl.dream(tiny_model, OBJ, "epo", progress=False, **EPO, **kw)


def test_nearest_examples_rank_examples_by_pattern_cosine(tiny_model, modes):
    from dreamlens.analysis.patterns import activation_patterns, nearest_examples

    docs = ["The committee met on Tuesday to discuss the budget for the coming year.",
            "Rivers carry water from the mountains to the sea, and feed farms.",
            "Coffee was first grown in Ethiopia and Yemen, then carried across the sea."]
    scan = dl.scan(tiny_model, [OBJ], docs, tokens=40, window=5, top_k=6, per_document=2, cache=False, progress=False)
    near = nearest_examples(tiny_model, modes, scan, k=3)
    assert len(near) == len(modes)
    top = scan.top(0)
    for i, frame in enumerate(near):
        assert len(frame) == 3 and list(frame.cosine) == sorted(frame.cosine, reverse=True)
        # independently: the cosine of the mode's pattern with each example's, centered on the examples' mean
        ex = activation_patterns(tiny_model, OBJ, [[0, *map(int, ids)] for ids in top["ids"]])
        mode = activation_patterns(tiny_model, OBJ, [[0, *map(int, modes.best(i)["ids"])]])
        mean = ex.mean(0, keepdim=True)
        cos = torch.nn.functional.cosine_similarity(mode - mean, ex - mean, dim=-1)
        np.testing.assert_allclose(frame.cosine.to_numpy(), np.sort(cos.numpy())[::-1][:3], rtol=1e-5, atol=1e-6)
        assert list(frame.text) == [top.text.iloc[r - 1] for r in frame["rank"]]


def test_activation_patterns_read_a_fixed_position_as_the_objective_does(tiny_model):
    from dreamlens.analysis.patterns import activation_patterns

    ids = [0, 11, 12, 13, 14]  # start token, then the prompt
    tokens = torch.tensor([ids])
    _, cache = tiny_model.run_with_cache(tokens, names_filter="blocks.1.mlp.hook_post")
    acts = cache["blocks.1.mlp.hook_post"][0]
    pat = activation_patterns(tiny_model, "blocks.1.mlp.hook_post[3]@1", [ids])[0]
    torch.testing.assert_close(pat, acts[2].float())  # position 1 of the prompt: token 12
    assert float(pat[3]) == pytest.approx(float(dl.objective("blocks.1.mlp.hook_post[3]@1").evaluate(tiny_model, tokens)[0]))
    last = activation_patterns(tiny_model, "blocks.1.mlp.hook_post[3]", [ids])[0]
    torch.testing.assert_close(last, acts[-1].float())


def test_modes_never_replace_a_dream_result(tmp_path, modes):
    modes[0].save(tmp_path / "r")
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="holds a dream result; modes go to a folder of their own"):
            modes.save(tmp_path / "r", overwrite=overwrite)
    assert (tmp_path / "r" / "result.json").exists() and not (tmp_path / "r" / "modes.json").exists()
