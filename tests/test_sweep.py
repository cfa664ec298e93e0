"""Sweeps on the tiny model: SPEC expansion, the store (resume, idempotence, a refused config, an interrupt),
the chunk's determinism, the report page and the `dreamlens sweep` command end to end."""

from __future__ import annotations

import html
import json
import math
import os
import re
import signal
import time

import numpy as np
import pandas as pd
import pytest

import dreamlens as dl
from dreamlens.cli import main
from dreamlens.errors import OutputError
from dreamlens.scoring import DreamError
from dreamlens.sweeps import chunk as chunk_mod
from dreamlens.sweeps import local as local_mod
from dreamlens.sweeps.chunk import SweepSettings, load_model_spec, run_chunk
from dreamlens.sweeps.spec import SweepSpecError, expand
from dreamlens.sweeps.store import SweepConfigError, SweepError
from dreamlens.viz.sweep_report import build_sweep_report

pytestmark = pytest.mark.usefixtures("one_thread")

DOCS = [
    "The committee met on Tuesday to discuss the budget for the coming year, and the members agreed "
    "that spending on schools and roads should rise while the army would stay the same size.",
    "Rivers carry water from the mountains to the sea. Along the way they cut valleys, feed farms, "
    "and give cities a reason to exist; many of the oldest towns stand on their banks.",
    "A violin has four strings tuned in fifths. Players press the strings against the fingerboard "
    "and draw a bow across them; the body of the instrument makes the sound louder and warmer.",
]
SPEC = "blocks.1.mlp.hook_post[0:4]"
NAMES = [f"blocks.1.mlp.hook_post[{i}]" for i in range(4)]
# a small EPO sweep: 4 neurons in 2 chunks, a few iterations each
KW = dict(method="epo", budget=1500, corpus=DOCS, tokens=64, window=8, top_k=3, per_document=2, chunk_size=2,
          length=4, population=2, children=4, progress=False)
TIMING = ["seconds"]  # the only summary column that differs between two runs of the same sweep


def _files(folder):
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("chunk-*.parquet"))}


def _same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(a.drop(columns=TIMING, errors="ignore"), b.drop(columns=TIMING, errors="ignore"))


# ---------------------------------------------------------------------------------------------
# SPEC


@pytest.mark.parametrize(("spec", "expected"), [
    ("blocks.1.mlp.hook_post[0:3]", [f"blocks.1.mlp.hook_post[{i}]" for i in range(3)]),
    ("blocks.6.mlp.hook_post[0:20:8]", ["blocks.6.mlp.hook_post[0]", "blocks.6.mlp.hook_post[8]", "blocks.6.mlp.hook_post[16]"]),
    ("blocks.6.mlp.hook_post[ :2 ]@max", ["blocks.6.mlp.hook_post[0]@max", "blocks.6.mlp.hook_post[1]@max"]),
    ("sae:embedded[5:7]", ["sae:embedded[5]", "sae:embedded[6]"]),
    ("blocks.0.attn.hook_z[1,0:4:2]", ["blocks.0.attn.hook_z[1,0]", "blocks.0.attn.hook_z[1,2]"]),
    ('blocks.0.mlp.hook_post[3]; logit[";"] ;logit[:]', ["blocks.0.mlp.hook_post[3]", 'logit[";"]', "logit[:]"]),
    ("sae:embedded[0:2]; blocks.0.mlp.hook_post[1:3]",
     ["sae:embedded[0]", "sae:embedded[1]", "blocks.0.mlp.hook_post[1]", "blocks.0.mlp.hook_post[2]"]),
    ("blocks.0.mlp.hook_post[0:2] - 0.5*blocks.1.mlp.hook_post[3]",
     ["blocks.0.mlp.hook_post[0] - 0.5*blocks.1.mlp.hook_post[3]", "blocks.0.mlp.hook_post[1] - 0.5*blocks.1.mlp.hook_post[3]"]),
])
def test_a_spec_expands_into_its_objectives(spec, expected):
    assert expand(spec) == expected


def test_a_spec_file_and_a_list(tmp_path):
    f = tmp_path / "objectives.txt"
    f.write_text("# neurons of layer 1\nblocks.1.mlp.hook_post[0:2]\n\n  logit[\" Paris\"]  \nsae:embedded[3]; sae:embedded[9:11]\n")
    expected = ["blocks.1.mlp.hook_post[0]", "blocks.1.mlp.hook_post[1]", 'logit[" Paris"]', "sae:embedded[3]",
                "sae:embedded[9]", "sae:embedded[10]"]
    assert expand(str(f)) == expected
    assert expand(f) == expected
    assert expand(["blocks.1.mlp.hook_post[0:2]", dl.Neuron("blocks.0.mlp.hook_post", 5)]) == [
        "blocks.1.mlp.hook_post[0]", "blocks.1.mlp.hook_post[1]", "blocks.0.mlp.hook_post[5]"]


