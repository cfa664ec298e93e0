"""The Ray engine of `sweep`: actors (one torch thread each) load the model once from its spec, scan corpus
slices and run chunks; the driver merges each chunk's scan, writes each finished chunk once and shows progress.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import uuid
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import DreamlensError
from ..install import DISTRIBUTION

if TYPE_CHECKING:
    import pandas as pd

    from ..analysis.scan import ScanResult

RAY_VERSION = "2.60.0"
INSTALL_HINT = f'pip install "{DISTRIBUTION}[ray]" (ray=={RAY_VERSION})'
# Ray restarts a worker that dies and reruns its task this many times; after that the driver moves the
# task to a fresh worker, up to ATTEMPTS times in all, before giving up on the sweep.
RESTARTS = 3
ATTEMPTS = 3
# read by ray when imported: "0" keeps a local cluster on 127.0.0.1 (see `cluster`)
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# environment passed on to every worker (with PYTHONPATH, so workers import the driver's dreamlens)
PASSED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "DREAMLENS_CACHE", "XDG_CACHE_HOME", "TOKENIZERS_PARALLELISM")

Frames = tuple["pd.DataFrame", "pd.DataFrame", "pd.DataFrame"]


class RayEngineError(DreamlensError, RuntimeError):
    """The Ray engine cannot run: no cluster at the address, no CPU for a worker, or a chunk whose
    workers kept dying."""


class RayMissingError(DreamlensError, ImportError):
    """`engine="ray"` (or `--ray`) without ray installed."""


def import_ray() -> Any:
    """The `ray` module, imported on first use; `RayMissingError` naming the install command if absent."""
    try:
        import ray
    except ImportError as e:
        raise RayMissingError(
            f"the Ray engine needs ray, which is not installed: {INSTALL_HINT}; or run the sweep with the local "
            "engine (engine='local', or no --ray)"
        ) from e
    return ray


# ---------------------------------------------------------------------------------------------
# The cluster


def worker_env() -> dict[str, str]:
    """What every worker's environment gets: PYTHONPATH with the folder this dreamlens is imported from
    (unless it is installed in site-packages), one thread for OpenMP, and the driver's model-cache settings."""
    import dreamlens

    root = str(Path(dreamlens.__file__).resolve().parents[1])
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if not any(part in ("site-packages", "dist-packages") for part in Path(root).parts) and root not in paths:
        paths.insert(0, root)
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update({k: os.environ[k] for k in PASSED_ENV if k in os.environ})
    return env


@contextmanager
def cluster(address: str | None, workers: int | None) -> Iterator[Any]:
    """Ray, connected: to a running cluster at `address` ("auto", "HOST:PORT", "ray://..."), to the one
    this process already joined, or else to a local cluster on 127.0.0.1 with `workers` CPUs (default:
    all), started here and shut down on exit. Yields the `ray` module."""
    # Ray resolves 127.0.0.1 to the machine's routable address unless it is told it runs no multi-node
    # cluster (read when ray is first imported): set for a local cluster, so every Ray process stays on
    # the loopback interface, and restored once its processes have started.
    loopback = not address and "ray" not in sys.modules and LOOPBACK_ENV not in os.environ
    if loopback:
        os.environ[LOOPBACK_ENV] = "0"
    try:
        ray = import_ray()
        started = not ray.is_initialized()  # else a notebook or a test joined a cluster already: leave it running
        if started:
            _init(ray, address, workers)
    finally:
        if loopback:
            os.environ.pop(LOOPBACK_ENV, None)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def _init(ray: Any, address: str | None, workers: int | None) -> None:
    quiet: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
    try:
        if address:
            ray.init(address=address, **quiet)
        else:
            ray.init(num_cpus=workers or os.cpu_count() or 1, include_dashboard=False, _node_ip_address="127.0.0.1", **quiet)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as e:
        where = f"the Ray cluster at {address!r}" if address else "a local Ray cluster on 127.0.0.1"
        fix = ("start it (`ray start --head` on its head node) or give its address as HOST:PORT, or drop the address "
               "to start a local cluster" if address else "check that `ray start --head --node-ip-address 127.0.0.1` works")
        raise RayEngineError(f"could not connect to {where}: {type(e).__name__}: {e}; {fix}") from e


# ---------------------------------------------------------------------------------------------
# The worker: one Ray actor


