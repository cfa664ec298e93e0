"""Neuronpedia: each SAE's neuronpedia_id (sae-lens's directory, a folder's cfg.json, a loaded SAE), the
feature ids of an objective, the export read back and checked row by row against the stored sweep, dream
result and modes, the `export neuronpedia` command, and the report's link to the feature's page."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_error_line, run_cli

import dreamlens as dl
from dreamlens.errors import OutputError
from dreamlens.models import decode, encode
from dreamlens.modes.result import Modes
from dreamlens.neuronpedia.errors import NeuronpediaError
from dreamlens.neuronpedia.export import read_jsonl_gz
from dreamlens.neuronpedia.ids import Feature, export_feature, hook_source, neuronpedia_page
from dreamlens.sae import sae_neuronpedia_id

pytestmark = pytest.mark.usefixtures("one_thread")

DOCS = [
    "The committee met on Tuesday to discuss the budget for the coming year, and the members agreed "
    "that spending on schools and roads should rise while the army would stay the same size.",
    "Rivers carry water from the mountains to the sea. Along the way they cut valleys, feed farms, "
    "and give cities a reason to exist; many of the oldest towns stand on their banks.",
]
SPEC = "blocks.1.mlp.hook_post[0:3]"
RELEASE = "gpt2-small-res-jb/blocks.8.hook_resid_pre"  # listed in sae-lens's directory with a Neuronpedia id
SMALL = dict(method="epo", length=4, population=2, children=4, topk=16, progress=False)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A small sweep of three neurons of the tiny model (named by its factory, so the export can load it)."""
    out = tmp_path_factory.mktemp("np") / "sweep"
    return dl.sweep(SPEC, out, model="dreamlens.testing:tiny_model", max_token_forwards=600, corpus=DOCS,
                    scan=dl.ScanConfig(tokens=64, window=8, top_k=3, per_document=2), chunk_size=2, **SMALL)


@pytest.fixture(scope="module")
def dreamed(tiny_model):
    """A dream with a prefix and a suffix, and a scan of its objective."""
    obj = "blocks.1.mlp.hook_post[5]"
    r = dl.dream(tiny_model, obj, iters=3, prefix="Note:", suffix=" end", seed=1, **SMALL)
    scan = dl.scan(tiny_model, [obj], DOCS, tokens=64, window=6, top_k=3, per_document=2, progress=False)
    return r, scan


def batches(folder: Path, kind: str) -> list[list[dict]]:
    files = sorted((folder / kind).glob("batch-*.jsonl.gz"), key=lambda p: int(p.name.split("-")[1].split(".")[0]))
    assert [p.name for p in files] == [f"batch-{n}.jsonl.gz" for n in range(len(files))]
    return [read_jsonl_gz(p) for p in files]


def check_row(row: dict, model, feature: Feature, ids: list[int], activation: float, source: str, index: str) -> None:
    """One activation row against what it was made from: the tokens the model read, the value at the last."""
    assert (row["modelId"], row["layer"], row["index"]) == (feature.model_id, feature.source, str(feature.index))
    assert row["tokens"] == [decode(model, [t]) for t in ids]
    assert len(row["values"]) == len(ids) and row["values"][:-1] == [0.0] * (len(ids) - 1)
    assert math.isclose(row["values"][-1], activation, rel_tol=1e-6) and row["maxValue"] == row["values"][-1]
    assert row["maxValueTokenIndex"] == len(ids) - 1 and row["minValue"] == min(row["values"])
    assert (row["dataSource"], row["dataIndex"]) == (source, index)
    assert isinstance(row["id"], str) and row["id"][0].isalpha() and len(row["id"]) == 25


# ---------------------------------------------------------------------------------------------
# Ids