@pytest.mark.parametrize(("spec", "message"), [
    ("blocks.1.mlp.hook_post[4:2]", r"range '4:2' is empty \(STOP 2 must be above START 4\)"),
    ("blocks.1.mlp.hook_post[0:4:0]", r"step of '0:4:0' must be a positive integer"),
    ("blocks.1.mlp.hook_post[0:4:-1]", r"step of '0:4:-1' must be a positive integer"),
    ("blocks.1.mlp.hook_post[-3:2]", r"counts units from 0"),
    ("blocks.1.mlp.hook_post[0:x]", r"cannot read the index '0:x'.*START:STOP"),
    ("blocks.0.mlp.hook_post[0:2] + blocks.1.mlp.hook_post[0:2]", r"holds 2 index ranges.*one range"),
    ("blocks.1.mlp.hook_post[0:3]; blocks.1.mlp.hook_post[2]", r"names 'blocks.1.mlp.hook_post\[2\]' twice \(objectives 2 and 3\)"),
    (" ; ", r"names no objective"),
    ("", r"names no objective"),
    ("no_such_objectives.txt", r"no objectives file at 'no_such_objectives.txt'"),
])
def test_a_bad_spec_says_what_is_wrong(spec, message):
    with pytest.raises(SweepSpecError, match=message):
        expand(spec)


def test_bad_settings_and_model_specs_are_refused():
    with pytest.raises(SweepError, match="budget must be a positive integer, got 0"):
        SweepSettings(budget=0).check()
    with pytest.raises(SweepError, match="'max_token_forwards' is set by the sweep itself; pass budget= instead"):
        SweepSettings(options={"max_token_forwards": 10}).check()
    with pytest.raises(DreamError, match="'lenght' is not an option of epo; did you mean 'length'"):
        SweepSettings(method="epo", options={"lenght": 4}).check()
    with pytest.raises(SweepError, match="limits must be positive numbers"):
        SweepSettings(limits=(4.0, -1.0)).check()
    with pytest.raises(SweepError, match="cannot import 'no_such_module_xyz'.*PYTHONPATH"):
        load_model_spec("no_such_module_xyz:build")
    with pytest.raises(SweepError, match="has no 'nope'"):
        load_model_spec("dreamlens.testing:nope")
    with pytest.raises(SweepError, match="unknown engine 'spark'"):
        dl.sweep(SPEC, "unused", engine="spark")


def test_the_factory_spec_builds_the_test_model(tiny_model):
    model = load_model_spec("dreamlens.testing:tiny_model")
    assert model.cfg.model_name == "tiny-llama"
    for (name, a), b in zip(model.state_dict().items(), tiny_model.state_dict().values()):
        assert np.array_equal(a.numpy(), b.numpy()), name


# ---------------------------------------------------------------------------------------------
# A local sweep, its store, resuming and refusing


