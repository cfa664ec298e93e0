"""The Ray engine on a real local Ray cluster (2 CPUs, every process on 127.0.0.1): the same rows and values
as the local engine (and where each worker ran, in sweep.json), a sweep that survives a worker killed in the
middle of it, or out of memory on one objective, and its errors."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

import dreamlens as dl
from dreamlens.sweeps import SweepError
from dreamlens.sweeps.errors import RayMissingError
from dreamlens.sweeps.ray_engine import cluster, import_ray

pytest.importorskip("ray", reason='the Ray engine needs ray: pip install "dreamlens-tl[ray]"')
pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = "blocks.1.mlp.hook_post[0:8]"  # 8 objectives in 4 chunks of 2
# tiny: 2048 tokens in windows of 16 are 2 scan batches of 64 windows, so each chunk's scan is 2 slices, merged
SWEEP = dict(model="dreamlens.testing:tiny_model", max_token_forwards=400, scan=dl.ScanConfig(tokens=2048, window=16, top_k=4),
             chunk_size=2, length=4, progress=False)
TIMING = ["seconds"]  # summary columns that differ between any two runs


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster of 2 CPUs on 127.0.0.1 for this module, shut down at its end."""
    with cluster(None, 2) as ray:
        yield ray


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """The reference: the same sweep with the local engine, in this process."""
    return dl.sweep(SPEC, tmp_path_factory.mktemp("local") / "sweep", **SWEEP)


def assert_same_sweep(a: dl.Sweep, b: dl.Sweep) -> None:
    """Same rows, same values: the dreams exactly, the scan statistics within float rounding."""
    pd.testing.assert_frame_equal(a.summary.drop(columns=TIMING), b.summary.drop(columns=TIMING), check_exact=False, rtol=1e-6)
    pd.testing.assert_frame_equal(a.frontiers, b.frontiers, check_exact=True)
    pd.testing.assert_frame_equal(a.examples, b.examples, check_exact=False, rtol=1e-6)


def dreamlens_workers(ray) -> list:
    return [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("dreamlens-sweep-")]


def test_ray_workers_load_the_model_in_the_sweeps_dtype(ray_cluster, tmp_path):
    """dtype= reaches every Ray worker (each loads its own model): sweep.json says what each one ran in."""
    got = dl.sweep("blocks.1.mlp.hook_post[0:2]", tmp_path / "sweep", engine="ray", dtype="bf16",
                   **{**SWEEP, "max_token_forwards": 200})
    assert got.complete and len(got) == 2
    assert [(w["device"], w["dtype"]) for w in got.runs[-1]["workers"]] == [("cpu", "bfloat16")] * 2


def test_ray_equals_local(ray_cluster, local, tmp_path):
    out = tmp_path / "sweep"
    got = dl.sweep(SPEC, out, engine="ray", **SWEEP)
    assert got.complete and len(got) == 8
    assert_same_sweep(local, got)
    assert sorted(p.name for p in (out / "summary").iterdir()) == [f"chunk-{i:05d}.parquet" for i in range(4)]
    assert dreamlens_workers(ray_cluster) == []  # the engine stopped its workers
    ran = got.runs[-1]  # what ran where, in sweep.json: two workers of this cluster, on their CPUs, no GPU
    assert ran["engine"] == "ray" and ran["address"] == "local" and ran["gpus_per_worker"] == 0
    assert [(w["node"], w["device"], w["dtype"], w["gpu_ids"]) for w in ran["workers"]] == [("127.0.0.1", "cpu", "float32", [])] * 2
    # again: every chunk is done, nothing runs (no worker starts)
    t0 = time.perf_counter()
    again = dl.sweep(SPEC, out, engine="ray", **SWEEP)
    assert time.perf_counter() - t0 < 5
    assert_same_sweep(got, again)


