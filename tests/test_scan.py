"""The scan (top examples, statistics, scoring, cache, bad inputs) against brute force, and compare."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from dreamlens.analysis import scan as scan_mod
from dreamlens.analysis.compare import compare
from dreamlens.analysis.errors import ScanCacheError, ScanError
from dreamlens.analysis.scan import STAT_QUANTILES, ScanResult, position_values, scan
from dreamlens.models import encode
from dreamlens.objectives import Direction, Neuron, ObjectiveError, objective

WINDOW, BUDGET, TOP_K, PER_DOC = 8, 120, 6, 2

DOCS = [
    "The committee met on Tuesday to discuss the budget for the coming year, and the members agreed "
    "that spending on schools and roads should rise while the army would stay the same size.",
    "Rivers carry water from the mountains to the sea. Along the way they cut valleys, feed farms, "
    "and give cities a reason to exist; many of the oldest towns stand on their banks.",
    "In 1812 the war began, and the young nation found itself fighting a much larger power at sea "
    "and on land. The President asked Congress for money, ships and soldiers.",
    "short",
    "A violin has four strings tuned in fifths. Players press the strings against the fingerboard "
    "and draw a bow across them; the body of the instrument makes the sound louder and warmer.",
    "Coffee was first grown in Ethiopia and Yemen. Traders carried it across the Red Sea, and by the "
    "seventeenth century coffee houses had opened in London, Paris and Vienna.",
]


def _objectives(model):
    g = torch.Generator().manual_seed(1)
    v = torch.randn(model.cfg.d_model, generator=g)
    return [
        Neuron("blocks.0.mlp.hook_post", 3),
        objective("blocks.1.hook_resid_post[5]@max"),
        Direction("blocks.1.hook_resid_post", v),
        objective('logit[" the"]'),
    ]


def _brute_values(model, objs, chunks):
    """Every objective at every position, each position its own forward of BOS + the chunk up to it,
    read straight from TransformerLens's cache (no dreamlens code): [n_obj, n_chunks, window]."""
    ids = torch.tensor([c[2] for c in chunks])
    out = torch.zeros(len(objs), len(chunks), WINDOW)
    for p in range(WINDOW):
        toks = torch.cat([torch.zeros(len(chunks), 1, dtype=torch.long), ids[:, : p + 1]], dim=1)
        with torch.no_grad():
            logits, cache = model.run_with_cache(toks)
        out[0, :, p] = cache["blocks.0.mlp.hook_post"][:, -1, 3]
        out[1, :, p] = cache["blocks.1.hook_resid_post"][:, -1, 5]
        out[2, :, p] = cache["blocks.1.hook_resid_post"][:, -1] @ objs[2].vector
        out[3, :, p] = logits[:, -1, encode(model, " the")[0]]
    return out


def _brute_chunks(model, docs, window, budget):
    out, produced = [], 0
    for d, text in enumerate(docs):
        ids = encode(model, text)
        for i in range(0, len(ids) - window + 1, window):
            if produced >= budget:
                return out
            produced += window
            out.append((d, i, ids[i : i + window]))
    return out


def _greedy(values, chunks, k, cap):
    """Brute-force top examples: each chunk's max position, best first, at most `cap` per document."""
    cmax, carg = values.max(dim=1)
    order = sorted(range(len(chunks)), key=lambda j: (-float(cmax[j]), j))
    per_doc, kept = {}, []
    for j in order:
        d = chunks[j][0]
        if per_doc.get(d, 0) < cap:
            per_doc[d] = per_doc.get(d, 0) + 1
            kept.append((d, chunks[j][1] + int(carg[j]), float(cmax[j])))
        if len(kept) == k:
            break
    return kept


@pytest.fixture(scope="module")
def scanned(tiny_model):
    objs = _objectives(tiny_model)
    res = scan(tiny_model, objs, DOCS, tokens=BUDGET, window=WINDOW, top_k=TOP_K, per_document=PER_DOC,
               batch_size=7, cache=False, progress=False)
    return objs, res


