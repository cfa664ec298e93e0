"""Modes (issue 17): K dreams of one objective, distinct by the stated definition (no mode uses the key
tokens of an earlier mode, nor their embedding neighbours); K = 1 is the ordinary dream; nearest examples."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pandas as pd
import pytest
import torch

import dreamlens as dl
from dreamlens.errors import OutputError
from dreamlens.modes.budget import attribution_cost
from dreamlens.modes.keys import embedding_neighbours, key_tokens
from dreamlens.modes.result import Modes
from dreamlens.modes.settings import ModeSettings

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
    with pytest.raises(dl.DreamError, match="leaves nothing for a later mode"):
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


def test_nearest_examples_rank_examples_by_pattern_similarity(tiny_model, modes):
    from dreamlens.analysis.patterns import activation_patterns, nearest_examples

    docs = ["The committee met on Tuesday to discuss the budget for the coming year.",
            "Rivers carry water from the mountains to the sea, and feed farms.",
            "Coffee was first grown in Ethiopia and Yemen, then carried across the sea."]
    scan = dl.scan(tiny_model, [OBJ], docs, tokens=40, window=5, top_k=6, per_document=2, cache=False, progress=False)
    near = nearest_examples(tiny_model, modes, scan, k=3)
    assert len(near) == len(modes)
    top = scan.top(0)
    for i, frame in enumerate(near):
        assert len(frame) == 3 and list(frame.similarity) == sorted(frame.similarity, reverse=True)
        # independently: a neuron reads one direction everywhere (its own unit), so the similarity is the mean
        # of 1 and the cosine of the mode's pattern with each example's, centered on the examples' mean
        ex = activation_patterns(tiny_model, OBJ, [[0, *map(int, ids)] for ids in top["ids"]])
        mode = activation_patterns(tiny_model, OBJ, [[0, *map(int, modes.best(i)["ids"])]])
        mean = ex.mean(0, keepdim=True)
        cos = torch.nn.functional.cosine_similarity(mode - mean, ex - mean, dim=-1)
        np.testing.assert_allclose(frame.similarity.to_numpy(), (1 + np.sort(cos.numpy())[::-1][:3]) / 2, rtol=1e-5, atol=1e-6)
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


# ---------------------------------------------------------------------------------------------
# Where later modes start: the top example least like the earlier modes (readouts and patterns)

MAX_OBJ = "max(blocks.1.mlp.hook_post[3], 2*blocks.1.mlp.hook_post[5])"
DOCS = ["The committee met on Tuesday to discuss the budget for the coming year.",
        "Rivers carry water from the mountains to the sea, and feed farms.",
        "Coffee was first grown in Ethiopia and Yemen, then carried across the sea.",
        "A quiet morning in the village began with bread, tea and the news from the harbour."]


@pytest.fixture(scope="module")
def max_scan(tiny_model):
    return dl.scan(tiny_model, [MAX_OBJ], DOCS, tokens=50, window=5, top_k=10, per_document=3, cache=False, progress=False)


def test_readouts_follow_the_larger_term_of_a_max(tiny_model):
    from dreamlens.analysis.patterns import readouts

    prompts = [[0, 11, 12, 13, 14], [0, 40, 41, 42, 43], [0, 7, 99, 3, 18], [0, 5, 5, 5, 5]]
    pats, reads = readouts(tiny_model, MAX_OBJ, prompts)
    _, cache = tiny_model.run_with_cache(torch.tensor(prompts), names_filter="blocks.1.mlp.hook_post")
    last = cache["blocks.1.mlp.hook_post"][:, -1].float()
    torch.testing.assert_close(pats, last)
    for row, a in zip(reads, last):
        want = torch.zeros_like(a)
        if float(a[3]) >= 2 * float(a[5]):
            want[3] = 1.0
        else:
            want[5] = 2.0
        torch.testing.assert_close(row, want)


def test_pattern_similarity_is_the_mean_of_two_cosines():
    from dreamlens.analysis.patterns import pattern_similarity

    g = torch.Generator().manual_seed(0)
    a = (torch.randn(3, 6, generator=g), torch.randn(3, 4, generator=g))
    b = (torch.randn(2, 6, generator=g), torch.randn(2, 4, generator=g))
    center = torch.randn(6, generator=g)
    sim = pattern_similarity(a, b, center)
    for i in range(3):
        for j in range(2):
            cos_a = torch.nn.functional.cosine_similarity(a[0][i] - center, b[0][j] - center, dim=0)
            cos_r = torch.nn.functional.cosine_similarity(a[1][i], b[1][j], dim=0)
            assert float(sim[i, j]) == pytest.approx(float(cos_a + cos_r) / 2, abs=1e-6)


def test_a_later_mode_starts_from_the_example_least_like_the_earlier(tiny_model, max_scan):
    from dreamlens.analysis.patterns import pattern_similarity, readouts
    from dreamlens.analysis.scan import example_spans
    from dreamlens.scoring import make_layout

    budget = 3000
    settings = ModeSettings(limit=50.0)
    m = dl.dream(tiny_model, MAX_OBJ, "epo", modes=2, examples=max_scan, progress=False, max_token_forwards=budget,
                 mode_settings=settings, **{**EPO, "iters": 50})
    first, second = m.found.index(1), m.found.index(2)
    assert m.starts[first] == "random"
    spans = example_spans(max_scan, 0, EPO["length"])
    assert len(spans) > 2
    label = re.fullmatch(r"example (\d+)(?: \((\d+) banned tokens? replaced\))?", m.starts[second])
    assert label, m.starts[second]
    rank, replaced = int(label[1]), int(label[2] or 0)
    example = dict(spans)[rank]
    start = tuple(m[second].config["init_ids"])
    assert not set(start) & set(m.banned[second]), "a later mode started from a banned token"
    changed = [i for i, (a, b) in enumerate(zip(example, start)) if a != b]
    assert changed == [i for i, t in enumerate(example) if t in set(m.banned[second])] and len(changed) == replaced
    # independently of Starts: the example of lowest similarity to mode 1's best prompt (all retokenize here,
    # and all are as fluent as the limit)
    layout = make_layout(tiny_model, EPO["length"])
    ex = readouts(tiny_model, MAX_OBJ, layout.assemble(torch.tensor([s for _, s in spans])).tolist())
    mine = readouts(tiny_model, MAX_OBJ, layout.assemble(torch.tensor([list(map(int, m.best(first)["ids"]))])).tolist())
    sim = pattern_similarity(ex, mine, ex[0].mean(dim=0))[:, 0]
    assert spans[int(sim.argmin())][0] == rank
    # the budget leaves room for the attribution and for the examples' patterns
    cost = attribution_cost(layout.seq_len, EPO["length"], settings.n_alternatives)
    # every example's two passes, mode 1's best prompt's, and at most one pass per token of the examples tried
    patterns = layout.seq_len * (2 * len(spans) + 1 + 3 * EPO["length"])
    assert m[second].config["max_token_forwards"] == budget - cost - patterns
    assert m.attribution_token_forwards == cost + patterns


def test_starts_replace_banned_tokens_by_the_models_best_allowed_guess(tiny_model, max_scan):
    from dreamlens.analysis.scan import example_spans
    from dreamlens.modes.starts import Starts
    from dreamlens.optim.config import EPOConfig
    from dreamlens.scoring import banned_mask

    spans = example_spans(max_scan, 0, 5, k=3)
    (r0, s0), _, _ = spans
    cfg = EPOConfig(length=5)
    starts = Starts(tiny_model, dl.objective(MAX_OBJ), cfg, spans)
    assert starts.pick([], cfg) == (r0, list(s0), 0)  # nothing to be unlike, nothing banned: the best example as it is
    bans = dataclasses.replace(cfg, banned_tokens=(s0[1], s0[3]))
    rank, span, n = starts.pick([], bans)
    assert (rank, n) == (r0, 2) and span[0] == s0[0] and span[2] == s0[2] and span[4] == s0[4]
    # independently: left to right, the model's most likely token that is not banned, after what precedes it
    mask = banned_mask(tiny_model, extra=bans.banned_tokens)
    want = list(s0)
    for pos in (1, 3):
        logits = tiny_model(torch.tensor([[0, *want]]))[0, pos].detach()  # position pos predicts token pos of the span
        logits[mask] = float("-inf")
        want[pos] = int(logits.argmax())
    assert span == want and not set(span) & {s0[1], s0[3]}
    with pytest.raises(dl.DreamError, match="has 3 tokens but the dream has 5"):
        Starts(tiny_model, dl.objective(MAX_OBJ), cfg, [(0, (1, 2, 3))])


def test_examples_start_an_ordinary_dream_and_short_windows_are_named(tiny_model, max_scan):
    r = dl.dream(tiny_model, MAX_OBJ, "epo", examples=max_scan, progress=False, **{**EPO, "iters": 0})
    spans = {tuple(list(ids)[-EPO["length"]:]) for ids in max_scan.top(0)["ids"] if len(ids) >= EPO["length"]}
    assert {tuple(p) for p in r.config["init_prompts"]} == spans  # without modes= the dream starts from them
    for modes in (2, None):
        with pytest.raises(dl.DreamError, match="scan with window >= 8"):
            dl.dream(tiny_model, MAX_OBJ, "epo", modes=modes, examples=max_scan, progress=False, **{**EPO, "length": 8})
    with pytest.raises(dl.DreamError, match="mode_settings= applies only with modes"):
        dl.dream(tiny_model, MAX_OBJ, "epo", mode_settings=ModeSettings(), progress=False, **EPO)


def test_modes_of_format_1_load_with_random_starts(tmp_path, modes):
    import json

    modes.save(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "modes.json").read_text())
    meta["version"] = 1
    del meta["starts"]
    (tmp_path / "m" / "modes.json").write_text(json.dumps(meta))
    back = Modes.load(tmp_path / "m")
    assert back.starts == ["random"] * len(modes) and back.found == modes.found


def test_starts_prefer_examples_as_fluent_as_the_limit(tiny_model, max_scan):
    from dreamlens.analysis.scan import example_spans
    from dreamlens.modes.starts import Starts
    from dreamlens.optim.config import EPOConfig
    from dreamlens.scoring import make_layout, score

    spans = example_spans(max_scan, 0, 5)
    cfg = EPOConfig(length=5)
    _, xe = score(tiny_model, [dl.objective(MAX_OBJ)], torch.tensor([s for _, s in spans]), make_layout(tiny_model, 5))
    earlier = [torch.tensor(spans[0][1])]
    anywhere = Starts(tiny_model, dl.objective(MAX_OBJ), cfg, spans, limit=1e9).pick(earlier, cfg)
    none_fluent = Starts(tiny_model, dl.objective(MAX_OBJ), cfg, spans, limit=float(xe.min()) - 1).pick(earlier, cfg)
    assert none_fluent == anywhere  # no example is that fluent: every allowed one may be the start
    j = int(xe.argmin())
    only = Starts(tiny_model, dl.objective(MAX_OBJ), cfg, spans, limit=float(xe.min()) + 1e-6).pick(earlier, cfg)
    assert only == (spans[j][0], list(spans[j][1]), 0) and only != anywhere  # the filter, not chance, picked it


def test_the_budget_rule_is_the_most_any_later_mode_is_charged():
    """One rule (`modes.budget`) for dream_modes and sweeps: each later mode is charged the attribution and,
    with examples, choosing its start; the check covers the most any later mode is charged."""
    from dreamlens.modes.budget import check_mode_budget, most_separation, separation_cost, starts_cost

    s = ModeSettings()
    attribution = attribution_cost(7, 5, s.n_alternatives)
    assert separation_cost(7, 5, s, 1) == separation_cost(7, 5, s, 3) == attribution
    assert separation_cost(7, 5, s, 2, n_examples=4) == attribution + starts_cost(7, 4, 2, 5)
    assert most_separation(7, 5, s, 1, n_examples=4) == 0
    assert most_separation(7, 5, s, 3, n_examples=4) == attribution + starts_cost(7, 4, 1, 5)
    # with no examples to read, a late mode's share of the earlier modes' prompts outgrows the first's
    assert most_separation(7, 5, s, 9, n_examples=0) == separation_cost(7, 5, s, 8, n_examples=0)
    need = most_separation(7, 5, s, 2, n_examples=4)
    check_mode_budget(need + 1, 7, 5, s, 2, 4, fix="raise it")
    check_mode_budget(None, 7, 5, s, 2, 4, fix="raise it")
    check_mode_budget(1, 7, 5, s, 1, 4, fix="raise it")
    with pytest.raises(dl.DreamError, match=rf"a budget of {need} token-forwards leaves nothing .*4 top examples\); raise it"):
        check_mode_budget(need, 7, 5, s, 2, 4, fix="raise it")


def test_the_mode_options_are_checked_in_one_place():
    from dreamlens.modes.settings import check_mode_count, check_mode_limit, check_needs_modes
    from dreamlens.sweeps.store import SweepError

    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(dl.DreamError, match="modes must be a positive integer"):
            check_mode_count(bad)
    check_mode_count(np.int64(3))
    for bad in (0, -1.0, float("nan"), "6", None):
        with pytest.raises(dl.DreamError, match="limit must be a positive number"):
            check_mode_limit(bad)
    check_mode_limit(float("inf"))
    with pytest.raises(SweepError, match="mode_limit must be a positive number"):
        check_mode_limit(float("inf"), name="mode_limit", finite=True, error=SweepError)
    for modes in (2, 5):
        check_needs_modes(modes, {"--mode-limit": 5.0}, modes_name="--modes ")
    check_needs_modes(None, {"--mode-limit": None})
    for modes in (None, 1):
        with pytest.raises(SweepError, match=r"--mode-limit applies only with --modes K .*pass --modes 2 \(or more\)"):
            check_needs_modes(modes, {"--mode-scan-tokens": None, "--mode-limit": 5.0}, modes_name="--modes ",
                              error=SweepError)
    with pytest.raises(dl.DreamError, match="n_key must be a positive integer"):
        ModeSettings(n_key=0).validate()
