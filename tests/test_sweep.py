"""Sweeps on the tiny model: SPEC expansion, the store (resume, idempotence, a refused config, an interrupt),
the chunk's determinism, sweeps of modes (and stores written before them), the report page and the
`dreamlens sweep` command end to end."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import time

import numpy as np
import pandas as pd
import pytest
from markupsafe import escape

import dreamlens as dl
from dreamlens.analysis.errors import ScanError
from dreamlens.cli import build_parser, main
from dreamlens.errors import DreamError, OutputError
from dreamlens.modes.result import Modes
from dreamlens.sweeps import chunk as chunk_mod
from dreamlens.sweeps import local as local_mod
from dreamlens.sweeps.chunk import SweepSettings, load_model_spec, run_chunk
from dreamlens.sweeps.errors import SweepConfigError, SweepError, SweepSpecError
from dreamlens.sweeps.spec import expand
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
SCAN = dl.ScanConfig(tokens=64, window=8, top_k=3, per_document=2)
KW = dict(method="epo", max_token_forwards=1500, corpus=DOCS, scan=SCAN, chunk_size=2,
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
    with pytest.raises(SweepError, match="max_token_forwards must be a positive integer .*, got 0"):
        SweepSettings(dream=dl.ADAPTConfig(max_token_forwards=0)).check()
    with pytest.raises(SweepError, match="max_token_forwards must be a positive integer .*, got None"):
        SweepSettings(dream=dl.ADAPTConfig()).check()
    with pytest.raises(SweepError, match="'checkpoint_every' is set by the sweep itself; drop it"):
        SweepSettings(dream=dl.ADAPTConfig(max_token_forwards=10, checkpoint_every=5)).check()
    with pytest.raises(SweepError, match="'checkpoint_every' is set by the sweep itself; drop it"):
        dl.sweep(SPEC, "unused", checkpoint_every=5)
    with pytest.raises(DreamError, match="'lenght' is not an option of epo; did you mean 'length'"):
        dl.sweep(SPEC, "unused", method="epo", lenght=4)
    with pytest.raises(SweepError, match="limits must be positive numbers"):
        SweepSettings(limits=(4.0, -1.0)).check()
    with pytest.raises(ScanError, match="top_k must be an integer >= 1, got 0"):
        dl.ScanConfig(top_k=0)
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
    ({"max_token_forwards": 2000}, r"budget \(1500 there, 2000 now\)"),
    ({"length": 5}, r"options\.length \(4 there, 5 now\)"),
    ({"method": "gcg", "population": None}, r"method \('epo' there, 'gcg' now\)"),
    ({"scan": SCAN.replace(tokens=48)}, r"tokens \(64 there, 48 now\)"),
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
    real = chunk_mod.dream

    def interrupted(*args, **kwargs):
        results = real(*args, **kwargs)
        for r in results:
            r.stopped = "interrupted"  # what the run loop returns after Ctrl-C
        return results

    monkeypatch.setattr(chunk_mod, "dream", interrupted)
    with pytest.raises(KeyboardInterrupt), pytest.warns(UserWarning, match="0 of 4 objectives are done"):
        dl.sweep(SPEC, tmp_path / "run", model=tiny_model, **KW)
    assert _files(tmp_path / "run") == {}


def test_an_objective_that_cannot_start_from_random_prompts(swept, tiny_model, tmp_path, monkeypatch):
    """E.g. an SAE latent that fires nowhere near random prompts (DreamError before any search): it starts
    from its top dataset example instead; one that cannot start there either gets a row saying why; the
    sweep goes on (the others of its EPO run are dreamed alone)."""

    _, full = swept
    real = chunk_mod.dream
    seen = []

    def picky(model, objective, method, *, config, **kwargs):
        names = [str(o) for o in objective]
        seen.append((names, config.init_ids))
        for bad in (NAMES[1], NAMES[0] if config.init_ids is None else None):
            if bad in names:
                raise DreamError(f"the objective {bad!r} has zero gradient: it is constant here (pick another target)")
        return real(model, objective, method, config=config, **kwargs)

    monkeypatch.setattr(chunk_mod, "dream", picky)
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
    assert f"no dream: DreamError: the objective {escape(repr(NAMES[1]))}" in build_sweep_report(s)


def test_an_objective_out_of_memory_gets_an_error_row(swept, tiny_model, tmp_path, monkeypatch):
    """Out of memory with the whole EPO run of a chunk: each objective is dreamed alone; the one that runs
    out of memory alone too (its passes already halved to one prompt) gets a row saying so, the sweep goes on."""
    import torch


    _, full = swept
    real = chunk_mod.dream
    seen = []

    def hungry(model, objective, method, *, config, **kwargs):
        names = [str(o) for o in objective]
        seen.append(names)
        if NAMES[1] in names:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real(model, objective, method, config=config, **kwargs)

    monkeypatch.setattr(chunk_mod, "dream", hungry)
    s = dl.sweep(SPEC, tmp_path / "run", model=tiny_model, **KW)
    assert s.complete and seen[:3] == [NAMES[:2], [NAMES[0]], [NAMES[1]]]  # the run of the list, then each alone, once
    assert list(s.summary["stopped"]) == ["budget", "error", "budget", "budget"]
    row = s.summary.iloc[1]
    assert row["error"].startswith("OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
    assert "give each worker more memory" in row["error"] and row["n_prompts"] == 0 and s.frontier(1).empty
    assert len(s.top(1)) >= 1  # its dataset side is there
    _same(s.summary.iloc[2:], full.summary.iloc[2:])  # the other chunk is untouched
    monkeypatch.setattr(chunk_mod, "dream", lambda *a, **k: 1 / 0)  # any other error is a bug: raised
    with pytest.raises(ZeroDivisionError):
        dl.sweep(SPEC, tmp_path / "other", model=tiny_model, **KW)


def test_a_model_out_of_memory_on_one_objective(tmp_path):
    """`dreamlens.testing:tiny_model_oom` runs out of memory in every dream of an objective at its OOM_HOOK:
    that objective's row says so; the objectives beside it in its chunk and after it are dreamed."""
    from dreamlens.testing import OOM_HOOK

    spec = f"blocks.1.mlp.hook_post[0];{OOM_HOOK}[0];blocks.1.mlp.hook_post[1]"
    s = dl.sweep(spec, tmp_path / "run", model="dreamlens.testing:tiny_model_oom", max_token_forwards=300,
                 scan=dl.ScanConfig(tokens=256, window=8, top_k=2), chunk_size=2, length=4, progress=False)
    assert s.complete and list(s.summary["stopped"]) == ["budget", "error", "budget"]
    assert s.summary["error"].iloc[1].startswith("OutOfMemoryError: CUDA out of memory (simulated")
    assert s.summary["n_prompts"].iloc[[0, 2]].min() > 0
    assert [r["engine"] for r in s.runs] == ["local"] and s.runs[0]["device"] == "cpu"  # where it ran, in sweep.json


