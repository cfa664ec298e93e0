import numpy as np
import pytest

import dreamlens as dl
from dreamlens.errors import DreamError

OBJ = "blocks.1.mlp.hook_post[3]"
SMALL = dict(length=4, lam=0.7, children=6, topk=48, iters=3, seed=3)


pytestmark = pytest.mark.usefixtures("one_thread")


def run(model, **kw):
    return dl.gcg(model, OBJ, dl.GCGConfig(**{**SMALL, **kw}), progress=False)


@pytest.fixture(scope="module")
def result(tiny_model):
    return run(tiny_model)


def test_gcg_equals_epo_with_one_member(tiny_model, result):
    e = dl.epo(tiny_model, OBJ, dl.EPOConfig(length=4, population=1, lam_min=0.7, lam_max=0.7, children=6, topk=48,
                                             iters=3, restart_every=0, seed=3), progress=False)
    assert np.array_equal(result.ids, e.ids)
    np.testing.assert_array_equal(result.activation, e.activation)
    np.testing.assert_array_equal(result.xe, e.xe)
    np.testing.assert_array_equal(result.iteration, e.iteration)
    assert result.text == e.text and result.token_forwards == e.token_forwards


def test_gcg_is_labelled_and_keeps_its_config(result):
    assert result.method == "gcg" and result.config["lam"] == 0.7 and "population" not in result.config
    assert dl.GCGConfig().to_epo().population == 1 and dl.GCGConfig().to_epo().restart_every == 0


def test_gcg_resume_continues_identically(tiny_model, result, tmp_path):
    run(tiny_model, iters=2).save(tmp_path / "half")
    cont = dl.gcg(tiny_model, OBJ, dl.GCGConfig(**SMALL), resume=tmp_path / "half", progress=False)
    assert cont.method == "gcg" and cont.iterations == SMALL["iters"]
    assert np.array_equal(cont.ids, result.ids)
    with pytest.raises(DreamError, match="lam_min"):
        dl.gcg(tiny_model, OBJ, dl.GCGConfig(**{**SMALL, "lam": 2.0}), resume=tmp_path / "half", progress=False)


def test_gcg_refuses_a_non_positive_penalty(tiny_model):
    with pytest.raises(DreamError, match="tiny lam such as 1e-6"):
        run(tiny_model, lam=0.0)


def test_cli_dream_routes_every_method_through_dream(tiny_model, monkeypatch, tmp_path, capsys):
    from dreamlens import cli, models

    monkeypatch.setattr(models, "load_model", lambda name=None: tiny_model)
    base = ["dream", OBJ, "--length", "4", "--iters", "1", "--seed", "0"]
    assert cli.main(base + ["--method", "gcg", "--children", "4", "--topk", "16", "--out", str(tmp_path / "g")]) == 0
    assert dl.DreamResult.load(tmp_path / "g").method == "gcg"
    assert cli.main(base + ["--method", "epo", "--population", "2", "--children", "2", "--out", str(tmp_path / "e")]) == 0
    assert dl.DreamResult.load(tmp_path / "e").method == "epo"
    assert "Pareto frontier" in capsys.readouterr().out
    assert cli.main(base + ["--method", "gcg", "--population", "2"]) == 2
    assert "--population is not an option of gcg" in capsys.readouterr().err