def test_top_k_and_stats_match_brute_force(tiny_model, scanned):
    objs, res = scanned
    chunks = _brute_chunks(tiny_model, DOCS, WINDOW, BUDGET)
    assert res.meta["n_tokens"] == len(chunks) * WINDOW
    brute = _brute_values(tiny_model, objs, chunks)
    for i in range(len(objs)):
        v = brute[i].numpy().ravel().astype(np.float64)
        row = res.stats.iloc[i]
        assert row["objective"] == str(objs[i])
        assert row["max"] == pytest.approx(v.max(), abs=1e-5)
        assert row["min"] == pytest.approx(v.min(), abs=1e-5)
        assert row["mean"] == pytest.approx(v.mean(), abs=1e-5)
        assert row["frac_active"] == pytest.approx((v > 0).mean(), abs=1.5 / len(v))
        for col, q in STAT_QUANTILES.items():
            exact = np.quantile(v, q, method="lower")
            assert abs(row[col] - exact) <= 0.005 * abs(exact) + 1e-5, (col, row[col], exact)

        want = _greedy(brute[i], chunks, TOP_K, PER_DOC)
        top = res.top(i)
        assert list(zip(top["doc"], top["pos"])) == [(d, p) for d, p, _ in want]
        np.testing.assert_allclose(top["scan_activation"], [v for *_, v in want], atol=1e-5)
        assert top["doc"].value_counts().max() <= PER_DOC
        for _, r in top.iterrows():  # the window ends at the max position, inside its document
            doc_ids = encode(tiny_model, DOCS[r["doc"]])
            assert r["ids"] == doc_ids[max(0, r["pos"] - WINDOW + 1) : r["pos"] + 1]


def test_examples_are_scored_like_dreams(tiny_model, scanned):
    objs, res = scanned
    ex = res.examples
    assert ex["xe"].notna().all() and ex["activation"].notna().all()
    for length in ex["ids"].map(len).unique():  # one independent forward per window length
        rows = ex[ex["ids"].map(len) == length]
        toks = torch.tensor([[0] + w for w in rows["ids"]])
        with torch.no_grad():
            logits, cache = tiny_model.run_with_cache(toks)
        xe = F.cross_entropy(logits[:, :-1].transpose(1, 2), toks[:, 1:], reduction="none").mean(dim=1)
        resid = cache["blocks.1.hook_resid_post"]
        acts = torch.stack([
            cache["blocks.0.mlp.hook_post"][:, -1, 3],
            resid[:, 1:, 5].max(dim=1).values,  # '@max': a dream reduces over its prompt, start token excluded
            resid[:, -1] @ objs[2].vector,
            logits[:, -1, encode(tiny_model, " the")[0]],
        ])
        o = rows["objective"].to_numpy()
        np.testing.assert_allclose(rows["xe"], xe.numpy(), atol=1e-4)
        np.testing.assert_allclose(rows["activation"], acts[torch.tensor(o), torch.arange(len(rows))].numpy(), atol=1e-4)
    whole = ex[(ex["pos"] % WINDOW == WINDOW - 1) & (ex["objective"] != 1)]  # examples that are their scan window
    assert len(whole) > 0
    np.testing.assert_allclose(whole["activation"], whole["scan_activation"], atol=1e-4)


def test_cache_hit_and_corrupt_rebuild(tiny_model, tmp_path, monkeypatch):
    obj = Neuron("blocks.0.mlp.hook_post", 7)
    kw = dict(tokens=160, window=WINDOW, top_k=3, cache=tmp_path, progress=False)
    first = scan(tiny_model, [obj], DOCS, **kw)
    assert not first.from_cache
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert {p.name for p in folder.iterdir()} == {"scan.json", "stats.parquet", "examples.parquet", "sketch.parquet"}

    with monkeypatch.context() as m:  # no forward pass over the corpus on a cache hit
        m.setattr(scan_mod, "position_values", lambda *a, **k: pytest.fail("a cache hit must not scan"))
        hit = scan(tiny_model, [obj], DOCS, **kw)
    assert hit.from_cache
    pd.testing.assert_frame_equal(hit.stats, first.stats)
    pd.testing.assert_frame_equal(hit.top(0), first.top(0))
    np.testing.assert_array_equal(hit.sketch.quantile(0.7), first.sketch.quantile(0.7))

    for victim, garbage in (("examples.parquet", b"not parquet"), ("scan.json", b'{"format": 1, "dig')):
        (folder / victim).write_bytes(garbage)
        with pytest.warns(UserWarning, match="scanning again"):
            again = scan(tiny_model, [obj], DOCS, **kw)
        assert not again.from_cache
        pd.testing.assert_frame_equal(again.top(0), first.top(0))
        assert ScanResult.load(folder).objectives == [str(obj)]  # rebuilt and readable

    # a tampered but well-formed file is caught by its checksum
    stats = pd.read_parquet(folder / "stats.parquet")
    stats.loc[0, "max"] = 1e9
    stats.to_parquet(folder / "stats.parquet", index=False)
    with pytest.raises(ScanCacheError, match="checksum"):
        ScanResult.load(folder)

    # another budget, other texts, another objective: other cache entries
    scan(tiny_model, [obj], DOCS, score=False, **{**kw, "tokens": 80})
    scan(tiny_model, [obj], DOCS[:4], score=False, **{**kw, "tokens": 80})
    scan(tiny_model, [Neuron("blocks.0.mlp.hook_post", 8)], DOCS, score=False, **kw)
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 4


