"""Token attribution: values against direct re-evaluation, alternatives, errors, and safe rendering."""

import html
import re

import numpy as np
import pytest
import torch

import dreamlens as dl
from dreamlens import scoring
from dreamlens.analysis.attribution import Attribution, attribute_frontier
from dreamlens.analysis.errors import AttributionError
from dreamlens.models import encode
from dreamlens.results import DreamResult
from dreamlens.viz.attribution import token_view, tooltips

OBJ = "blocks.1.mlp.hook_post[3]"
TEXT = "The cat sat on the mat"


@pytest.fixture(scope="module")
def attr(tiny_model):
    return dl.attribute(tiny_model, OBJ, TEXT, n_gradient=3, n_random=3, seed=1)


def direct(model, rows, prefix="", suffix=""):
    """The objective on [start token] + prefix + ids + suffix for each row, straight from TransformerLens's
    cache (no dreamlens code): the neuron at the last position."""
    head = [0] + (encode(model, prefix) if prefix else [])
    tail = encode(model, suffix) if suffix else []
    tokens = torch.tensor([head + list(r) + tail for r in rows])
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter="blocks.1.mlp.hook_post")
    return cache["blocks.1.mlp.hook_post"][:, -1, 3].double().numpy()


def swaps(ids, alt_ids):
    """Every prompt with one token swapped, in the order of `alt_ids` ([position, alternative])."""
    rows = []
    for p in range(len(ids)):
        for t in alt_ids[p]:
            rows.append(list(ids[:p]) + [int(t)] + list(ids[p + 1 :]))
    return rows


def test_values_match_direct_reevaluation_of_swapped_prompts(tiny_model, attr):
    ids = encode(tiny_model, TEXT)
    assert attr.ids.tolist() == ids and attr.length == len(ids)
    assert attr.value == pytest.approx(direct(tiny_model, [ids])[0], abs=1e-5)
    expect = direct(tiny_model, swaps(ids, attr.alt_ids)).reshape(attr.alt_values.shape)
    np.testing.assert_allclose(attr.alt_values, expect, atol=1e-5)
    np.testing.assert_allclose(attr.drop_best, attr.value - attr.alt_values.max(axis=1))
    np.testing.assert_allclose(attr.drop_worst, attr.value - attr.alt_values.min(axis=1))
    assert np.all(attr.drop_worst >= attr.drop_best)


def test_xe_matches_core_score(tiny_model, attr):
    layout = scoring.make_layout(tiny_model, attr.length)
    swapped = torch.tensor(attr.ids).repeat(2, 1)
    swapped[1, 2] = int(attr.alt_ids[2, 0])
    _, xe = scoring.score(tiny_model, [dl.objective(OBJ)], swapped, layout)
    assert attr.xe == pytest.approx(float(xe[0]), abs=1e-4)
    assert attr.alt_xe[2, 0] == pytest.approx(float(xe[1]), abs=1e-4)


def test_prefix_and_suffix_are_context_like_in_dreams(tiny_model):
    a = dl.attribute(tiny_model, OBJ, " sat on", prefix="A dog", suffix=" the mat", n_gradient=2, n_random=1)
    ids = encode(tiny_model, " sat on")
    assert a.value == pytest.approx(direct(tiny_model, [ids], "A dog", " the mat")[0], abs=1e-5)
    expect = direct(tiny_model, swaps(ids, a.alt_ids), "A dog", " the mat").reshape(a.alt_values.shape)
    np.testing.assert_allclose(a.alt_values, expect, atol=1e-5)
    assert a.prefix_tokens and a.suffix_tokens
    assert len(token_view(a).tokens) == len(a.prefix_tokens) + a.length + len(a.suffix_tokens)


def test_alternatives_are_gradient_picks_then_distinct_allowed_random_tokens(tiny_model, attr):
    banned = scoring.banned_mask(tiny_model, ascii_only=False)  # memoized on the model
    layout = scoring.make_layout(tiny_model, attr.length)
    ids = torch.from_numpy(attr.ids)[None]
    grad = scoring.token_gradients(tiny_model, [dl.objective(OBJ)], ids, layout, torch.zeros(1))[0][0]
    grad[:, banned] = float("inf")
    for p in range(attr.length):
        row = attr.alt_ids[p]
        assert attr.ids[p] not in row and len(set(row.tolist())) == len(row)
        assert not banned[torch.tensor(row)].any()
        g = grad[p].clone()
        g[attr.ids[p]] = float("inf")
        assert set(row[:3].tolist()) == set((-g).topk(3).indices.tolist())
    assert list(attr.sources) == ["gradient"] * 3 + ["random"] * 3
    again = dl.attribute(tiny_model, OBJ, TEXT, n_gradient=3, n_random=3, seed=1)
    other = dl.attribute(tiny_model, OBJ, TEXT, n_gradient=0, n_random=3, seed=2)
    np.testing.assert_array_equal(again.alt_ids, attr.alt_ids)
    assert other.alt_ids.shape == (attr.length, 3) and not np.array_equal(other.alt_ids, attr.alt_ids[:, 3:])


