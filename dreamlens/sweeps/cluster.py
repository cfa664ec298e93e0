"""Ray for the sweep engine: connecting to a cluster at an address (failing fast where nothing answers)
or starting a local one on the loopback only, and planning its workers (how many, and their GPUs).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..install import DISTRIBUTION
from .errors import RayEngineError, RayMissingError

RAY_VERSION = "2.60.0"
INSTALL_HINT = f'pip install "{DISTRIBUTION}[ray]" (ray=={RAY_VERSION})'
# read by ray: "0" keeps a local cluster on 127.0.0.1 (see `loopback_only`)
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
ADDRESS_ENV = "RAY_ADDRESS"
# how long the driver waits for a TCP answer at a cluster's address before saying nothing is there
PROBE_SECONDS = 5.0
# how many times (about a second each) the driver asks a cluster's address for Ray before giving up (Ray's
# default is 20, or 120 with RocksDB); the user's $RAY_gcs_server_port_wait_time_s wins
GCS_RETRIES_ENV, GCS_RETRIES = "RAY_gcs_server_port_wait_time_s", 5
# the ports Ray listens on when an address names none: a head node's GCS, and the Ray Client server (ray://)
GCS_PORT, CLIENT_PORT = 6379, 10001
# environment passed on to every worker (with PYTHONPATH, so workers import the driver's dreamlens)
PASSED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "DREAMLENS_CACHE", "XDG_CACHE_HOME", "TOKENIZERS_PARALLELISM")

def import_ray() -> Any:
    """The `ray` module, imported on first use; `RayMissingError` naming the install command if absent."""
    try:
        import ray  # lazy: ray is optional (the ray extra); imported when a Ray sweep starts
    except ImportError as e:
        raise RayMissingError(
            f"the Ray engine needs ray, which is not installed: {INSTALL_HINT}; or run the sweep with the local "
            "engine (engine='local', or no --ray)"
        ) from e
    return ray


def worker_env() -> dict[str, str]:
    """What every worker's environment gets: PYTHONPATH with the folder this dreamlens is imported from
    (unless it is installed in site-packages), one thread for OpenMP, and the driver's model-cache settings."""
    root = str(Path(__file__).resolve().parents[2])  # the folder that holds the dreamlens package
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if not any(part in ("site-packages", "dist-packages") for part in Path(root).parts) and root not in paths:
        paths.insert(0, root)
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update({k: os.environ[k] for k in PASSED_ENV if k in os.environ})
    return env


def cluster_address(address: str | None) -> str | None:
    """The cluster a run connects to: `address`, else $RAY_ADDRESS; None (no address, or "local") for a
    local cluster started here."""
    chosen = (address or os.environ.get(ADDRESS_ENV) or "").strip()
    return None if chosen in ("", "local") else chosen


def host_port(address: str) -> tuple[str, int] | None:
    """Where a cluster address points, as (host, port): "HOST:PORT", "HOST" (Ray's default port) or
    "ray://HOST[:PORT]" (the Ray Client's); None for "auto" (Ray looks it up) or an unreadable one."""
    scheme, sep, rest = address.partition("://")
    if not sep:
        scheme, rest = "", address
    rest = rest.split("/", 1)[0]
    if not rest or address == "auto":
        return None
    host, colon, port = rest.rpartition(":")
    if not colon or "]" in port:  # no port (or only an IPv6 address's colons)
        host, port = rest, str(CLIENT_PORT if scheme == "ray" else GCS_PORT)
    if not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def no_cluster(address: str, reason: str) -> RayEngineError:
    """The error of an address where no Ray cluster answers: the address (and where it came from), why,
    and how to start a cluster there."""
    from_env = os.environ.get(ADDRESS_ENV, "").strip() == address
    origin, local = (f" (from ${ADDRESS_ENV})", f"unset {ADDRESS_ENV}") if from_env else ("", "drop the address (`--ray` alone)")
    port = f" --port {target[1]}" if (target := host_port(address)) and not address.startswith("ray://") else ""
    return RayEngineError(
        f"no Ray cluster answers at {address!r}{origin} ({reason}): start one there (`ray start --head{port}` on that "
        f"machine, then give the address it prints), or {local} to start a local cluster here"
    )