def test_unscored_cache_is_scored_on_demand(tiny_model, tmp_path):
    obj = Neuron("blocks.0.mlp.hook_post", 7)
    kw = dict(tokens=80, window=WINDOW, top_k=2, cache=tmp_path, progress=False)
    raw = scan(tiny_model, [obj], DOCS, score=False, **kw)
    assert raw.top(0)["xe"].isna().all()
    done = scan(tiny_model, [obj], DOCS, **kw)
    assert done.from_cache and done.top(0)["xe"].notna().all()


def test_bad_inputs(tiny_model, tmp_path):
    obj = Neuron("blocks.0.mlp.hook_post", 3)
    kw = dict(cache=False, progress=False)
    with pytest.raises(ScanError, match="gave no window of 8 tokens"):
        scan(tiny_model, [obj], [], window=8, **kw)
    with pytest.raises(ScanError, match="shorter than 8 tokens"):
        scan(tiny_model, [obj], ["tiny", "also tiny"], window=8, **kw)
    with pytest.raises(ScanError, match="does not fit the model's context of 64 tokens.*window <= 63"):
        scan(tiny_model, [obj], DOCS, window=64, **kw)
    with pytest.raises(ScanError, match="tokens must be an integer >= 1, got 0"):
        scan(tiny_model, [obj], DOCS, tokens=0, **kw)
    with pytest.raises(ScanError, match="no objectives"):
        scan(tiny_model, [], DOCS, **kw)
    with pytest.raises(ObjectiveError, match="out of range"):
        scan(tiny_model, ["blocks.0.mlp.hook_post[999]"], DOCS, **kw)
    with pytest.raises((ScanError, ObjectiveError)):
        scan(tiny_model, [Neuron("blocks.0.attn.hook_pattern", (0, -1, 0))], DOCS, **kw)
    with pytest.raises(ScanCacheError, match="no saved scan"):
        ScanResult.load(tmp_path / "nothing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "scan.json").write_text("{")
    with pytest.raises(ScanCacheError, match="unreadable"):
        ScanResult.load(tmp_path / "bad")


def test_many_objectives_one_pass(tiny_model, monkeypatch):
    """256 neurons cost one forward per batch, and each equals its own single-objective scan."""
    calls = []
    real = scan_mod.position_values
    monkeypatch.setattr(scan_mod, "position_values", lambda *a, **k: calls.append(1) or real(*a, **k))
    objs = [Neuron("blocks.0.mlp.hook_post", i % 128) for i in range(256)]
    many = scan(tiny_model, objs, DOCS, tokens=160, window=WINDOW, top_k=2, batch_size=64, score=False,
                cache=False, progress=False)
    assert len(calls) == 1
    one = scan(tiny_model, [objs[5]], DOCS, tokens=160, window=WINDOW, top_k=2, score=False, cache=False, progress=False)
    np.testing.assert_allclose(many.stats.iloc[[5]][["max", "mean", "q90"]].to_numpy(),
                               one.stats[["max", "mean", "q90"]].to_numpy(), rtol=1e-6)
    assert many.top(5)["pos"].tolist() == one.top(0)["pos"].tolist()


def test_neuron_gather_equals_generic_path(tiny_model):
    toks = torch.tensor([[0] + encode(tiny_model, DOCS[0])[:10]])
    for hook, idx in (("blocks.1.attn.hook_z", (1, 2)), ("blocks.0.mlp.hook_post", 17)):
        fast, generic = Neuron(hook, idx), 1.0 * Neuron(hook, idx)  # a combination takes the generic path
        v = position_values(tiny_model, [fast, generic], toks, skip=1)
        assert v.shape == (2, 1, 10)
        torch.testing.assert_close(v[0], v[1])


def test_sae_latents_share_one_encoding(tiny_model):
    sae_lens = pytest.importorskip("sae_lens")
    from sae_lens.saes.sae import SAEMetadata

    from dreamlens.objectives import SAELatent

    hook = "blocks.0.hook_resid_post"
    sae = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=64, d_sae=32, metadata=SAEMetadata(hook_name=hook)))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
    objs = [SAELatent(sae, i) for i in (0, 5, 31)] + [SAELatent(sae, 5, pre_activation=True)]
    res = scan(tiny_model, objs, DOCS, tokens=48, window=WINDOW, top_k=2, score=False, cache=False, progress=False)
    chunks = _brute_chunks(tiny_model, DOCS, WINDOW, 48)
    toks = torch.tensor([[0] + c[2] for c in chunks])
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(toks, names_filter=hook)
        x = cache[hook][:, 1:]
        post = sae.encode(x)
        pre = x @ sae.W_enc + sae.b_enc - (sae.b_dec @ sae.W_enc if sae.cfg.apply_b_dec_to_input else 0)
    want = torch.stack([post[..., 0], post[..., 5], post[..., 31], pre[..., 5]])
    np.testing.assert_allclose(res.stats["max"], want.amax(dim=(1, 2)).numpy(), atol=1e-4)
    np.testing.assert_allclose(res.stats["mean"], want.mean(dim=(1, 2)).numpy(), atol=1e-4)