def test_tables(attr):
    df = attr.to_dataframe()
    assert list(df["token"]) == attr.tokens and len(df) == attr.length
    np.testing.assert_allclose(df["drop_best"], attr.drop_best)
    assert (df["best_value"] == attr.alt_values.max(axis=1)).all()
    long = attr.alternatives()
    assert len(long) == attr.alt_ids.size
    np.testing.assert_allclose(long["drop"], attr.value - attr.alt_values.reshape(-1))
    tips = tooltips(attr)
    assert len(tips) == attr.length and attr.alt_tokens[0][0].strip() in tips[0]


def test_bad_inputs(tiny_model):
    with pytest.raises(AttributionError, match="no tokens"):
        dl.attribute(tiny_model, OBJ, "")
    with pytest.raises(AttributionError, match="no tokens"):
        dl.attribute(tiny_model, OBJ, [])
    with pytest.raises(AttributionError, match="outside the vocabulary"):
        dl.attribute(tiny_model, OBJ, [5, 10**7])
    with pytest.raises(AttributionError, match="at least one alternative"):
        dl.attribute(tiny_model, OBJ, TEXT, n_gradient=0, n_random=0)
    with pytest.raises(dl.ObjectiveError, match="did you mean"):
        dl.attribute(tiny_model, "blocks.1.mlp.hook_pots[3]", TEXT)


def hostile() -> Attribution:
    toks = ["<script>alert(1)</script>", "<img src=x onerror=alert(2)>", "&amp;", '"q"', "</script><b>"]
    L, k = len(toks), 2
    return Attribution(
        objective=OBJ, text="".join(toks), ids=np.arange(L), tokens=toks, value=1.0, xe=3.0,
        alt_ids=np.zeros((L, k), dtype=np.int64), alt_tokens=[["</script>", "<!--"]] * L,
        alt_values=np.tile([0.5, -1.0], (L, 1)), alt_xe=np.ones((L, k)), n_gradient=1,
    )


def _frames(page: str) -> list[str]:
    """The documents of the page's circuitsvis views (each an iframe's srcdoc), unescaped."""
    return [html.unescape(d) for d in re.findall(r'<iframe class="dreamlens-view"[^>]*srcdoc="([^"]*)"', page)]


def _without_library(doc: str) -> str:
    """A view's document minus circuitsvis's inlined library (minified code, not ours)."""
    start = doc.find("var CircuitsVis=")
    call = doc.find("CircuitsVis.render(", start)
    return doc[:start] + doc[call:]


@pytest.mark.parametrize("kind", ["html", "render"])
def test_hostile_token_strings_are_escaped(kind):
    a = hostile()
    page = a.html() if kind == "html" else a.render().local_src
    # the page itself holds nothing but escaped text: every view is a document in an iframe's srcdoc
    outside = re.sub(r'srcdoc="[^"]*"', "", page)
    assert "<script" not in outside and "<img" not in outside and "<b>" not in outside
    (doc,) = _frames(page)
    ours = _without_library(doc)
    assert len(ours) < 20_000 and "CircuitsVis.ColoredTokens" in ours  # the library was cut, our part kept
    assert "<script>alert" not in ours and "<img" not in ours and "<!--" not in ours and "<b>" not in ours
    # tokens: HTML-escaped before circuitsvis gets them (it sets them as innerHTML)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in ours
    assert "&amp;amp;" in ours  # "&amp;" stays the five characters it is
    # hover texts are set as DOM text (title), as JSON made safe for <script> by jinja's tojson
    assert "\\u003c/script\\u003e" in ours
    assert ours.count("</script>") == ours.count("<script")
    cdn = _frames(a.render().cdn_src)[0]
    assert cdn.count("</script>") == cdn.count("<script")


def test_a_view_is_circuitsvis_output_unedited():
    view = token_view(hostile())
    rendered = view.circuitsvis()
    doc = view.document()
    # circuitsvis's HTML is in the document as it returned it, apart from its random element id
    same_id = lambda s: re.sub(r"circuits-vis-[0-9a-f-]+", "ID", s)
    assert same_id(rendered.local_src) in same_id(doc)


def test_frontier_attributions_use_the_results_context(tiny_model):
    ids = [encode(tiny_model, t) for t in (" a b c", " x y z", " one two three")]
    assert {len(i) for i in ids} == {3}
    r = DreamResult(
        objective=OBJ, method="epo", config={"length": 3}, ids=np.array(ids), activation=np.array([1.0, 2.0, 3.0]),
        xe=np.array([1.0, 2.0, 3.0]), iteration=np.zeros(3, dtype=int), text=["a", "b", "c"], prefix="Hi",
        bos_token_id=0,
    )
    attrs = attribute_frontier(tiny_model, r, max_prompts=2, n_gradient=1, n_random=1)
    assert len(attrs) == 2 and attrs[0].prefix == "Hi"
    assert [a.ids.tolist() for a in attrs] == [ids[0], ids[2]]  # the two ends of the frontier
    assert attrs[1].value == pytest.approx(direct(tiny_model, [ids[2]], "Hi")[0], abs=1e-5)
    r.bos_token_id = 1
    with pytest.raises(AttributionError, match="set_bos_token_id"):
        attribute_frontier(tiny_model, r)