def test_an_objective_the_error_names_leaves_its_epo_run(tiny_model, tmp_path, monkeypatch):
    real = chunk_mod.dream
    seen = []

    def picky(model, objective, method, *, config, **kwargs):
        names = [str(o) for o in objective]
        seen.append(names)
        if NAMES[1] in names:
            raise DreamError(f"the objective {NAMES[1]!r} has zero gradient: it is constant here (pick another target)")
        return real(model, objective, method, config=config, **kwargs)

    monkeypatch.setattr(chunk_mod, "dream", picky)
    s = dl.sweep(SPEC, tmp_path / "run", model=tiny_model, **{**KW, "chunk_size": 4})
    assert seen[:3] == [NAMES, [NAMES[0], NAMES[2], NAMES[3]], [NAMES[1]]]  # the others stay one run
    assert list(s.summary["start"]) == ["random", "", "random", "random"]
    assert s.summary["token_forwards"].iloc[[0, 2, 3]].max() < 2 * KW["max_token_forwards"]  # each a third of the run's compute


def test_a_chunk_is_deterministic_and_takes_an_unscored_scan(swept, tiny_model):
    """What the Ray engine relies on: the same chunk gives the same frames, also from a scan made elsewhere
    (unscored: run_chunk scores its top examples)."""
    _, s = swept
    settings = SweepSettings(model=None, dream=dl.EPOConfig(max_token_forwards=1500, length=4, population=2, children=4),
                             corpus=tuple(DOCS), scan=SCAN, chunk_size=2)
    scan = dl.scan(tiny_model, NAMES[2:], DOCS, config=SCAN, score=False, cache=False, progress=False)
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
        assert f">{escape(repr(name))}<" in page
    assert page.count('<tr class="main">') == 4 and page.count('<tr class="detail" hidden>') == 4
    assert "<script>" in page and not re.search(r"(src|href)=\"(https?:)?//", page)
    assert "http://" not in page and "https://" not in page
    assert "4 of 4 objectives" in page and "best dream at xe ≤ 6" in page
    for text in s.frontier(0)["text"]:
        assert escape(repr(text)) in page