def _stand_in_dream(name, activation, xe):
    """A DreamResult (or, without dreamlens.results, an object with its `objective` and `frontier`)."""
    n = len(xe)
    try:
        from dreamlens.results import DreamResult
    except ImportError:
        frontier = pd.DataFrame({"text": [f"dream {i}" for i in range(n)], "ids": [[1, 2]] * n,
                                 "activation": activation, "xe": xe})
        return SimpleNamespace(objective=name, frontier=frontier)
    return DreamResult(objective=name, method="stand-in", config={"length": 2}, ids=np.ones((n, 2), dtype=np.int64),
                       activation=np.asarray(activation, dtype=float), xe=np.asarray(xe, dtype=float),
                       iteration=np.zeros(n, dtype=np.int64), text=[f"dream {i}" for i in range(n)])


def test_compare_table_figure_and_files(scanned, tmp_path):
    objs, res = scanned
    top = res.top(0)
    hi = float(top["activation"].max())
    dream = _stand_in_dream(str(objs[0]), [hi * 0.5, hi * 2.0], [2.0, float(top["xe"].median())])
    comp = compare(dream, res)
    t = comp.table
    assert list(t["source"]).count("dream") == 2 and list(t["source"]).count("dataset") == len(top)
    assert {"text", "activation", "xe", "ratio", "percentile", "beats_dataset"} <= set(t.columns)
    assert t.loc[1, "beats_dataset"] and not t.loc[0, "beats_dataset"]
    assert comp.summary["beats_dataset"] is True
    assert comp._repr_png_()[:8] == b"\x89PNG\r\n\x1a\n"
    png = comp.save(tmp_path)
    assert png.is_file() and (tmp_path / "comparison.csv").is_file()
    assert json.loads((tmp_path / "comparison.json").read_text())["objective"] == str(objs[0])
    # the scan's objective is found by name; a name it lacks needs objective_index
    assert compare(_stand_in_dream(str(objs[2]), [1.0], [3.0]), res).summary["objective"] == str(objs[2])
    with pytest.raises(ValueError, match="objective_index"):
        compare(_stand_in_dream("blocks.0.mlp.hook_post[99]", [1.0], [3.0]), res)
    with pytest.raises(TypeError, match="frontier"):
        compare(object(), res)


def test_cli_scan_and_compare(tiny_model, tmp_path, monkeypatch, capsys):
    from dreamlens import cli, models

    monkeypatch.setattr(models, "load_model", lambda name=None, **k: tiny_model)
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(DOCS))
    out = tmp_path / "scan"
    rc = cli.main(["scan", "blocks.0.mlp.hook_post[3]", "blocks.1.hook_resid_post[0]", "--tokens", "96",
                   "--window", "8", "--top-examples", "3", "--corpus", str(text), "--out", str(out), "--no-cache"])
    assert rc == 0 and ScanResult.load(out).objectives[1] == "blocks.1.hook_resid_post[0]"
    assert "top examples of blocks.0.mlp.hook_post[3]" in capsys.readouterr().out

    pytest.importorskip("dreamlens.results")
    _stand_in_dream("blocks.0.mlp.hook_post[3]", [0.1, 0.3], [4.0, 6.0]).save(tmp_path / "dream")
    assert cli.main(["compare", str(tmp_path / "dream"), str(out)]) == 0
    assert (tmp_path / "dream" / "comparison.png").is_file()


@pytest.mark.integration
def test_embedded_neuron_scan(embedded_model, tmp_path):
    obj = "blocks.6.mlp.hook_post[100]"
    res = scan(embedded_model, [obj], None, tokens=768, window=16, top_k=4, cache=tmp_path, progress=False)
    assert res.meta["n_tokens"] == 768 and res.stats.loc[0, "max"] >= res.stats.loc[0, "q99"]
    r = res.top(0).iloc[0]
    toks = torch.tensor([[0] + r["ids"]])
    with torch.no_grad():
        logits, cache = embedded_model.run_with_cache(toks, names_filter="blocks.6.mlp.hook_post")
    assert r["activation"] == pytest.approx(cache["blocks.6.mlp.hook_post"][0, -1, 100].item(), abs=1e-3)
    assert r["xe"] == pytest.approx(F.cross_entropy(logits[0, :-1], toks[0, 1:]).item(), abs=1e-3)
    assert 0 < r["xe"] < 15 and math.isfinite(r["activation"])
    assert scan(embedded_model, [obj], None, tokens=768, window=16, top_k=4, cache=tmp_path, progress=False).from_cache