@pytest.fixture(scope="module")
def swept(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "run"
    return out, dl.sweep(SPEC, out, model=tiny_model, **KW)


def test_a_sweep_writes_its_store_and_loads_back(swept):
    out, s = swept
    assert sorted(p.name for p in out.iterdir()) == ["examples", "frontiers", "summary", "sweep.json"]
    for table in ("summary", "frontiers", "examples"):
        assert sorted(p.name for p in (out / table).iterdir()) == ["chunk-00000.parquet", "chunk-00001.parquet"]
    meta = json.loads((out / "sweep.json").read_text())
    assert meta["format"] == "dreamlens.Sweep" and meta["objectives"] == NAMES
    assert meta["config"]["method"] == "epo" and meta["config"]["options"]["length"] == 4

    loaded = dl.load_sweep(out)
    assert isinstance(loaded, dl.Sweep) and loaded.complete and len(loaded) == 4
    _same(loaded.summary, s.summary)
    summary = loaded.summary
    assert list(summary["objective"]) == NAMES and list(summary["index"]) == [0, 1, 2, 3]
    for col in ("dataset_max", "median_top_xe", "best", "best_xe", "ratio", "percentile", "beats_dataset",
                "best_xe4", "ratio_xe6", "percentile_xe8", "top_text", "token_forwards"):
        assert col in summary.columns, col
    assert np.isfinite(summary["best"]).all() and np.isfinite(summary["dataset_max"]).all()
    assert (summary["stopped"] == "budget").all()
    for _, r in summary.iterrows():
        front, top = loaded.frontier(r["objective"]), loaded.top(int(r["index"]))
        assert len(front) >= 1 and 1 <= len(top) <= 3
        assert r["best"] == front["activation"].max()
        assert list(front["xe"]) == sorted(front["xe"])
        assert math.isclose(r["ratio"], r["best"] / r["dataset_max"]) or r["dataset_max"] <= 0
        assert r["top_text"] == top["text"].iloc[0]
        ok = front[front["xe"] <= 6.0]
        assert (math.isnan(r["best_xe6"]) if ok.empty else r["best_xe6"] == ok["activation"].max())
    # pandas reads the tables directly
    assert len(pd.read_parquet(out / "summary")) == 4
    assert set(pd.read_parquet(out / "frontiers")["objective"]) == set(NAMES)
    assert "4 of 4 objectives done" in repr(loaded)
    with pytest.raises(SweepError, match="is not an objective of this sweep"):
        loaded.frontier("blocks.0.mlp.hook_post[0]")


def test_the_summary_agrees_with_a_scan_of_its_own(swept, tiny_model):
    _, s = swept
    one = dl.scan(tiny_model, NAMES[3], DOCS, tokens=64, window=8, top_k=3, per_document=2, cache=False, progress=False)
    row = s.summary.iloc[3]
    assert row["dataset_max"] == pytest.approx(dl.analysis.dataset_max(one, 0))
    assert list(s.top(3)["text"]) == list(one.top(0)["text"])


def test_running_it_again_recomputes_nothing(swept, tiny_model, monkeypatch):
    out, s = swept
    before = _files(out)

    def fail(*args, **kwargs):
        raise AssertionError("a finished chunk was computed again")

    monkeypatch.setattr(local_mod, "run_chunk", fail)
    monkeypatch.setattr(chunk_mod, "load_model_spec", fail)  # not even the model is loaded
    again = dl.sweep(SPEC, out, model=tiny_model, **KW)
    assert _files(out) == before
    _same(again.summary, s.summary)


@pytest.mark.parametrize(("change", "message"), [
    ({"budget": 2000}, r"budget \(1500 there, 2000 now\)"),
    ({"length": 5}, r"options\.length \(4 there, 5 now\)"),
    ({"method": "gcg", "population": None}, r"method \('epo' there, 'gcg' now\)"),
    ({"tokens": 48}, r"tokens \(64 there, 48 now\)"),
    ({"spec": "blocks.1.mlp.hook_post[0:6]"}, r"objectives \(4 there, 6 now\)"),
    ({"spec": "blocks.1.mlp.hook_post[1:5]"}, r"objectives \(number 0 is 'blocks.1.mlp.hook_post\[0\]' there, "),
])
def test_another_config_into_the_same_folder_is_refused(swept, tiny_model, change, message):
    out, _ = swept
    before = _files(out)
    kw = {**KW, **change}
    spec = kw.pop("spec", SPEC)
    kw = {k: v for k, v in kw.items() if v is not None}
    with pytest.raises(SweepConfigError, match=message + r".*Resume it with the same settings, or sweep into another folder"):
        dl.sweep(spec, out, model=tiny_model, **kw)
    assert _files(out) == before


def test_a_folder_of_other_things_is_refused(tmp_path, tiny_model):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="holds other files, not a sweep"):
        dl.sweep(SPEC, tmp_path, model=tiny_model, **KW)
    with pytest.raises(OutputError, match="is a file"):
        dl.sweep(SPEC, tmp_path / "notes.txt", model=tiny_model, **KW)
    with pytest.raises(SweepError, match="not a sweep folder"):
        dl.load_sweep(tmp_path)


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_an_interrupted_sweep_keeps_its_chunks_and_resumes(swept, tiny_model, tmp_path, monkeypatch, how):
    _, full = swept
    out = tmp_path / "run"
    calls = []

    def interrupt_second(model, objectives, settings, scan=None, **kw):
        calls.append(list(objectives))
        if len(calls) == 2:
            if how == "sigterm":  # a job scheduler's stop: the same as Ctrl-C
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
                raise AssertionError("SIGTERM did not stop the sweep")
            raise KeyboardInterrupt
        return run_chunk(model, objectives, settings, scan, **kw)

    monkeypatch.setattr(local_mod, "run_chunk", interrupt_second)
    with pytest.raises(KeyboardInterrupt), pytest.warns(UserWarning, match="2 of 4 objectives are done and kept"):
        dl.sweep(SPEC, out, model=tiny_model, **KW)
    partial = dl.load_sweep(out)
    assert not partial.complete and list(partial.summary["objective"]) == NAMES[:2]
    assert sorted(_files(out)) == [f"{t}/chunk-00000.parquet" for t in ("examples", "frontiers", "summary")]
    first = _files(out)

    calls.clear()
    done = dl.sweep(SPEC, out, model=tiny_model, **KW)
    assert calls == [NAMES[2:]]  # only the unfinished chunk
    assert all(_files(out)[k] == v for k, v in first.items())
    _same(done.summary, full.summary)  # the same rows as the sweep that was never interrupted
    pd.testing.assert_frame_equal(done.frontiers, full.frontiers)
    pd.testing.assert_frame_equal(done.examples, full.examples)