def test_each_saes_neuronpedia_id(tmp_path):
    assert sae_neuronpedia_id(RELEASE) == "gpt2-small/8-res-jb"  # sae-lens's directory, no network
    assert sae_neuronpedia_id("no-such-release/blocks.0") is None
    assert sae_neuronpedia_id(None) is None and sae_neuronpedia_id("embedded") is None  # the embedded SAE has none
    sae = dl.load_sae()
    assert sae_neuronpedia_id(sae) is None and dl.SAELatent(sae, 3).neuronpedia_id is None
    sae.cfg.metadata.neuronpedia_id = "smollm2-135m/10-test"  # what from_pretrained sets from the directory
    assert dl.SAELatent(sae, 3).neuronpedia_id == "smollm2-135m/10-test"
    sae.save_model(tmp_path / "mine")  # kept in the folder's cfg.json
    assert sae_neuronpedia_id(tmp_path / "mine") == "smollm2-135m/10-test"
    assert sae_neuronpedia_id(str(tmp_path / "mine")) == "smollm2-135m/10-test"
    assert dl.SAELatent(dl.load_sae(tmp_path / "mine"), 3).neuronpedia_id == "smollm2-135m/10-test"  # and loaded again
    assert export_feature(f"sae:{tmp_path / 'mine'}[3]", "m") == Feature("smollm2-135m", "10-test", 3)


def test_the_feature_an_objective_is_exported_as(tmp_path):
    assert export_feature(f"sae:{RELEASE}[42]", "gpt2") == Feature("gpt2-small", "8-res-jb", 42)
    assert export_feature("blocks.6.mlp.hook_post[123]", "SmolLM2-135M") == Feature("smollm2-135m", "6-mlp-hook-post", 123)
    assert export_feature("sae:embedded[7]", "smollm2-135m") == Feature("smollm2-135m", "10-embedded", 7)
    assert export_feature("blocks.6.mlp.hook_post[1]", "m", model_id="x", source="6-mine") == Feature("x", "6-mine", 1)
    assert hook_source("hook_embed") == "hook-embed" and hook_source("blocks.0.attn.hook_z") == "0-attn-hook-z"
    for spec, needle in (('logit[" Paris"]', "not one neuron or SAE latent"), ("blocks.1.mlp.hook_post[3]@max", "'@max'"),
                         ("blocks.1.attn.hook_z[1,2]", "2 indices"),
                         ("blocks.1.mlp.hook_post[1] + blocks.1.mlp.hook_post[2]", "not one neuron")):
        with pytest.raises(NeuronpediaError, match=needle):
            export_feature(spec, "m")
    with pytest.raises(NeuronpediaError, match="no Neuronpedia id.*--source-id"):
        export_feature("sae:some-org/some-repo/layer_3[1]", "m")


def test_the_page_the_report_links_to():
    assert neuronpedia_page(f"sae:{RELEASE}[42]").url == "https://www.neuronpedia.org/gpt2-small/8-res-jb/42"
    assert neuronpedia_page(f"sae_pre:{RELEASE}[42]@max") == Feature("gpt2-small", "8-res-jb", 42)
    assert neuronpedia_page("blocks.6.mlp.hook_post[123]") is None and neuronpedia_page("sae:embedded[1]") is None
    assert neuronpedia_page("logit[\" Paris\"]") is None


def test_the_report_links_the_features_page():
    n = 3
    ids = np.ones((n, 2), dtype=np.int64)
    r = dl.DreamResult(objective=f"sae:{RELEASE}[42]", method="epo", config={"length": 2}, ids=ids,
                       activation=np.array([1.0, 2.0, 3.0]), xe=np.array([3.0, 4.0, 5.0]),
                       iteration=np.zeros(n, dtype=np.int64), text=["a", "b", "c"])
    page = dl.build_report(r)
    assert '<a href="https://www.neuronpedia.org/gpt2-small/8-res-jb/42">' in page
    modes = Modes(objective=r.objective, dreams=[r], found=[1], key_tokens=[[]], banned=[[]])
    assert '<a href="https://www.neuronpedia.org/gpt2-small/8-res-jb/42">' in dl.build_modes_report(modes)
    r.objective = "blocks.1.mlp.hook_post[3]"
    assert "neuronpedia" not in dl.build_report(r).lower()


# ---------------------------------------------------------------------------------------------
# The export, read back