def test_the_sweep_command_end_to_end(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(DOCS))
    out = tmp_path / "run"
    argv = ["sweep", "blocks.1.mlp.hook_post[0:3]", "--out", str(out), "--model", "dreamlens.testing:tiny_model",
            "--method", "epo", "--budget", "400", "--length", "4", "--corpus", str(corpus), "--tokens", "64",
            "--window", "8", "--top-examples", "2", "--chunk-size", "2", "--quiet"]
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
    assert main([*argv, "--gpus-per-worker", "1"]) == 2
    assert "--gpus-per-worker applies to Ray workers" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse's own usage error, one line
        main([*argv, "--ray", "--gpus-per-worker", "-1"])
    assert "--gpus-per-worker: must be 0 or more" in capsys.readouterr().err

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


# ---------------------------------------------------------------------------------------------
# Modes: K distinct dreams of each objective, a summary row each


MODES_SPEC = "blocks.1.mlp.hook_post[0:2]"
# 2 objectives in 2 chunks, 2 modes each, ranked at xe <= 20 (the random tiny model is far from fluent)
MODES_KW = {**KW, "chunk_size": 1, "modes": 2, "mode_limit": 20.0, "limits": (6.0, 20.0)}
MODE_COLUMNS = ["mode", "found", "key_tokens", "n_banned"]  # what a store written before modes lacks


def _spans(top: pd.DataFrame, length: int = 4) -> list[tuple[int, tuple[int, ...]]]:
    """What `example_spans` gives for a scan's top examples: (rank, the last `length` ids) where it fires, no
    repeated span, best first."""
    out: dict[tuple[int, ...], int] = {}
    for rank, (ids, a) in enumerate(zip(top["ids"], top["activation"])):
        if a > 0 and len(ids) >= length:
            out.setdefault(tuple(ids[-length:]), rank)
    return [(rank, span) for span, rank in out.items()]


@pytest.fixture(scope="module")
def modes_swept(tiny_model, tmp_path_factory):
    """A sweep of 2 modes of 2 objectives, and what `dream` gave and was given for each objective."""

    real = chunk_mod.dream
    calls: dict[str, tuple[Modes, dict]] = {}

    def spy(model, objective, *args, **kwargs):
        out = real(model, objective, *args, **kwargs)
        if isinstance(out, Modes):
            calls[str(objective)] = (out, kwargs)
        return out

    out = tmp_path_factory.mktemp("modes") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(chunk_mod, "dream", spy)
        s = dl.sweep(MODES_SPEC, out, model=tiny_model, **MODES_KW)
    return out, s, calls