def test_an_interrupt_inside_a_dream_stores_no_partial_chunk(tiny_model, tmp_path, monkeypatch):
    from dreamlens.optim import dream as dream_mod

    real = dream_mod.dream

    def interrupted(*args, **kwargs):
        results = real(*args, **kwargs)
        for r in results:
            r.stopped = "interrupted"  # what the run loop returns after Ctrl-C
        return results

    monkeypatch.setattr(dream_mod, "dream", interrupted)
    with pytest.raises(KeyboardInterrupt), pytest.warns(UserWarning, match="0 of 4 objectives are done"):
        dl.sweep(SPEC, tmp_path / "run", model=tiny_model, **KW)
    assert _files(tmp_path / "run") == {}


def test_an_objective_that_cannot_start_from_random_prompts(swept, tiny_model, tmp_path, monkeypatch):
    """E.g. an SAE latent that fires nowhere near random prompts (DreamError before any search): it starts
    from its top dataset example instead; one that cannot start there either gets a row saying why; the
    sweep goes on (the others of its EPO run are dreamed alone)."""
    from dreamlens.optim import dream as dream_mod

    _, full = swept
    real = dream_mod.dream
    seen = []

    def picky(model, objective, method, *, config, **kwargs):
        names = [str(o) for o in objective]
        seen.append((names, config.init_ids))
        for bad in (NAMES[1], NAMES[0] if config.init_ids is None else None):
            if bad in names:
                raise DreamError(f"the objective {bad!r} has zero gradient: it is constant here (pick another target)")
        return real(model, objective, method, config=config, **kwargs)

    monkeypatch.setattr(dream_mod, "dream", picky)
    s = dl.sweep(SPEC, tmp_path / "run", model=tiny_model, **KW)
    assert s.complete
    assert [n for n, _ in seen[:3]] == [NAMES[:2], [NAMES[0]], [NAMES[0]]]  # the run of its list, then each alone
    assert list(s.summary["stopped"]) == ["budget", "error", "budget", "budget"]
    assert list(s.summary["start"]) == ["example 0", "", "random", "random"]
    top = s.top(0)
    assert seen[2] == ([NAMES[0]], tuple(top["ids"].iloc[0][-4:]))  # its best example's last `length` tokens
    assert len(s.frontier(0)) >= 1 and s.summary["error"].iloc[0] == ""
    row = s.summary.iloc[1]
    assert row["error"].startswith("DreamError: the objective") and "constant here" in row["error"]
    assert math.isnan(row["best"]) and not row["beats_dataset"] and row["n_prompts"] == 0
    assert s.frontier(1).empty and len(s.top(1)) >= 1  # its dataset side is there
    top = s.top(1)
    starts = list(dict.fromkeys(tuple(ids[-4:]) for ids, a in zip(top["ids"], top["activation"]) if a > 0 and len(ids) >= 4))
    assert [ids for n, ids in seen if n == [NAMES[1]]] == [None, *starts]  # random, then each distinct example start
    _same(s.summary.iloc[2:], full.summary.iloc[2:])  # the other chunk is untouched
    assert f"no dream: DreamError: the objective {html.escape(repr(NAMES[1]), quote=True)}" in build_sweep_report(s)