class SweepWorker:
    """One worker (a Ray actor with one CPU): loads the model once from its spec, then scans corpus slices
    (`scan_part`) and runs chunks (`run_chunk`), one at a time. `state()` answers while a task runs.

    An error while loading is kept and raised by every call, so it reaches the driver as itself."""

    def __init__(self, model: str | None, threads: int = 1):
        self.threads = threads
        self.task: str | None = None
        self.error: BaseException | None = None
        self.model: Any = None
        self.saes: dict[str, Any] = {}  # each SAE loaded once, for every chunk of this worker
        self._threads()
        try:
            from .chunk import load_model_spec

            self.model = load_model_spec(model)
        except Exception as e:
            self.error = e

    def _threads(self) -> None:
        import torch

        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)

    def _ready(self, task: str) -> None:
        if self.error is not None:
            raise self.error
        self._threads()
        self.task = task

    def check(self) -> dict[str, Any]:
        """`state()` once the model is loaded; the loading error, if any, raised as itself."""
        if self.error is not None:
            raise self.error
        return self.state()

    def state(self) -> dict[str, Any]:
        """This worker's process id, the task it is running (None when idle), its torch threads, where it
        imports dreamlens from, and the error that stopped it loading the model (None if it loaded)."""
        import torch

        import dreamlens

        error = repr(self.error) if self.error is not None else None
        return {"pid": os.getpid(), "task": self.task, "threads": torch.get_num_threads(), "dreamlens": dreamlens.__file__,
                "error": error}

    def scan_part(self, objectives: list[str], settings: Any, part: tuple[int, int]) -> ScanResult:
        """Slice `part` = (i, n) of the chunk's scan (unscored: the merged scan's examples are scored once)."""
        self._ready(f"scan {part[0] + 1}/{part[1]} of {len(objectives)} objective(s)")
        try:
            from ..analysis.scan import scan
            from .chunk import parse_objectives

            objs = parse_objectives(objectives, self.saes)
            return scan(self.model, objs, settings.corpus, **settings.scan_kwargs(), score=False, cache=False, progress=False,
                        part=part)
        finally:
            self.task = None

    def run_chunk(self, objectives: list[str], settings: Any, scan: ScanResult | None, first: int) -> Frames:
        """`chunk.run_chunk` on the merged scan (scored there): the chunk's summary, frontiers and examples."""
        self._ready(f"chunk of {len(objectives)} objective(s) from #{first}")
        try:
            from .chunk import run_chunk

            return run_chunk(self.model, objectives, settings, scan, first=first, saes=self.saes)
        finally:
            self.task = None


# ---------------------------------------------------------------------------------------------
# The driver: schedule scan slices and chunks on idle workers, retry on dead ones


@dataclass
class _Chunk:
    index: int
    objectives: list[str]
    parts: list[Any] = field(default_factory=list)  # finished scan slices, by slice index
    scan: Any = None  # the merged scan, once every slice is in


@dataclass
class _Job:
    chunk: _Chunk
    part: int | None  # a scan slice, or None for the chunk itself
    attempts: int = 0


class _Pool:
    """The workers (Ray actor handles), created with restarts and task retries."""

    def __init__(self, ray: Any, model: str | None, n: int, threads: int):
        self.ray, self.model, self.threads = ray, model, threads
        self.run_id = uuid.uuid4().hex[:8]
        self.created = 0
        self.actor_cls = ray.remote(SweepWorker)
        self.actors = [self.new() for _ in range(n)]

    def new(self) -> Any:
        name = f"dreamlens-sweep-{self.run_id}-{self.created}"
        self.created += 1
        return self.actor_cls.options(
            name=name, num_cpus=1, max_restarts=RESTARTS, max_task_retries=RESTARTS, max_concurrency=2,
            runtime_env={"env_vars": worker_env()},
        ).remote(self.model, self.threads)

    def check(self) -> list[dict[str, Any]]:
        """Every worker's state, once it has loaded the model; a loading error is raised as itself."""
        try:
            return _get(self.ray, [a.check.remote() for a in self.actors])
        except self.ray.exceptions.RayActorError as e:
            raise RayEngineError(
                f"a Ray worker died {RESTARTS + 1} times while loading the model {self.model or 'embedded'!r} ({e}); "
                "it is being killed (out of memory?): give each worker more memory, or run fewer workers per node"
            ) from e

    def close(self) -> None:
        for a in self.actors:
            try:
                self.ray.kill(a, no_restart=True)
            except Exception:
                pass