def test_a_sweep_of_modes_has_a_row_per_mode(modes_swept):
    out, s, calls = modes_swept
    names = NAMES[:2]
    assert s.complete and s.n_done == 2 and s.modes == 2 and len(s) == 2
    assert "2 of 2 objectives done, 2 modes of each" in repr(s)
    assert s.config["modes"] == 2 and s.config["mode_limit"] == 20.0
    summary = s.summary
    assert list(summary["index"]) == [0, 0, 1, 1] and list(summary["objective"]) == [n for n in names for _ in (1, 2)]
    assert list(summary["mode"]) == [1, 2, 1, 2]
    assert list(summary.columns[:4]) == ["index", "objective", "mode", "found"]
    assert (summary["stopped"] == "budget").all() and set(summary.loc[summary["found"] == 1, "start"]) == {"random"}
    assert sorted(calls) == names
    for i, name in enumerate(names):
        modes, kwargs = calls[name]
        rows = summary[summary["index"] == i]
        # as Modes ranked them: mode m is Modes.dreams[m - 1], found in the order Modes.found says
        assert sorted(rows["found"]) == [1, 2] and list(rows["found"]) == modes.found
        assert list(rows["key_tokens"]) == modes.key_tokens and list(rows["n_banned"]) == [len(b) for b in modes.banned]
        assert kwargs["modes"] == 2 and kwargs["mode_settings"].limit == 20.0
        assert kwargs["examples"] == _spans(s.top(i))  # every top example's span, best first: where later modes start
        assert list(rows["start"]) == [st if st.startswith("example") else "random" for st in modes.starts]
        ranked = [-math.inf if math.isnan(v) else v for v in rows["best_xe20"]]
        assert ranked == sorted(ranked, reverse=True)  # best first at the mode limit (a limit of the summary too)
        for r in rows.itertuples():
            front = s.frontier(name, mode=r.mode)
            assert len(front) >= 1 and (front["mode"] == r.mode).all() and list(front["rank"]) == list(range(len(front)))
            assert r.best == front["activation"].max()
            assert list(front["text"]) == list(modes.dreams[r.mode - 1].frontier["text"])
        # distinct: the mode found second was dreamed without the key tokens of the first (and their neighbours)
        first, second = (rows[rows["found"] == k].iloc[0] for k in (1, 2))
        banned = set(modes.banned[modes.found.index(2)])
        assert set(first["key_tokens"]) <= banned and first["n_banned"] == 0 and second["n_banned"] == len(banned)
        later = s.frontier(name, mode=int(second["mode"]))
        assert not any(set(ids) & banned for ids in later["ids"])
    assert any(len(k) for k in summary["key_tokens"])  # a mode with key tokens: the check above is not empty
    assert len(s.frontier(0, mode=None)) == len(s.frontier(0, 1)) + len(s.frontier(0, 2))
    with pytest.raises(SweepError, match=r"mode 3 is out of range: this sweep has 2 mode\(s\) per objective"):
        s.frontier(0, mode=3)
    # the top examples: one set per objective
    assert "mode" not in s.examples.columns and sorted(set(s.examples["index"])) == [0, 1]
    assert list(pd.read_parquet(out / "frontiers").columns[:4]) == ["index", "objective", "mode", "rank"]
    assert len(pd.read_parquet(out / "summary")) == 4


def test_a_sweep_of_modes_resumes_and_refuses_other_modes(modes_swept, tiny_model, tmp_path, monkeypatch):
    import shutil

    src, full, _ = modes_swept
    out = tmp_path / "run"
    shutil.copytree(src, out)
    for table in ("summary", "frontiers", "examples"):
        (out / table / "chunk-00001.parquet").unlink()
    first = _files(out)
    assert dl.load_sweep(out).n_done == 1
    calls = []

    def counting(model, objectives, settings, scan=None, **kw):
        calls.append(list(objectives))
        return run_chunk(model, objectives, settings, scan, **kw)

    monkeypatch.setattr(local_mod, "run_chunk", counting)
    done = dl.sweep(MODES_SPEC, out, model=tiny_model, **MODES_KW)
    assert calls == [NAMES[1:2]]  # only the unfinished chunk
    assert all(_files(out)[k] == v for k, v in first.items())
    _same(done.summary, full.summary)
    pd.testing.assert_frame_equal(done.frontiers, full.frontiers)
    pd.testing.assert_frame_equal(done.examples, full.examples)
    before = _files(out)
    for modes, there in ((3, "3 now"), (1, "'<unset>' now")):
        with pytest.raises(SweepConfigError, match=rf"modes \(2 there, {there}\)"):
            dl.sweep(MODES_SPEC, out, model=tiny_model, **{**MODES_KW, "modes": modes, "mode_limit": None if modes == 1 else 20.0})
    with pytest.raises(SweepConfigError, match=r"mode_limit \(20.0 there, 5.0 now\)"):
        dl.sweep(MODES_SPEC, out, model=tiny_model, **{**MODES_KW, "mode_limit": 5.0})
    assert _files(out) == before and calls == [NAMES[1:2]]


def test_without_modes_the_store_has_mode_1_and_no_modes_in_its_config(swept):
    out, s = swept
    config = json.loads((out / "sweep.json").read_text())["config"]
    assert "modes" not in config and "mode_limit" not in config
    assert SweepSettings(modes=1, mode_limit=7.0).to_config() == SweepSettings().to_config()
    assert SweepSettings(modes=2).to_config()["modes"] == 2
    assert s.modes == 1 and s.n_done == 4
    assert list(s.summary["mode"]) == [1] * 4 and list(s.summary["found"]) == [1] * 4
    assert list(s.summary["key_tokens"]) == [[]] * 4 and list(s.summary["n_banned"]) == [0] * 4
    assert set(s.frontiers["mode"]) == {1} and "mode" in pd.read_parquet(out / "frontiers").columns


