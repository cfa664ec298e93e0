"""The Ray engine of `sweep`: actors (one torch thread each) load the model once from its spec, scan corpus
slices and run chunks; the driver merges each chunk's scan, writes each finished chunk once and shows progress.
"""

from __future__ import annotations

import math
import os
import socket
import uuid
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from ..analysis.merge import merge_scans
from ..analysis.scan import scan
from ..errors import DreamlensError
from ..optim.loop import sigterm_as_interrupt
from .chunk import load_model_spec, parse_objectives, run_chunk
from .cluster import (
    INSTALL_HINT,
    RAY_VERSION,
    cluster,
    cluster_address,
    import_ray,
    plan_workers,
    worker_device,
    worker_env,
)
from .errors import RayEngineError

if TYPE_CHECKING:
    import pandas as pd

    from ..analysis.scan import ScanResult

__all__ = [
    "run_ray", "SweepWorker", "RESTARTS", "ATTEMPTS", "INSTALL_HINT", "RAY_VERSION",
    "cluster", "import_ray",
]

# Ray restarts a worker that dies and reruns its task this many times; after that the driver moves the
# task to a fresh worker, up to ATTEMPTS times in all, before giving up on the sweep.
RESTARTS = 3
ATTEMPTS = 3

Frames = tuple["pd.DataFrame", "pd.DataFrame", "pd.DataFrame"]


# ---------------------------------------------------------------------------------------------
# The worker: one Ray actor


class SweepWorker:
    """One worker (a Ray actor with one CPU, and the GPUs it asked for): loads the model once from its spec,
    on its GPU when it has one (`worker_device`), then scans corpus slices (`scan_part`) and runs chunks
    (`run_chunk`), one at a time. `state()` answers while a task runs.

    An error while loading is kept and raised by every call, so it reaches the driver as itself."""

    def __init__(self, model: str | None, threads: int = 1, device: str | None = None, dtype: Any = None):
        self.threads = threads
        self.task: str | None = None
        self.error: BaseException | None = None
        self.model: Any = None
        self.saes: dict[str, Any] = {}  # each SAE loaded once, for every chunk of this worker
        self._threads()
        try:
            self.model = load_model_spec(model, device=worker_device(device, self.gpu_ids()), dtype=dtype)
        except Exception as e:
            self.error = e

    @staticmethod
    def gpu_ids() -> list[str]:
        return [str(g) for g in import_ray().get_gpu_ids()]

    def _threads(self) -> None:
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
        """This worker's process id, node (address and host name), the GPUs Ray gave it, the device and dtype
        its model is on (None before it loaded), the task it is running (None when idle), its torch threads,
        where it imports dreamlens from, and the error that stopped it loading the model (None if it loaded)."""
        ray = import_ray()
        error = repr(self.error) if self.error is not None else None
        cfg = getattr(self.model, "cfg", None)
        return {"pid": os.getpid(), "node": ray.util.get_node_ip_address(), "host": socket.gethostname(),
                "gpu_ids": self.gpu_ids(), "device": None if cfg is None else str(cfg.device),
                "dtype": None if cfg is None else str(cfg.dtype).removeprefix("torch."), "task": self.task,
                "threads": torch.get_num_threads(), "dreamlens": str(Path(__file__).resolve().parents[1] / "__init__.py"),
                "error": error}

    def scan_part(self, objectives: list[str], settings: Any, part: tuple[int, int]) -> ScanResult:
        """Slice `part` = (i, n) of the chunk's scan (unscored: the merged scan's examples are scored once)."""
        self._ready(f"scan {part[0] + 1}/{part[1]} of {len(objectives)} objective(s)")
        try:
            objs = parse_objectives(objectives, self.saes)
            return scan(self.model, objs, settings.corpus, config=settings.scan, score=False, cache=False, progress=False,
                        part=part)
        finally:
            self.task = None

    def run_chunk(self, objectives: list[str], settings: Any, scan: ScanResult | None, first: int) -> Frames:
        """`chunk.run_chunk` on the merged scan (scored there): the chunk's summary, frontiers and examples."""
        self._ready(f"chunk of {len(objectives)} objective(s) from #{first}")
        try:
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
    """The workers (Ray actor handles), created with restarts and task retries, each asking for one CPU
    and `gpus` GPUs; `states` the state of each worker that has loaded the model, by actor name."""

    def __init__(self, ray: Any, model: str | None, n: int, threads: int, gpus: float = 0.0, device: str | None = None,
                 dtype: Any = None):
        self.ray, self.model, self.threads, self.gpus, self.device, self.dtype = ray, model, threads, gpus, device, dtype
        self.run_id = uuid.uuid4().hex[:8]
        self.created = 0
        self.names: dict[Any, str] = {}
        self.states: dict[str, dict[str, Any]] = {}
        self.pending: dict[Any, str] = {}  # state requests of replacement workers
        self.actor_cls = ray.remote(SweepWorker)
        self.actors = [self.new() for _ in range(n)]

    def new(self) -> Any:
        name = f"dreamlens-sweep-{self.run_id}-{self.created}"
        self.created += 1
        actor = self.actor_cls.options(
            name=name, num_cpus=1, num_gpus=self.gpus, max_restarts=RESTARTS, max_task_retries=RESTARTS, max_concurrency=2,
            runtime_env={"env_vars": worker_env()},
        ).remote(self.model, self.threads, self.device, self.dtype)
        self.names[actor] = name
        return actor

    def replace(self, actor: Any) -> Any:
        """A fresh worker in place of `actor`; its state is asked for now and read once it has loaded."""
        self.actors.remove(actor)
        fresh = self.new()
        self.actors.append(fresh)
        self.pending[fresh.state.remote()] = self.names[fresh]
        return fresh

    def check(self) -> list[dict[str, Any]]:
        """Every worker's state, once it has loaded the model; a loading error is raised as itself."""
        try:
            states = _get(self.ray, [a.check.remote() for a in self.actors])
        except self.ray.exceptions.RayActorError as e:
            raise RayEngineError(
                f"a Ray worker died {RESTARTS + 1} times while loading the model {self.model or 'embedded'!r} ({e}); "
                "it is being killed (out of memory?): give each worker more memory, or run fewer workers per node"
            ) from e
        self.states.update({self.names[a]: s for a, s in zip(self.actors, states)})
        return states

    def refresh(self) -> None:
        """Ask every worker for its state again (one Ray restarted may be on another node now)."""
        self.pending.update({a.state.remote(): self.names[a] for a in self.actors})

    def collect(self, timeout: float = 0) -> None:
        """The states asked for (of replacement workers, or by `refresh`) that answer within `timeout` seconds."""
        if not self.pending:
            return
        done, _ = self.ray.wait(list(self.pending), num_returns=len(self.pending), timeout=timeout)
        for ref in done:
            name = self.pending.pop(ref)
            try:
                self.states[name] = self.ray.get(ref)
            except Exception:  # a replacement that died too: nothing to report
                pass

    def report(self) -> list[dict[str, Any]]:
        """Each worker that loaded the model: its name, node, host, GPUs, device, dtype and process id."""
        keys = ("node", "host", "gpu_ids", "device", "dtype", "pid")
        return [{"worker": name, **{k: s.get(k) for k in keys}} for name, s in self.states.items()]

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


