"""DreamResult's folder format: every field round-trips, a save of a loaded result is identical to the
first save, and a folder written in the current format (version 1) still loads."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from dreamlens.results import FORMAT_VERSION, DreamResult


def _full_result(n: int = 6, length: int = 3) -> DreamResult:
    """A result whose every field differs from its default, so that a field lost on the way shows."""
    rng = np.random.default_rng(0)
    return DreamResult(
        objective="blocks.1.mlp.hook_post[3]",
        method="epo",
        config={"length": length, "seed": 7, "prefix": "Hi", "banned_tokens": [1, 2]},
        ids=rng.integers(0, 1000, (n, length)).astype(np.int64),
        activation=rng.normal(size=n),
        xe=rng.uniform(1, 9, size=n),
        iteration=np.repeat(np.arange(n // 2), 2).astype(np.int64),
        text=[f"prompt {i} é" for i in range(n)],
        prefix="Hi",
        suffix=" there",
        bos_token_id=0,
        model_name="tiny",
        wall_time=12.5,
        n_forward=40,
        n_gradient=8,
        token_forwards=1234,
        iterations=3,
        stopped="error",
        state={"population": [[1, 2, 3]], "rng": "abc", "nested": {"k": 1.5}},
        error="RuntimeError: boom",
    )


def _same(a: object, b: object) -> bool:
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    return type(a) is type(b) and a == b


def test_every_field_differs_from_its_default_in_the_sample():
    r = _full_result()
    for f in dataclasses.fields(DreamResult):
        if f.default is not dataclasses.MISSING:
            assert getattr(r, f.name) != f.default, f.name
        elif f.default_factory is not dataclasses.MISSING:
            assert getattr(r, f.name) != f.default_factory(), f.name


@pytest.mark.parametrize("n", [6, 0])
def test_every_field_round_trips(tmp_path, n):
    r = _full_result(n)
    loaded = DreamResult.load(r.save(tmp_path / "r"))
    for f in dataclasses.fields(DreamResult):
        assert _same(getattr(loaded, f.name), getattr(r, f.name)), f.name
    pd.testing.assert_frame_equal(loaded.history, r.history, check_exact=True)
    pd.testing.assert_frame_equal(loaded.frontier, r.frontier, check_exact=True)


@pytest.mark.parametrize("n", [6, 0])
def test_save_load_save_is_identical(tmp_path, n):
    first = _full_result(n).save(tmp_path / "first")
    second = DreamResult.load(first).save(tmp_path / "second")
    for name in ("result.json", "history.parquet"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_result_json_holds_every_field_but_the_history_columns(tmp_path):
    r = _full_result()
    meta = json.loads((r.save(tmp_path / "r") / "result.json").read_text())
    history = set(r.history.columns)
    assert history == {"iteration", "text", "ids", "activation", "xe"}
    stored = {f.name for f in dataclasses.fields(DreamResult)} - history
    assert set(meta) == stored | {"format", "version", "frontier"}
    assert list(pd.read_parquet(tmp_path / "r" / "history.parquet").columns) == list(r.history.columns)


def test_a_folder_of_the_current_format_loads(tmp_path):
    """result.json and history.parquet exactly as dreamlens wrote them before fields drove the format
    (key order included), with the optional keys left out: those take their defaults."""
    folder = tmp_path / "v1"
    folder.mkdir()
    meta = {
        "format": "dreamlens.DreamResult",
        "version": FORMAT_VERSION,
        "objective": "blocks.0.mlp.hook_post[1]",
        "method": "gcg",
        "config": {"length": 2},
        "prefix": "",
        "suffix": "",
        "bos_token_id": None,
        "model_name": "m",
        "wall_time": 0.25,
        "n_forward": 3,
        "n_gradient": 1,
        "token_forwards": 9,
        "iterations": 2,
        "stopped": "budget",
        "error": "",
        "state": {"x": 1},
        "frontier": [],
    }
    (folder / "result.json").write_text(json.dumps(meta, indent=1))
    pd.DataFrame(
        {
            "iteration": np.array([0, 1], dtype=np.int64),
            "text": ["a b", "c d"],
            "ids": [np.array([1, 2], dtype=np.int32), np.array([3, 4], dtype=np.int32)],
            "activation": np.array([0.5, 1.5]),
            "xe": np.array([2.0, 3.0]),
        }
    ).to_parquet(folder / "history.parquet", index=False)
    r = DreamResult.load(folder)
    assert (r.objective, r.method, r.model_name) == ("blocks.0.mlp.hook_post[1]", "gcg", "m")
    assert (r.stopped, r.state) == ("budget", {"x": 1})
    assert (r.wall_time, r.n_forward, r.n_gradient, r.token_forwards, r.iterations) == (0.25, 3, 1, 9, 2)
    assert r.ids.dtype == np.int64 and r.ids.tolist() == [[1, 2], [3, 4]]
    assert r.text == ["a b", "c d"] and r.iteration.tolist() == [0, 1] and r.xe.tolist() == [2.0, 3.0]
    assert r.best()["text"] == "c d"

    optional = [f for f in dataclasses.fields(DreamResult) if f.name in meta and f.name not in ("objective", "method", "config")]
    assert len(optional) == 12
    for f in optional:
        del meta[f.name]
    (folder / "result.json").write_text(json.dumps(meta))
    bare = DreamResult.load(folder)
    for f in optional:
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert _same(getattr(bare, f.name), default), f.name


@pytest.mark.parametrize("limit", [0.5, 3.0, 6.0, float("inf")])
def test_best_index_is_the_row_best_returns(limit):
    r = _full_result(n=12)
    ok = r.xe <= limit
    i = r.best_index(limit)
    if not ok.any():
        assert i is None
        with pytest.raises(Exception, match=f"no prompt has xe <= {limit}"):
            r.best(limit)
        return
    assert r.activation[i] == r.activation[ok].max() and r.xe[i] <= limit
    assert r.best(limit)["text"] == r.text[i]