def test_a_store_written_before_modes_loads_and_resumes(swept, tiny_model, tmp_path, monkeypatch):
    """A store without the mode columns (written before sweeps took modes): read as mode 1, and resumed
    (its config is the same), its new chunks alongside the old ones."""
    import shutil

    src, full = swept
    out = tmp_path / "run"
    shutil.copytree(src, out)
    for table in ("summary", "frontiers"):
        for f in (out / table).glob("chunk-*.parquet"):
            old = pd.read_parquet(f)
            old.drop(columns=[c for c in MODE_COLUMNS if c in old.columns]).to_parquet(f)
    for table in ("summary", "frontiers", "examples"):
        (out / table / "chunk-00001.parquet").unlink()
    assert "mode" not in pd.read_parquet(out / "summary").columns
    old = dl.load_sweep(out)
    assert list(old.summary["mode"]) == [1, 1] and list(old.summary["found"]) == [1, 1] and set(old.frontiers["mode"]) == {1}
    _same(old.summary, full.summary.iloc[:2])
    pd.testing.assert_frame_equal(old.frontiers, full.frontiers[full.frontiers["index"] < 2].reset_index(drop=True))
    assert len(old.frontier(1)) >= 1

    calls = []

    def counting(model, objectives, settings, scan=None, **kw):
        calls.append(list(objectives))
        return run_chunk(model, objectives, settings, scan, **kw)

    monkeypatch.setattr(local_mod, "run_chunk", counting)
    done = dl.sweep(SPEC, out, model=tiny_model, **KW)
    assert calls == [NAMES[2:]]
    _same(done.summary, full.summary)
    pd.testing.assert_frame_equal(done.frontiers, full.frontiers)
    pd.testing.assert_frame_equal(done.examples, full.examples)
    assert "example" in build_sweep_report(done) and "<th>mode</th>" not in build_sweep_report(done)


@pytest.mark.parametrize(("settings", "message"), [
    (dict(modes=0), r"modes must be a positive integer \(1: one dream per objective; K: K distinct dreams of each\), got 0"),
    (dict(modes=-2), r"modes must be a positive integer .*got -2"),
    (dict(modes=1.5), r"modes must be a positive integer .*got 1.5"),
    (dict(modes=True), r"modes must be a positive integer .*got True"),
    (dict(modes="2"), r"modes must be a positive integer .*got '2'"),
    (dict(modes=2, mode_limit=0.0), r"mode_limit must be a positive number \(the fluency limit modes are ranked at"),
    (dict(modes=2, mode_limit=math.inf), r"mode_limit must be a positive number .*got inf"),
    (dict(modes=2, mode_limit=math.nan), r"mode_limit must be a positive number .*got nan"),
    (dict(modes=2, dream=dl.ADAPTConfig(max_token_forwards=100, length=4)),
     r"a budget of 100 token-forwards leaves nothing for a later mode after what separates it .*raise the budget"),
])
def test_bad_modes_are_refused(settings, message):
    with pytest.raises(SweepError, match=message):
        SweepSettings(**settings).check()


def test_bad_modes_in_a_sweep_are_refused_before_it_writes(tiny_model, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SweepError, match=r"mode_limit= applies only with modes=K .*pass modes=2 \(or more\)"):
        dl.sweep(MODES_SPEC, out, model=tiny_model, **{**KW, "mode_limit": 5.0})
    with pytest.raises(SweepError, match="modes must be a positive integer"):
        dl.sweep(MODES_SPEC, out, model=tiny_model, **{**KW, "modes": 0})
    # the exact check, on the model (start token and prefix): more than the lower bound of `check`
    with pytest.raises(SweepError, match="leaves nothing for a later mode"):
        dl.sweep(MODES_SPEC, out, model=tiny_model, **{**KW, "modes": 2, "max_token_forwards": 200, "prefix": "The committee met on"})
    assert not out.exists()


