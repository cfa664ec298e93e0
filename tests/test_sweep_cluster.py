"""Sweeps on clusters as a user meets them, every Ray process on 127.0.0.1 and stopped at the end: an address
where nothing answers (a fast `error:` line), a cluster started by `ray start --head` in another process and
joined at its address, workers that ask for GPUs (declared on a local cluster, no real GPU), and the driver
killed mid-sweep, then the same command again."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

import dreamlens as dl
from dreamlens.sweeps.cluster import (
    ADDRESS_ENV,
    LOOPBACK_ENV,
    RayEngineError,
    cluster,
    cluster_address,
    host_port,
    loopback_only,
    plan_workers,
)

pytest.importorskip("ray", reason='the Ray engine needs ray: pip install "dreamlens-tl[ray]"')
pytestmark = pytest.mark.usefixtures("one_thread")

CLI = "import sys; from dreamlens.cli import main; sys.exit(main(sys.argv[1:]))"
SPEC = "blocks.1.mlp.hook_post[0:8]"  # 8 objectives in 4 chunks of 2
ARGS = ["--model", "dreamlens.testing:tiny_model", "--budget", "400", "--tokens", "2048", "--window", "16", "--top-examples", "4",
        "--chunk-size", "2", "--length", "4", "--quiet"]
SWEEP = dict(model="dreamlens.testing:tiny_model", max_token_forwards=400, scan=dl.ScanConfig(tokens=2048, window=16, top_k=4),
             chunk_size=2, length=4, progress=False)


def user_env(**extra: str) -> dict[str, str]:
    """This process's environment as a user's shell would have it: no Ray address, this dreamlens first."""
    env = {k: v for k, v in os.environ.items() if k not in (ADDRESS_ENV, LOOPBACK_ENV)}
    root = str(Path(dl.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def sweep_cli(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLI, "sweep", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def wait_gone(procs: list, seconds: float) -> list[str]:
    """The names of the processes of `procs` still running after `seconds` (zombies count as gone), each
    then SIGKILLed: whatever happens, the test leaves none behind."""
    import psutil

    _, alive = psutil.wait_procs(procs, timeout=seconds)
    left = []
    for p in alive:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{p.name()} ({p.pid})")
                p.kill()
        except psutil.NoSuchProcess:
            pass
    return left


def name_of(proc) -> str:
    import psutil

    try:
        return proc.name()
    except psutil.NoSuchProcess:
        return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# Addresses, without a cluster


@pytest.mark.parametrize("address, expected", [
    ("127.0.0.1:6380", ("127.0.0.1", 6380)), ("head.example", ("head.example", 6379)),
    ("ray://10.0.0.2:10001", ("10.0.0.2", 10001)), ("ray://10.0.0.2", ("10.0.0.2", 10001)),
    ("[::1]:6379", ("::1", 6379)), ("auto", None), ("10.0.0.2:port", None),
])
def test_where_an_address_points(address, expected):
    assert host_port(address) == expected


def test_the_address_comes_from_ray_address_unless_given(monkeypatch):
    monkeypatch.delenv(ADDRESS_ENV, raising=False)
    assert cluster_address(None) is None and cluster_address("") is None and cluster_address("local") is None
    monkeypatch.setenv(ADDRESS_ENV, "10.0.0.2:6379")
    assert cluster_address(None) == "10.0.0.2:6379" and cluster_address("") == "10.0.0.2:6379"
    assert cluster_address("127.0.0.1:7000") == "127.0.0.1:7000"


def test_an_address_where_nothing_answers_fails_fast_in_one_line(tmp_path):
    port = free_port()  # nothing listens there: it was free a moment ago
    t0 = time.perf_counter()
    run = sweep_cli(SPEC, "--out", str(tmp_path / "sweep"), *ARGS, "--ray", f"127.0.0.1:{port}", env=user_env(), timeout=60)
    seconds = time.perf_counter() - t0
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no Ray cluster answers at "), run.stderr
    assert f"'127.0.0.1:{port}'" in lines[0] and f"ray start --head --port {port}" in lines[0]
    assert "Traceback" not in run.stderr and seconds < 20  # python, torch and the CLI's imports included


def test_ray_address_where_nothing_answers(monkeypatch):
    monkeypatch.setenv(ADDRESS_ENV, f"127.0.0.1:{free_port()}")
    t0 = time.perf_counter()
    message = r"no Ray cluster answers at '127.0.0.1:\d+' \(from \$RAY_ADDRESS\).*unset RAY_ADDRESS"
    with pytest.raises(RayEngineError, match=message), cluster(None, 1):
        pass
    assert time.perf_counter() - t0 < 10


def test_the_loopback_pin_is_only_for_the_start_of_a_local_cluster(monkeypatch):
    """Set where Ray reads it (its constant, and the environment its processes inherit) while a local
    cluster starts, restored after: a later connection to a remote cluster is not pinned to 127.0.0.1."""
    constants = SimpleNamespace(ENABLE_RAY_CLUSTER=True)
    fake_ray = SimpleNamespace(_private=SimpleNamespace(ray_constants=constants))
    monkeypatch.delenv(LOOPBACK_ENV, raising=False)
    with loopback_only(fake_ray):
        assert constants.ENABLE_RAY_CLUSTER is False and os.environ[LOOPBACK_ENV] == "0"
    assert constants.ENABLE_RAY_CLUSTER is True and LOOPBACK_ENV not in os.environ
    monkeypatch.setenv(LOOPBACK_ENV, "1")  # the user's own setting survives
    with pytest.raises(KeyError), loopback_only(fake_ray):
        raise KeyError("any error")
    assert os.environ[LOOPBACK_ENV] == "1" and constants.ENABLE_RAY_CLUSTER is True


@pytest.mark.parametrize("resources, workers, per, expected", [
    ({"CPU": 8}, None, None, (8, 0.0, "")),  # no GPU: one worker per CPU
    ({"CPU": 8, "GPU": 2}, None, None, (2, 1.0, "")),  # GPUs: one each by default
    ({"CPU": 8, "GPU": 2}, None, 0.5, (4, 0.5, "")),  # two share a GPU
    ({"CPU": 8, "GPU": 2}, None, 0, (8, 0.0, "")),  # GPUs left alone
    ({"CPU": 3, "GPU": 2}, None, 0.25, (3, 0.25, "")),  # the CPUs bound it
    ({"CPU": 8, "GPU": 2}, 6, None, (2, 1.0, "the Ray cluster has 8 CPU(s) and 2 GPU(s), 1 per worker: running 2 worker(s), not 6")),
    ({"CPU": 2}, 4, None, (2, 0.0, "the Ray cluster has 2 CPU(s): running 2 worker(s), not 4")),
])
def test_how_many_workers_a_cluster_holds(resources, workers, per, expected):
    assert plan_workers(resources, workers, per) == expected


@pytest.mark.parametrize("resources, per, message", [
    ({"CPU": 0}, None, "no CPU for a worker"),
    ({"CPU": 4}, 1, r"asks for 1 GPU\(s\) \(--gpus-per-worker\) but the Ray cluster has no GPU.*`ray start --num-gpus N`"),
    ({"CPU": 4, "GPU": 1}, 2, r"asks for 2 GPU\(s\).*has 1 GPU\(s\)"),
])
def test_a_cluster_without_room_for_a_worker(resources, per, message):
    with pytest.raises(RayEngineError, match=message):
        plan_workers(resources, None, per)


# ---------------------------------------------------------------------------------------------
# A cluster of its own: `ray start --head` in another process, joined at its address


@pytest.fixture
def head() -> Iterator[tuple[str, Path, dict[str, str]]]:
    """`ray start --head --block` on 127.0.0.1 (the environment keeps Ray on the loopback, as a local
    cluster; token authentication as Ray sets it up), in its own session; stopped at the end (SIGTERM:
    `--block` stops the cluster's processes), none left behind. Yields its address, its temp folder (its
    logs) and the environment of its users."""
    port, temp = free_port(), tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths live there
    env = user_env(**{LOOPBACK_ENV: "0", "RAY_AUTH_MODE": "token"})
    ray_cli = Path(sys.executable).with_name("ray")
    command = [str(ray_cli), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
               "--num-cpus", "2", "--num-gpus", "0", "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", temp]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    tree: list = []
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"ray start exited: {proc.stderr.read() if proc.stderr else ''}"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "ray start --head did not listen within 120 s"
                time.sleep(0.5)
        yield f"127.0.0.1:{port}", Path(temp), env
        tree = descendants(proc.pid)
    finally:
        tree = tree or descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        left = wait_gone(tree, 30)
        shutil.rmtree(temp, ignore_errors=True)
    assert not left, f"processes of the cluster outlived `ray start --block`: {left}"


def test_a_sweep_joins_a_cluster_at_its_address(head, tmp_path):
    address, temp, env = head
    out = tmp_path / "sweep"
    # a driver without the cluster's token: refused, and told what to set
    refused = sweep_cli(SPEC, "--out", str(out), *ARGS, "--ray", address, env={**env, "RAY_AUTH_MODE": "disabled"})
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and f"the Ray cluster at '{address}' refuses this driver" in lines[0]
    assert "set RAY_AUTH_MODE=token" in lines[0]
    # with it, as a user of that cluster: dreamlens pins nothing (this environment keeps the driver on the
    # loopback, as the cluster), and the workers are that cluster's
    run = sweep_cli(SPEC, "--out", str(out), *ARGS, "--ray", address, "--workers", "2", env=env)
    assert run.returncode == 0, run.stderr
    assert "8 computed now, 0 from before" in run.stdout and f"ray workers ({address}): 2 on cpu at 127.0.0.1" in run.stdout
    sw = dl.load_sweep(out)
    assert sw.complete and sw.summary["index"].tolist() == list(range(8))
    ran = sw.runs[-1]
    assert ran["engine"] == "ray" and ran["address"] == address and ran["gpus_per_worker"] == 0
    assert [(w["node"], w["device"], w["gpu_ids"]) for w in ran["workers"]] == [("127.0.0.1", "cpu", [])] * 2
    logs = {p.name for p in temp.glob("session_*/logs/python-core-worker-*.log")}
    for pid in (w["pid"] for w in ran["workers"]):  # workers of the head's raylet, not of a cluster of the driver's own
        assert any(name.endswith(f"_{pid}.log") for name in logs), f"worker {pid} left no log in {temp}: {sorted(logs)}"


# ---------------------------------------------------------------------------------------------
# The driver killed


def test_the_driver_killed_mid_sweep_then_the_same_command(tmp_path):
    """SIGKILL the driver (`--ray`: its local cluster on 127.0.0.1) once a chunk is stored: Ray's processes
    end with it; the same command again computes only the rest, and every objective is in the store once."""
    out = tmp_path / "sweep"
    args = [SPEC, "--out", str(out), *ARGS, "--ray", "--workers", "2"]
    env = user_env()
    driver = subprocess.Popen([sys.executable, "-c", CLI, "sweep", *args], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    tree: list = []
    try:
        deadline = time.monotonic() + 300
        while not any((out / "summary").glob("chunk-*.parquet")):
            assert driver.poll() is None, f"the sweep ended before it was killed: {driver.stderr.read() if driver.stderr else ''}"
            assert time.monotonic() < deadline, "no chunk was stored within 300 s"
            tree = descendants(driver.pid) or tree
            time.sleep(0.05)
        tree = descendants(driver.pid) or tree
        driver.kill()
        driver.wait()
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        # the cluster (GCS, raylet, the workers) ends with its driver; Ray's dashboard and runtime-env agents see
        # the raylet gone only after ~20 s, then wait ~60 s on the dead GCS before they exit: ended here instead
        agents = [p for p in tree if "Agent" in name_of(p)]
        left = wait_gone([p for p in tree if p not in agents], 30)
        wait_gone(agents, 0)
    assert tree and not left, f"Ray processes outlived their killed driver: {left}"
    kept = {p.name: p.read_bytes() for p in (out / "summary").glob("chunk-*.parquet")}
    assert 1 <= len(kept) < 4, f"killed after {len(kept)} of 4 chunks: not midway"

    again = sweep_cli(*args, env=env)
    assert again.returncode == 0, again.stderr
    done = 2 * len(kept)
    assert f"8 objectives in {out}: {8 - done} computed now, {done} from before" in again.stdout
    sw = dl.load_sweep(out)
    assert sw.complete and sw.summary["index"].tolist() == list(range(8))  # every objective exactly once
    assert sw.summary["objective"].tolist() == [f"blocks.1.mlp.hook_post[{i}]" for i in range(8)]
    for table in (sw.frontiers, sw.examples):
        assert set(table["index"]) == set(range(8)) and not table[["index", "rank"]].duplicated().any()
    assert {name: (out / "summary" / name).read_bytes() for name in kept} == kept  # stored once, never redone
    assert [r["engine"] for r in sw.runs] == ["ray", "ray"]  # both runs noted


# ---------------------------------------------------------------------------------------------
# GPUs, declared on a local cluster (no real GPU)


@pytest.fixture(scope="module")
def gpu_cluster():
    """A local cluster of 2 CPUs and 2 declared GPUs on 127.0.0.1, shut down at the end of the module."""
    with cluster(None, 2, gpus=2) as ray:
        yield ray


def test_workers_ask_for_a_gpu_each(gpu_cluster, tmp_path):
    """By default each worker asks Ray for one GPU (the cluster has GPUs) and gets its own; the metadata
    says which. They load the model on their CPU here (`device="cpu"`): this torch has no CUDA."""
    got = dl.sweep("blocks.1.mlp.hook_post[0:4]", tmp_path / "sweep", engine="ray", device="cpu", **SWEEP)
    assert got.complete
    ran = got.runs[-1]
    assert ran["gpus_per_worker"] == 1.0 and len(ran["workers"]) == 2
    assert sorted(w["gpu_ids"] for w in ran["workers"]) == [["0"], ["1"]]  # Ray gave each worker a GPU of its own
    assert {w["device"] for w in ran["workers"]} == {"cpu"} and {w["node"] for w in ran["workers"]} == {"127.0.0.1"}
    half = dl.sweep("blocks.1.mlp.hook_post[0:2]", tmp_path / "half", engine="ray", device="cpu", gpus_per_worker=0.5,
                    workers=2, **SWEEP)
    assert half.runs[-1]["gpus_per_worker"] == 0.5 and all(len(w["gpu_ids"]) == 1 for w in half.runs[-1]["workers"])


def test_a_gpu_that_torch_cannot_see_is_an_error(gpu_cluster, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this torch sees a GPU")
    t0 = time.perf_counter()
    with pytest.raises(RayEngineError, match=r"was given GPU \d by Ray, but its torch .* sees no CUDA device.*--gpus-per-worker 0"):
        dl.sweep("blocks.1.mlp.hook_post[0:2]", tmp_path / "sweep", engine="ray", workers=1, **SWEEP)
    assert time.perf_counter() - t0 < 60
    zero = dl.sweep("blocks.1.mlp.hook_post[0:2]", tmp_path / "zero", engine="ray", workers=1, gpus_per_worker=0, **SWEEP)
    assert [(w["gpu_ids"], w["device"]) for w in zero.runs[-1]["workers"]] == [([], "cpu")]