def test_ray_modes_equal_local(ray_cluster, tmp_path):
    """A sweep of modes goes through the same chunks: the same rows, a row per mode, as the local engine."""
    spec, kw = "blocks.1.mlp.hook_post[0:2]", {**SWEEP, "chunk_size": 1, "modes": 2, "mode_limit": 20.0}
    here = dl.sweep(spec, tmp_path / "local", **kw)
    got = dl.sweep(spec, tmp_path / "ray", engine="ray", **kw)
    assert got.complete and got.modes == 2 and list(got.summary["mode"]) == [1, 2, 1, 2]
    assert_same_sweep(here, got)


class Killer(threading.Thread):
    """Once the first chunk is stored, SIGKILLs the process of a worker that is running a chunk (its pid
    from the worker itself); records every worker state it saw."""

    def __init__(self, ray, out: Path):
        super().__init__(daemon=True)
        self.ray, self.out = ray, out
        self.seen: list[dict] = []
        self.killed: dict | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set() and self.killed is None:
            if any((self.out / "summary").glob("chunk-*.parquet")):
                for a in dreamlens_workers(self.ray):
                    try:
                        state = self.ray.get(self.ray.get_actor(a["name"], namespace=a["namespace"]).state.remote(), timeout=5)
                    except Exception:  # a worker that just ended
                        continue
                    self.seen.append(state)
                    if (state["task"] or "").startswith("chunk"):
                        os.kill(state["pid"], signal.SIGKILL)
                        self.killed = state
                        return
            time.sleep(0.02)


def test_worker_killed_mid_sweep(ray_cluster, local, tmp_path):
    out = tmp_path / "sweep"
    killer = Killer(ray_cluster, out)
    killer.start()
    try:
        got = dl.sweep(SPEC, out, engine="ray", **SWEEP)
    finally:
        killer.stop.set()
        killer.join()
    assert killer.killed is not None, f"no worker was caught running a chunk (states seen: {killer.seen})"
    # every objective exactly once, with the values of the local engine
    assert got.summary["index"].tolist() == list(range(8))
    assert got.summary["objective"].tolist() == local.summary["objective"].tolist()
    for table in (got.frontiers, got.examples):
        assert set(table["index"]) == set(range(8)) and not table[["index", "rank"]].duplicated().any()
    assert_same_sweep(local, got)
    # the workers: one torch thread each, and this checkout's dreamlens (PYTHONPATH passed on)
    assert {s["threads"] for s in killer.seen} == {1}
    assert {s["dreamlens"] for s in killer.seen} == {dl.__file__}


def test_a_worker_out_of_memory_on_one_objective(ray_cluster, tmp_path):
    """A worker whose model runs out of memory in the dream of one objective (`tiny_model_oom`: torch's
    OutOfMemoryError at every pass, however few prompts): that objective's row says so, the sweep goes on."""
    from dreamlens.testing import OOM_HOOK

    spec = f"blocks.1.mlp.hook_post[0];{OOM_HOOK}[0];blocks.1.mlp.hook_post[1:3]"
    got = dl.sweep(spec, tmp_path / "sweep", engine="ray", **{**SWEEP, "model": "dreamlens.testing:tiny_model_oom"})
    assert got.complete and got.summary["index"].tolist() == [0, 1, 2, 3]
    assert got.summary["stopped"].tolist() == ["budget", "error", "budget", "budget"]
    assert got.summary["error"].iloc[1].startswith("OutOfMemoryError: CUDA out of memory (simulated")
    assert got.frontier(1).empty and all(len(got.frontier(i)) for i in (0, 2, 3))


def test_worker_error_is_raised_as_itself(ray_cluster, tmp_path):
    with pytest.raises(SweepError, match="cannot import 'no_such_module'.*PYTHONPATH"):
        dl.sweep(SPEC, tmp_path / "sweep", **{**SWEEP, "model": "no_such_module:model"}, engine="ray", workers=1)
    assert dreamlens_workers(ray_cluster) == []


def test_ray_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(RayMissingError, match=r'pip install "dreamlens-tl\[ray\]"'):
        import_ray()
    with pytest.raises(ImportError):  # still an ImportError to code that catches those
        import_ray()