def test_modes_of_an_objective_that_cannot_start_from_random_prompts(tiny_model, tmp_path, monkeypatch):
    """With modes, as without: an objective that raises DreamError from random prompts is dreamed from its
    top example; one that cannot start anywhere gets one error row (mode 1); the store takes both."""

    real = chunk_mod.dream
    seen = []

    def picky(model, objective, method, *, config, **kwargs):
        seen.append((str(objective), config.init_ids, kwargs.get("modes")))
        if str(objective) == NAMES[1] or config.init_ids is None:
            raise DreamError(f"the objective {str(objective)!r} has zero gradient: it is constant here (pick another target)")
        return real(model, objective, method, config=config, **kwargs)

    monkeypatch.setattr(chunk_mod, "dream", picky)
    s = dl.sweep(MODES_SPEC, tmp_path / "run", model=tiny_model, **{**MODES_KW, "chunk_size": 2})
    assert s.complete and list(s.summary["objective"]) == [NAMES[0], NAMES[0], NAMES[1]]
    assert list(s.summary["mode"]) == [1, 2, 1] and list(s.summary["stopped"]) == ["budget", "budget", "error"]
    assert s.summary["start"].iloc[0] == "example 0" and s.summary["start"].iloc[1].startswith("example ")
    assert s.summary["start"].iloc[2] == ""
    assert seen[:2] == [(NAMES[0], None, 2), (NAMES[0], tuple(s.top(0)["ids"].iloc[0][-4:]), 2)]
    assert [ids for n, ids, _ in seen if n == NAMES[1]] == [None, *[span for _, span in _spans(s.top(1))[:3]]]
    row = s.summary.iloc[2]
    assert row["error"].startswith("DreamError: the objective") and row["found"] == 1 and row["key_tokens"] == []
    assert s.frontier(1).empty and len(s.frontier(0, 2)) >= 1


def test_an_interrupt_inside_a_mode_stores_no_partial_chunk(tiny_model, tmp_path, monkeypatch):
    real = chunk_mod.dream

    def interrupted(*args, **kwargs):
        modes = real(*args, **kwargs)
        modes.dreams[-1].stopped = "interrupted"  # a Ctrl-C in a later mode
        return modes

    monkeypatch.setattr(chunk_mod, "dream", interrupted)
    with pytest.raises(KeyboardInterrupt), pytest.warns(UserWarning, match="0 of 2 objectives are done"):
        dl.sweep(MODES_SPEC, tmp_path / "run", model=tiny_model, **MODES_KW)
    assert _files(tmp_path / "run") == {}


def test_the_report_of_a_sweep_of_modes(modes_swept):
    _, s, _ = modes_swept
    page = build_sweep_report(s)
    assert "<th>mode</th>" in page and page.count('<tr class="main">') == 4
    assert "2 per objective, ranked by activation at xe ≤ 20" in page and "budget per mode" in page
    for r in s.summary.itertuples():
        assert f"(mode {r.mode} of 2: dreamed {'1st' if r.found == 1 else '2nd'}" in page
        for text in s.frontier(r.index, r.mode)["text"]:
            assert escape(repr(text)) in page
    assert re.search(r'<td class="num" data-v="2" title="dreamed (1st|2nd)">2</td>', page)


def test_the_sweep_command_takes_modes(modes_swept, tmp_path, capsys, monkeypatch):
    import dreamlens.sweeps

    _, s, _ = modes_swept
    argv = ["sweep", MODES_SPEC, "--out", str(tmp_path / "run"), "--quiet"]
    args = build_parser().parse_args([*argv, "--modes", "3", "--mode-limit", "5.5"])
    assert args.modes == 3 and args.mode_limit == 5.5
    assert build_parser().parse_args(argv).modes is None
    for bad in (["--modes", "0"], ["--modes", "two"], ["--modes", "2", "--mode-limit", "0"]):
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args([*argv, *bad])
        assert e.value.code == 2
    capsys.readouterr()
    assert main([*argv, "--mode-limit", "5"]) == 2
    assert "--mode-limit applies only with --modes K" in capsys.readouterr().err

    seen = {}

    def fake(spec, out, **kwargs):
        seen.update(kwargs)
        return s

    monkeypatch.setattr(dreamlens.sweeps, "sweep", fake)
    assert main([*argv, "--modes", "2"]) == 0
    assert seen["modes"] == 2 and seen["mode_limit"] is None
    printed = capsys.readouterr().out
    assert "2 objectives in" in printed and "(2 modes of each objective;" in printed and "(mode 1)" in printed
    assert main([*argv, "--modes", "2", "--mode-limit", "7"]) == 0
    assert seen["modes"] == 2 and seen["mode_limit"] == 7.0
    assert main(argv) == 0 and seen["modes"] == 1 and seen["mode_limit"] is None