def test_a_sweep_exported_row_by_row(swept, tiny_model, tmp_path):
    folders = dl.export_neuronpedia(swept.folder, tmp_path / "np", batch_size=2)
    assert folders == [tmp_path / "np" / "tiny-llama" / "1-mlp-hook-post"]
    features, activations = batches(folders[0], "features"), batches(folders[0], "activations")
    assert [len(b) for b in features] == [2, 1] and len(activations) == 2  # batch N of rows: batch N's features
    bos = dl.bos_token_id(tiny_model)
    n_rows = 0
    for batch, rows in zip(features, activations):
        assert {r["index"] for r in rows} == {f["index"] for f in batch}
        for f in batch:
            i = int(f["index"])
            feature = Feature("tiny-llama", "1-mlp-hook-post", i)
            mine = [r for r in rows if r["index"] == f["index"]]
            top, front = swept.top(i), swept.frontier(i)
            assert len(mine) == len(top) + len(front) and len(top) and len(front)
            for row, (_, e) in zip(mine, top.iterrows()):  # the top examples first, in rank order
                check_row(row, tiny_model, feature, [bos, *e["ids"]], e["activation"], swept.config["corpus"],
                          str(e["doc"]))
            for rank, (row, (_, d)) in enumerate(zip(mine[len(top):], front.iterrows())):  # then the frontier
                check_row(row, tiny_model, feature, [bos, *d["ids"]], d["activation"], "dreamlens:epo", str(rank))
            assert f["maxActApprox"] == pytest.approx(float(top["activation"].max()))
            assert (f["modelId"], f["layer"], f["hasVector"]) == ("tiny-llama", "1-mlp-hook-post", False)
            n_rows += len(mine)
    assert n_rows == sum(len(b) for b in activations)
    assert len({r["id"] for b in activations for r in b}) == n_rows  # every row its own id


def test_a_dream_result_with_its_context_and_scan(dreamed, tiny_model, tmp_path):
    r, scan = dreamed
    r.save(tmp_path / "dream")
    scan.save(tmp_path / "dream" / "scan")  # where `dream --from-examples` keeps it: found without scan=
    (folder,) = dl.export_neuronpedia(tmp_path / "dream", tmp_path / "np", model=tiny_model, model_id="tiny")
    assert folder == tmp_path / "np" / "tiny" / "1-mlp-hook-post"
    ((f,),), (rows,) = batches(folder, "features"), batches(folder, "activations")
    feature = Feature("tiny", "1-mlp-hook-post", 5)
    top, front = scan.top(0), r.frontier
    assert len(rows) == len(top) + len(front)
    head, tail = [r.bos_token_id, *encode(tiny_model, "Note:")], encode(tiny_model, " end")
    for row, (_, e) in zip(rows, top.iterrows()):
        check_row(row, tiny_model, feature, [r.bos_token_id, *e["ids"]], e["activation"], scan.meta["corpus"], str(e["doc"]))
    for rank, (row, (_, d)) in enumerate(zip(rows[len(top):], front.iterrows())):
        check_row(row, tiny_model, feature, [*head, *d["ids"], *tail], d["activation"], "dreamlens:epo", str(rank))
        assert "".join(row["tokens"][1:]) == "Note:" + d["text"] + " end"
    assert f["maxActApprox"] == pytest.approx(float(top["activation"].max()))

    # dreams only (no scan), straight from the object
    (folder,) = dl.export_neuronpedia(r, tmp_path / "bare", model=tiny_model)
    ((f,),), (rows,) = batches(folder, "features"), batches(folder, "activations")
    assert [row["dataSource"] for row in rows] == ["dreamlens:epo"] * len(front)
    assert f["maxActApprox"] == pytest.approx(float(front["activation"].max()))


def test_modes_each_with_its_mode_in_data_source(dreamed, tiny_model, tmp_path):
    r, _ = dreamed
    modes = Modes(objective=r.objective, dreams=[r, r], found=[1, 2], key_tokens=[[], [5]], banned=[[], [5]])
    modes.save(tmp_path / "modes")
    (folder,) = dl.export_neuronpedia(tmp_path / "modes", tmp_path / "np", model=tiny_model)
    (rows,) = batches(folder, "activations")
    n = len(r.frontier)
    assert [row["dataSource"] for row in rows] == ["dreamlens:epo"] * n + ["dreamlens:epo:mode-2"] * n