def probe(address: str, timeout: float = PROBE_SECONDS) -> None:
    """`RayEngineError` unless something answers at the address (a TCP connection within `timeout`
    seconds): Ray itself retries an address where nothing listens for minutes, printing its own warnings."""
    target = host_port(address)
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=timeout):
            return
    except OSError as e:
        reason = "no answer" if isinstance(e, TimeoutError) else (e.strerror or type(e).__name__)
        raise no_cluster(address, f"{reason} at {target[0]}:{target[1]} within {timeout:g} s") from None


@contextmanager
def loopback_only(ray: Any) -> Iterator[None]:
    """For the duration (the start of a local cluster), Ray keeps every process it starts on 127.0.0.1.

    Ray resolves 127.0.0.1 to the machine's routable address unless it is told it runs no multi-node
    cluster: a flag it reads from the environment when first imported (and its processes inherit). Both
    are set here and restored after, so a later connection to a remote cluster from this process
    registers the driver at its routable address, as Ray would have it."""
    constants: Any = getattr(getattr(ray, "_private", None), "ray_constants", None)
    had_flag = hasattr(constants, "ENABLE_RAY_CLUSTER")
    flag = getattr(constants, "ENABLE_RAY_CLUSTER", None)
    env = os.environ.get(LOOPBACK_ENV)
    os.environ[LOOPBACK_ENV] = "0"
    if had_flag:
        constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if had_flag:
            constants.ENABLE_RAY_CLUSTER = flag
        if env is None:
            os.environ.pop(LOOPBACK_ENV, None)
        else:
            os.environ[LOOPBACK_ENV] = env


@contextmanager
def cluster(address: str | None, workers: int | None, *, gpus: float | None = None) -> Iterator[Any]:
    """Ray, connected: to the cluster at `address` (or $RAY_ADDRESS: "HOST:PORT", "ray://...", "auto") as
    Ray connects to any cluster, to the one this process already joined, or else to a local cluster on
    127.0.0.1 with `workers` CPUs (default: all) and `gpus` GPUs (default: those Ray finds), started here
    and shut down on exit. An address where nothing answers fails within seconds. Yields the `ray` module."""
    ray = import_ray()
    started = not ray.is_initialized()  # else a notebook or a test joined a cluster already: leave it running
    if started:
        connect(ray, cluster_address(address), workers, gpus)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def connect(ray: Any, address: str | None, workers: int | None, gpus: float | None = None) -> None:
    """`ray.init`: to the cluster at `address`, or a local cluster on 127.0.0.1 (address None)."""
    quiet: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
    if address and address != "auto":
        probe(address)
    try:
        if address:
            with patient(GCS_RETRIES), stderr_kept() as kept:
                ray.init(address=address, **quiet)
            sys.stderr.write(kept())  # connected: what Ray said on the way is worth seeing
        else:
            local: dict[str, Any] = {"num_cpus": workers or os.cpu_count() or 1, "include_dashboard": False,
                                     "_node_ip_address": "127.0.0.1"}
            if gpus is not None:
                local["num_gpus"] = gpus
            with loopback_only(ray):  # "local": never $RAY_ADDRESS, which Ray reads when no address is given
                ray.init(address="local", **local, **quiet)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as e:
        if address and (refused := authentication_error(e)) is not None:
            raise RayEngineError(
                f"the Ray cluster at {address!r} refuses this driver: it asks for Ray's token authentication "
                f"({refused}); set RAY_AUTH_MODE=token here, with the cluster's token in "
                "~/.ray/auth_token, $RAY_AUTH_TOKEN_PATH or $RAY_AUTH_TOKEN (`ray get-auth-token` on the head node prints it)"
            ) from e
        if address:
            raise no_cluster(address, f"{type(e).__name__}: {e}") from e
        raise RayEngineError(f"could not start a local Ray cluster on 127.0.0.1: {type(e).__name__}: {e}; check that "
                             "`ray start --head --node-ip-address 127.0.0.1` works") from e


