"""Sweeps: many objectives dreamed, scanned and measured in one resumable run (`sweep`), stored as Parquet
tables in a folder that `load_sweep` reads back; run locally or on a Ray cluster (`engine="ray"`).
"""

from __future__ import annotations

import os
import uuid
import warnings
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..analysis.scan_config import SWEEP_SCAN, ScanConfig
from ..corpus import check_source
from ..modes.settings import DEFAULT_LIMIT, check_needs_modes
from ..optim.config import DEFAULT_BUDGET
from ..optim.methods import DEFAULT_METHOD, make_config
from .chunk import SweepSettings, load_model_spec, parse_objectives
from .errors import SweepConfigError, SweepError, SweepSpecError
from .local import run_local
from .ray_engine import run_ray
from .spec import expand
from .store import Sweep, SweepStore, load_sweep

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from ..objectives import Objective

__all__ = ["sweep", "load_sweep", "Sweep", "SweepError", "SweepConfigError", "SweepSpecError", "expand", "ENGINES"]

ENGINES = ("local", "ray")


def _model_spec(model: Any, engine: str) -> tuple[str | None, HookedTransformer | None]:
    """The model spec the config records (and workers load), and the loaded model if one was given."""
    if model is None or isinstance(model, str):
        return model, None
    if isinstance(model, os.PathLike):
        return str(model), None
    if not hasattr(model, "cfg"):
        raise SweepError(
            f"model must be None (embedded), a name or folder, 'package.module:function', or a loaded model, got {model!r}"
        )
    if engine != "local":
        raise SweepError(
            "the Ray engine's workers load the model themselves and cannot take a loaded one: pass its name or folder, "
            "or 'package.module:function' (a factory that builds it)"
        )
    return f"in-memory:{model.cfg.model_name}", model