def test_an_objective_the_error_names_leaves_its_epo_run(tiny_model, tmp_path, monkeypatch):
    from dreamlens.optim import dream as dream_mod

    real = dream_mod.dream
    seen = []

    def picky(model, objective, method, *, config, **kwargs):
        names = [str(o) for o in objective]
        seen.append(names)
        if NAMES[1] in names:
            raise DreamError(f"the objective {NAMES[1]!r} has zero gradient: it is constant here (pick another target)")
        return real(model, objective, method, config=config, **kwargs)

    monkeypatch.setattr(dream_mod, "dream", picky)
    s = dl.sweep(SPEC, tmp_path / "run", model=tiny_model, **{**KW, "chunk_size": 4})
    assert seen[:3] == [NAMES, [NAMES[0], NAMES[2], NAMES[3]], [NAMES[1]]]  # the others stay one run
    assert list(s.summary["start"]) == ["random", "", "random", "random"]
    assert s.summary["token_forwards"].iloc[[0, 2, 3]].max() < 2 * KW["budget"]  # each a third of the run's compute


def test_a_chunk_is_deterministic_and_takes_an_unscored_scan(swept, tiny_model):
    """What the Ray engine relies on: the same chunk gives the same frames, also from a scan made elsewhere
    (unscored: run_chunk scores its top examples)."""
    _, s = swept
    settings = SweepSettings(model=None, method="epo", budget=1500, options=dict(length=4, population=2, children=4),
                             corpus=tuple(DOCS), tokens=64, window=8, top_k=3, per_document=2, chunk_size=2)
    scan = dl.scan(tiny_model, NAMES[2:], DOCS, tokens=64, window=8, top_k=3, per_document=2, score=False, cache=False,
                   progress=False)
    assert not scan.scored
    frames = run_chunk(tiny_model, NAMES[2:], settings, scan, first=2)
    _same(frames.summary, s.summary.iloc[2:].reset_index(drop=True))
    pd.testing.assert_frame_equal(frames.frontiers, s.frontiers[s.frontiers["index"] >= 2].reset_index(drop=True))
    pd.testing.assert_frame_equal(frames.examples, s.examples[s.examples["index"] >= 2].reset_index(drop=True))


# ---------------------------------------------------------------------------------------------
# The report and the command


def test_the_report_lists_every_objective_offline(swept):
    _, s = swept
    page = build_sweep_report(s, limit=6.0)
    for name in NAMES:
        assert f">{html.escape(repr(name), quote=True)}<" in page
    assert page.count('<tr class="main">') == 4 and page.count('<tr class="detail" hidden>') == 4
    assert "<script>" in page and not re.search(r"(src|href)=\"(https?:)?//", page)
    assert "http://" not in page and "https://" not in page
    assert "4 of 4 objectives" in page and "best dream at xe ≤ 6" in page
    for text in s.frontier(0)["text"]:
        assert html.escape(repr(text), quote=True) in page


def test_the_sweep_command_end_to_end(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(DOCS))
    out = tmp_path / "run"
    argv = ["sweep", "blocks.1.mlp.hook_post[0:3]", "--out", str(out), "--model", "dreamlens.testing:tiny_model",
            "--method", "epo", "--budget", "400", "--length", "4", "--corpus", str(corpus), "--tokens", "64",
            "--window", "8", "--top-k", "2", "--chunk-size", "2", "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "3 objectives in" in printed and "3 computed now, 0 from before" in printed
    s = dl.load_sweep(out)
    assert s.complete and s.config["model"] == "dreamlens.testing:tiny_model" and s.config["budget"] == 400
    assert s.config["corpus"] == str(corpus.resolve())

    before = _files(out)
    assert main(argv) == 0
    assert "0 computed now, 3 from before" in capsys.readouterr().out
    assert _files(out) == before

    assert main([*argv[:9], "800", *argv[10:]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "budget (400 there, 800 now)" in err

    assert main([*argv, "--workers", "2"]) == 2
    assert "--workers is the number of Ray workers" in capsys.readouterr().err

    page = tmp_path / "page.html"
    assert main(["report", str(out), "--out", str(page)]) == 0
    text = page.read_text()
    assert all(n in text for n in ("blocks.1.mlp.hook_post[0]", "blocks.1.mlp.hook_post[1]", "blocks.1.mlp.hook_post[2]"))
    assert "3 of 3 objectives" in capsys.readouterr().out
    assert main(["report", str(out), "--out", str(page)]) == 2  # exists: needs --force
    assert main(["report", str(out), "--out", str(page), "--force", "--limit", "8"]) == 0
    assert "best dream at xe ≤ 8" in page.read_text()
    assert main(["report", str(out), "--out", str(tmp_path / "p2.html"), "--scan", str(out)]) == 2
    assert "--scan does not apply to a sweep" in capsys.readouterr().err
    assert os.path.exists(page)