def authentication_error(e: BaseException) -> str | None:
    """Ray's complaint about a missing or wrong token among the causes of `e` (Ray keeps the last failed
    try only as text), else None."""
    cause: BaseException | None = e
    for _ in range(10):
        if cause is None:
            return None
        text = str(cause)
        if "AuthenticationError" in text or "InvalidAuthToken" in text or type(cause).__name__ == "AuthenticationError":
            found = text[text.find("InvalidAuthToken"):] if "InvalidAuthToken" in text else text
            return found.split(". ")[0]
        cause = cause.__cause__ or cause.__context__
    return None


@contextmanager
def patient(retries: int) -> Iterator[None]:
    """For the duration, Ray tries a cluster's address `retries` times (unless the user set how many)."""
    if GCS_RETRIES_ENV in os.environ:
        yield
        return
    os.environ[GCS_RETRIES_ENV] = str(retries)
    try:
        yield
    finally:
        os.environ.pop(GCS_RETRIES_ENV, None)


@contextmanager
def stderr_kept() -> Iterator[Callable[[], str]]:
    """For the duration, this process's standard error (file descriptor 2, where Ray's C++ client logs a
    warning for each failed try) goes to a temporary file; yields a function that returns its text."""
    sys.stderr.flush()
    text = ""
    try:
        saved = os.dup(2)
    except OSError:  # no standard error to keep
        yield lambda: text
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield lambda: text
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode(errors="replace")


def plan_workers(resources: dict[str, float], workers: int | None, gpus_per_worker: float | None) -> tuple[int, float, str]:
    """How many workers a cluster with `resources` (`ray.cluster_resources()`) runs, the GPUs each asks
    for, and a warning ("" if none). `gpus_per_worker` None: 1 when the cluster has GPUs, else 0 (a
    fraction shares a GPU between workers); `workers` None: as many as the CPUs and GPUs hold, one CPU each."""
    cpus, gpus = int(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    if cpus < 1:
        raise RayEngineError("the Ray cluster has no CPU for a worker; start a node with CPUs (`ray start --num-cpus N`)")
    per = (1.0 if gpus > 0 else 0.0) if gpus_per_worker is None else float(gpus_per_worker)
    if not (per >= 0 and math.isfinite(per)):
        raise RayEngineError(f"gpus_per_worker must be 0 or more (a fraction shares a GPU), got {gpus_per_worker!r}")
    if per > gpus:
        has = f"{gpus:g} GPU(s)" if gpus else "no GPU"
        raise RayEngineError(
            f"each worker asks for {per:g} GPU(s) (--gpus-per-worker) but the Ray cluster has {has}: ask for less, "
            "or 0 to run the workers on their CPUs" + ("" if gpus else ", or add GPU nodes (`ray start --num-gpus N`)")
        )
    fits = min(cpus, math.floor(gpus / per + 1e-9)) if per else cpus
    n = min(workers or fits, fits)
    warning = ""
    if workers and workers > fits:
        room = f"{cpus} CPU(s)" + (f" and {gpus:g} GPU(s), {per:g} per worker" if per else "")
        warning = f"the Ray cluster has {room}: running {n} worker(s), not {workers}"
    return n, per, warning


def worker_device(device: str | None, gpu_ids: Sequence[str]) -> str:
    """Where a worker loads the model: `device` when given, else its GPU when Ray gave it one ("cuda": Ray
    shows a worker only its own GPUs), else "cpu". `RayEngineError` when it has a GPU torch cannot see."""
    chosen = device if device is not None else "cuda" if gpu_ids else "cpu"
    if not chosen.startswith("cuda"):
        return chosen
    if not torch.cuda.is_available():
        given = f"was given GPU {', '.join(gpu_ids)} by Ray" if gpu_ids else f"was asked for device {chosen!r}"
        raise RayEngineError(
            f"a worker on {socket.gethostname()} {given}, but its torch ({torch.__version__}) sees no CUDA device: "
            "install a CUDA build of torch on the cluster's nodes, or run the workers on their CPUs (--gpus-per-worker 0, "
            "or --device cpu)"
        )
    return chosen