def test_a_sweeps_objectives_that_are_no_feature_are_left_out(tiny_model, tmp_path):
    s = dl.sweep('blocks.1.mlp.hook_post[2]; logit[" the"]; blocks.0.mlp.hook_post[1]', tmp_path / "sweep",
                 model=tiny_model, max_token_forwards=300, corpus=DOCS, scan=dl.ScanConfig(tokens=64, window=8, top_k=2, per_document=2), chunk_size=2,
                 **SMALL)
    with pytest.warns(UserWarning, match=r"1 of the sweep's objectives .* left out.*not one neuron or SAE latent"):
        folders = dl.export_neuronpedia(s, tmp_path / "np", model=tiny_model)
    assert folders == [tmp_path / "np" / "tiny-llama" / "1-mlp-hook-post", tmp_path / "np" / "tiny-llama" / "0-mlp-hook-post"]
    assert [[f["index"] for f in b] for folder in folders for b in batches(folder, "features")] == [["2"], ["1"]]
    assert {r["layer"] for r in batches(folders[1], "activations")[0]} == {"0-mlp-hook-post"}
    one = dl.sweep('logit[" the"]', tmp_path / "logit", model=tiny_model, max_token_forwards=300, corpus=DOCS,
                   scan=dl.ScanConfig(tokens=64, window=8, top_k=2, per_document=2), **SMALL)
    with pytest.raises(NeuronpediaError, match="not one neuron or SAE latent"):
        dl.export_neuronpedia(one, tmp_path / "np2", model=tiny_model)


def test_an_export_is_replaced_only_with_force(swept, tiny_model, tmp_path):
    out = tmp_path / "np"
    (folder,) = dl.export_neuronpedia(swept, out, model=tiny_model, batch_size=1)
    assert len(batches(folder, "features")) == 3
    with pytest.raises(OutputError, match="already holds a Neuronpedia export"):
        dl.export_neuronpedia(swept, out, model=tiny_model)
    dl.export_neuronpedia(swept, out, model=tiny_model, force=True)  # one batch now: the old ones are gone
    assert len(batches(folder, "features")) == 1 and len(batches(folder, "activations")) == 1
    with pytest.raises(NeuronpediaError, match="batch_size"):
        dl.export_neuronpedia(swept, out, model=tiny_model, batch_size=0, force=True)
    with pytest.raises(NeuronpediaError, match="not a sweep, a dream result or a modes folder"):
        dl.export_neuronpedia(tmp_path, tmp_path / "x", model=tiny_model)
    with pytest.raises(NeuronpediaError, match="drop scan="):
        dl.export_neuronpedia(swept, out, model=tiny_model, scan=tmp_path, force=True)


def test_the_export_command(swept, dreamed, tmp_path, capsys, tiny_cli):
    rc, out, err = run_cli(capsys, "export", "neuronpedia", swept.folder, "--out", tmp_path / "np", "--batch-size", "2")
    assert rc == 0, err
    folder = tmp_path / "np" / "tiny-llama" / "1-mlp-hook-post"
    rows = [r for b in batches(folder, "activations") for r in b]
    assert f"wrote {folder}: 3 features, {len(rows)} activation rows in 2 batch file(s)" in out
    rc, _, err = run_cli(capsys, "export", "neuronpedia", swept.folder, "--out", tmp_path / "np")
    assert_one_error_line(rc, err, "already holds a Neuronpedia export", "--force")
    r, _ = dreamed
    r.save(tmp_path / "dream")
    rc, _, err = run_cli(capsys, "export", "neuronpedia", tmp_path / "dream", "--out", tmp_path / "np2",
                         "--source-id", "1-neurons")
    assert rc == 0, err
    assert tiny_cli == ["tiny-llama"]  # the dream's own model, for its tokenizer
    assert (tmp_path / "np2" / "tiny-llama" / "1-neurons" / "features" / "batch-0.jsonl.gz").is_file()
    rc, _, err = run_cli(capsys, "export", "neuronpedia", tmp_path, "--out", tmp_path / "np3")
    assert_one_error_line(rc, err, "not a sweep, a dream result or a modes folder")
    rows = read_jsonl_gz(folder / "activations" / "batch-0.jsonl.gz")
    assert json.loads(json.dumps(rows)) == rows  # plain JSON: no NaN, nothing but Neuronpedia's fields
    assert set(rows[0]) == {"id", "modelId", "layer", "index", "tokens", "values", "maxValue", "maxValueTokenIndex",
                            "minValue", "dataSource", "dataIndex", "creatorId", "createdAt"}