def _local_run(model: HookedTransformer) -> dict[str, Any]:
    """What a run of the local engine records in sweep.json: where its model is."""
    return {"id": uuid.uuid4().hex[:8], "engine": "local", "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "device": str(model.cfg.device), "dtype": str(model.cfg.dtype).removeprefix("torch.")}


def sweep(
    objectives: str | os.PathLike | Sequence[str | Objective],
    out: str | os.PathLike,
    *,
    model: str | os.PathLike | HookedTransformer | None = None,
    method: str | None = None,
    max_token_forwards: int = DEFAULT_BUDGET,
    corpus: str | os.PathLike | Sequence[str] | None = None,
    scan: ScanConfig = SWEEP_SCAN,
    chunk_size: int = 32,
    limits: Sequence[float] = (4.0, 6.0, 8.0),
    modes: int = 1,
    mode_limit: float | None = None,
    engine: str = "local",
    address: str | None = None,
    workers: int | None = None,
    gpus_per_worker: float | None = None,
    progress: bool = True,
    device: Any = None,
    dtype: Any = None,
    **options: Any,
) -> Sweep:
    """Dream every objective `objectives` names (a SPEC: `'sae:embedded[0:256]'`, several separated by ';',
    a file with one per line, or a list), with dataset statistics and top examples from one shared scan per
    chunk of `chunk_size` objectives, and dataset-grounded metrics; store everything in the folder `out`.

    model: None (embedded), a name or folder, "package.module:function" (a factory; what Ray workers load),
    or a loaded model (local engine only). method: "adapt" (default), "epo", "gcg"; `max_token_forwards`:
    each objective's budget; `options`: fields of the method's config (e.g. length=8, seed=1).
    corpus: what every chunk's scan reads; scan: its `ScanConfig` (default `SWEEP_SCAN`: 100,000 tokens,
    windows of 24, the top 16 examples, at most 4 per document). limits: the fluency limits (xe) of the summary.
    modes: K > 1 dreams K distinct modes of each objective (`dream(..., modes=K)`: each later one without
    the key tokens of those before it; each mode a dream of `max_token_forwards`), ranked by activation at xe <=
    `mode_limit` (default 6); the summary then has a row per mode (columns `mode`, `found`).

    engine="ray": `address` the cluster ("HOST:PORT", "ray://HOST:PORT", "auto"; default $RAY_ADDRESS,
    else a local cluster on 127.0.0.1, started and stopped here), `workers` how many (default: as many as
    its CPUs and GPUs hold), `gpus_per_worker` the GPUs each asks for (default 1 when the cluster has GPUs,
    else 0; a fraction shares one). An address where nothing answers fails within seconds.

    device/dtype: where the model is loaded (as `load_model` takes them; not part of the sweep's identity):
    by the local engine (default: `load_model`'s), or by each Ray worker (default: its GPU when it has
    one, else its CPU; float32). Each run's engine, and each Ray worker's node, GPUs and device, are
    recorded in sweep.json (`Sweep.runs`).

    Resumable and idempotent: run again, the finished chunks are kept and only the rest is computed; a
    folder holding a sweep of another config is refused (`SweepConfigError` names the differing keys).
    Ctrl-C or SIGTERM keeps every finished chunk. Returns `load_sweep(out)`."""
    if engine not in ENGINES:
        raise SweepError(f"unknown engine {engine!r}; choose 'local' (this process) or 'ray' (a Ray cluster)")
    if engine == "local" and (address is not None or workers is not None or gpus_per_worker is not None):
        raise SweepError("address=, workers= and gpus_per_worker= apply to the Ray engine; pass engine='ray', or drop them")
    if engine == "ray" and device is not None and str(device).split(":")[0] not in ("cpu", "cuda"):
        raise SweepError(f"a Ray worker loads the model on 'cpu' or on its GPU ('cuda'), got device={device!r}; pass one "
                         "of those, or leave it out (its GPU when it has one, else its CPU)")
    if not (isinstance(model, (str, os.PathLike)) or model is None) and (device is not None or dtype is not None):
        raise SweepError("device= and dtype= apply to a model the sweep loads; move a loaded model yourself "
                         "(model.to(device), model.to(dtype)), or pass its name")
    check_needs_modes(modes, {"mode_limit=": mode_limit}, error=SweepError)
    names = expand(objectives if isinstance(objectives, (str, os.PathLike)) else [str(o) for o in objectives])
    spec, loaded = _model_spec(model, engine)
    if corpus is not None and not isinstance(corpus, (str, os.PathLike)):
        corpus = tuple(str(d) for d in corpus)
    elif corpus is not None:
        corpus = str(corpus)
        check_source(corpus)
    settings = SweepSettings(
        model=spec, dream=make_config(method or DEFAULT_METHOD, None, **options, max_token_forwards=max_token_forwards),
        scan=scan, corpus=corpus, chunk_size=chunk_size, limits=tuple(float(x) for x in limits),
        modes=modes, mode_limit=DEFAULT_LIMIT if mode_limit is None else mode_limit,
    )
    settings.check()
    store = SweepStore.check(out, settings.to_config(), names)
    todo = store.todo()
    if not todo:
        return load_sweep(out)
    try:
        if engine == "local":
            net = loaded if loaded is not None else load_model_spec(spec, device=device, dtype=dtype)
            saes: dict[str, Any] = {}
            for o in parse_objectives(names, saes):
                o.validate(net)
            settings.check_mode_budget(net)  # on this model, before the folder is written
            store.create()
            store.record_run(_local_run(net))
            run_local(store, settings, net, saes=saes, progress=progress)
        else:
            parse_objectives(names)  # every objective readable before any worker starts
            store.create()
            run_ray(todo, settings, store.write_chunk, model=spec, address=address, workers=workers,
                    gpus_per_worker=gpus_per_worker, device=None if device is None else str(device), dtype=dtype,
                    record=store.record_run, progress=progress)
    except KeyboardInterrupt:
        done = load_sweep(out).n_done if (Path(out) / "sweep.json").is_file() else 0
        warnings.warn(
            f"sweep interrupted: {done} of {len(names)} objectives are done and kept in {str(out)!r}; run the same "
            "sweep again to compute the rest", stacklevel=2,
        )
        raise
    return load_sweep(out)