def _get(ray: Any, refs: Any) -> Any:
    """`ray.get`, with a task's own error (e.g. a `DreamlensError` of a bad objective) raised as itself."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, DreamlensError):
            raise cause from None
        raise


def _cpus(ray: Any) -> int:
    return int(ray.cluster_resources().get("CPU", 0))


def run_ray(
    todo: Sequence[tuple[int, list[str]]],
    settings: Any,
    write: Callable[[int, Frames], Any],
    *,
    model: str | None = None,
    address: str | None = None,
    workers: int | None = None,
    threads: int = 1,
    progress: bool = True,
) -> None:
    """Run the chunks `todo` ((chunk index, objectives) pairs) on Ray workers; `write(index, frames)` is
    called here, on the driver, exactly once per chunk as it finishes (in any order).

    Each worker loads the model from `model` (the spec: None for the embedded model, a name or path for
    `load_model`, or "package.module:function"), never from pickled weights. A chunk's scan is split
    into one corpus slice per worker; the slices are merged here and the chunk (dreams and metrics) runs
    on the next idle worker. A worker that dies is restarted by Ray and its task rerun; if it keeps dying,
    the task moves to a fresh worker. `workers`: default every CPU of the cluster; `threads` torch threads
    per worker. On an error or Ctrl-C the workers are stopped; every chunk already written stays."""
    todo = [(int(i), list(objs)) for i, objs in todo]
    if not todo:
        return
    if workers is not None and workers < 1:
        raise RayEngineError(f"workers must be at least 1, got {workers}; or leave it out to use every CPU of the cluster")
    from tqdm.auto import tqdm

    from ..optim.loop import sigterm_as_interrupt

    with cluster(address, workers) as ray:
        cpus = _cpus(ray)
        if cpus < 1:
            raise RayEngineError("the Ray cluster has no CPU for a worker; start a node with CPUs (`ray start --num-cpus N`)")
        n = min(workers or cpus, cpus)
        if workers and workers > cpus:
            warnings.warn(f"the Ray cluster has {cpus} CPU(s): running {n} worker(s), not {workers}", stacklevel=2)
        total = sum(len(o) for _, o in todo)
        label = f"{n} ray worker{'s' * (n > 1)}"
        bar = tqdm(total=total, desc=f"sweep (starting {label})", unit="obj", disable=not progress, smoothing=0.1)
        pool = _Pool(ray, model, n, threads)
        try:
            with sigterm_as_interrupt():
                pool.check()
                bar.set_description(f"sweep ({label})", refresh=False)
                bar.reset(total)  # rate and ETA from here: the workers have loaded the model
                _schedule(ray, pool, [_Chunk(i, o) for i, o in todo], settings, write, bar)
        finally:
            bar.close()
            pool.close()


def _schedule(ray: Any, pool: _Pool, chunks: list[_Chunk], settings: Any, write: Callable[[int, Frames], Any], bar: Any) -> None:
    from ..analysis.merge import merge_scans

    # one corpus slice per worker, each at least one of the scan's batches
    windows = math.ceil(settings.tokens / settings.window)
    batches = math.ceil(windows / settings.scan_batch_size)
    n_parts = max(1, min(len(pool.actors), batches))
    waiting = deque(chunks)  # not started
    ready: deque[_Job] = deque()  # a scan slice to (re)run, or a chunk whose scan is merged
    idle = list(pool.actors)
    running: dict[Any, tuple[Any, _Job]] = {}
    left = len(chunks)

    def submit(actor: Any, job: _Job) -> None:
        c = job.chunk
        if job.part is None:
            ref = actor.run_chunk.remote(c.objectives, settings, c.scan, c.index * settings.chunk_size)
        else:
            ref = actor.scan_part.remote(c.objectives, settings, (job.part, n_parts))
        running[ref] = (actor, job)

    while left:
        while idle:
            if ready:  # chunks before new scans: a merged scan waits for nobody
                job = ready.popleft()
            elif waiting:
                c = waiting.popleft()
                c.parts = [None] * n_parts
                job = _Job(c, 0)
                ready.extend(_Job(c, p) for p in range(1, n_parts))
            else:
                break
            submit(idle.pop(), job)
        done, _ = ray.wait(list(running), num_returns=1)
        actor, job = running.pop(done[0])
        try:
            out = _get(ray, done[0])
        except ray.exceptions.RayActorError as e:  # the worker died RESTARTS times: a fresh one takes over
            job.attempts += 1
            what = f"chunk {job.chunk.index}" + (f" (scan slice {job.part + 1}/{n_parts})" if job.part is not None else "")
            if job.attempts >= ATTEMPTS:
                raise RayEngineError(
                    f"{what} failed on {job.attempts} workers, each restarted {RESTARTS} times ({type(e).__name__}: {e}); "
                    "a worker process is being killed (out of memory?): give workers more memory or run fewer per node"
                ) from e
            pool.actors.remove(actor)
            actor = pool.new()
            pool.actors.append(actor)
            ready.appendleft(job)
            idle.append(actor)
            continue
        idle.append(actor)
        c = job.chunk
        if job.part is not None:
            c.parts[job.part] = out
            if all(p is not None for p in c.parts):
                c.scan, c.parts = merge_scans(c.parts), []
                ready.appendleft(_Job(c, None))
            continue
        write(c.index, out)
        c.scan = None
        left -= 1
        bar.update(len(c.objectives))