def run_ray(
    todo: Sequence[tuple[int, list[str]]],
    settings: Any,
    write: Callable[[int, Frames], Any],
    *,
    model: str | None = None,
    address: str | None = None,
    workers: int | None = None,
    threads: int = 1,
    gpus_per_worker: float | None = None,
    device: str | None = None,
    dtype: Any = None,
    record: Callable[[dict[str, Any]], Any] | None = None,
    progress: bool = True,
) -> None:
    """Run the chunks `todo` ((chunk index, objectives) pairs) on Ray workers; `write(index, frames)` is
    called here, on the driver, exactly once per chunk as it finishes (in any order).

    Each worker loads the model from `model` (the spec: None for the embedded model, a name or path for
    `load_model`, or "package.module:function"), never from pickled weights: on `device` in `dtype` when
    given, else on its GPU when it has one, else its CPU, in float32. A chunk's scan is split into one
    corpus slice per worker; the slices are merged here and the chunk (dreams and metrics) runs on the
    next idle worker. A worker that dies is restarted by Ray and its task rerun; if it keeps dying, the
    task moves to a fresh worker.

    `address`: the cluster (default $RAY_ADDRESS, else a local cluster on 127.0.0.1). `workers`: default
    as many as the cluster's CPUs and GPUs hold; `gpus_per_worker`: GPUs each asks for (default 1 when
    the cluster has GPUs, else 0); `threads` torch threads per worker. `record(run)` is called with what
    ran where (the engine, the address, each worker's node, GPUs and device) once the workers have
    loaded the model, and again at the end. On an error or Ctrl-C the workers are stopped; every chunk
    already written stays."""
    todo = [(int(i), list(objs)) for i, objs in todo]
    if not todo:
        return
    if workers is not None and workers < 1:
        raise RayEngineError(f"workers must be at least 1, got {workers}; or leave it out to use every CPU of the cluster")
    with cluster(address, workers) as ray:
        n, gpus, warning = plan_workers(ray.cluster_resources(), workers, gpus_per_worker)
        if warning:
            warnings.warn(warning, stacklevel=2)
        total = sum(len(o) for _, o in todo)
        label = f"{n} ray worker{'s' * (n > 1)}" + (f", {gpus:g} GPU each" if gpus else "")
        bar = tqdm(total=total, desc=f"sweep (starting {label})", unit="obj", disable=not progress, smoothing=0.1)
        pool = _Pool(ray, model, n, threads, gpus, device, dtype)
        run = {"id": pool.run_id, "engine": "ray", "address": cluster_address(address) or "local",
               "started": datetime.now(UTC).isoformat(timespec="seconds"), "gpus_per_worker": gpus}

        def report(timeout: float = 0, **more: Any) -> None:
            if record is not None:
                pool.collect(timeout)
                record({**run, **more, "workers": pool.report()})

        try:
            with sigterm_as_interrupt():
                pool.check()
                report()
                bar.set_description(f"sweep ({label})", refresh=False)
                bar.reset(total)  # rate and ETA from here: the workers have loaded the model
                _schedule(ray, pool, [_Chunk(i, o) for i, o in todo], settings, write, bar)
                pool.refresh()  # restarted and replacement workers: where they ran, too
                report(timeout=10, finished=datetime.now(UTC).isoformat(timespec="seconds"))
        finally:
            bar.close()
            pool.close()


def _schedule(ray: Any, pool: _Pool, chunks: list[_Chunk], settings: Any, write: Callable[[int, Frames], Any], bar: Any) -> None:
    # one corpus slice per worker, each at least one of the scan's batches
    windows = math.ceil(settings.scan.tokens / settings.scan.window)
    batches = math.ceil(windows / settings.scan.batch_size)
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
            ready.appendleft(job)
            idle.append(pool.replace(actor))
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

