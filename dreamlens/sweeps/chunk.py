"""One chunk of a sweep, as every engine runs it: one shared scan of the chunk's objectives, their dreams,
and the metrics, as three DataFrames (summary, frontiers, examples); the settings and the model spec.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pandas as pd
import torch

from .. import models
from ..analysis.metrics import activation_ratio, beats_dataset, dataset_max, dataset_percentile, median_top_xe
from ..analysis.scan import ScanResult, example_spans
from ..analysis.scan import scan as scan_corpus
from ..analysis.scan_config import SWEEP_SCAN, ScanConfig
from ..corpus import describe
from ..devices import resolve_device, resolve_dtype
from ..dreaming import dream
from ..errors import DreamError
from ..io import digest
from ..modes.budget import check_mode_budget
from ..modes.result import Modes
from ..modes.settings import DEFAULT_LIMIT, ModeSettings, check_mode_count, check_mode_limit
from ..objectives import Objective, objective
from ..optim.config import DEFAULT_BUDGET, ADAPTConfig, DreamConfig, method_name
from ..results import DreamResult, best_under
from ..sae import load_sae
from ..scoring import make_layout
from ..scoring.batching import is_oom
from .errors import SweepError

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

# methods that dream a list of objectives as one run sharing its forward passes (and its token budget)
SHARED_BUDGET = frozenset({"epo", "gcg"})
# config fields a sweep sets itself: no checkpoints (the store is the sweep's checkpoint)
RESERVED = ("checkpoint_every", "checkpoint_dir")
# performance knobs, not part of a sweep's identity (a sweep may resume with other values)
NOT_IDENTITY = ("max_token_forwards", "checkpoint_every", "checkpoint_dir", "batch_size", "max_batch_tokens")
FRONTIER_COLUMNS = ["index", "objective", "mode", "rank", "text", "ids", "activation", "xe", "iteration"]
EXAMPLE_COLUMNS = ["index", "objective", "rank", "text", "ids", "activation", "xe", "scan_activation", "doc", "pos"]
N_STARTS = 3  # top examples tried as the start of a dream that cannot start from random prompts
# summary columns of a store written before modes (one dream per objective): their values there
MODE_DEFAULTS: dict[str, Any] = {"mode": 1, "found": 1, "key_tokens": [], "n_banned": 0}
_FACTORY = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


def _default_dream() -> DreamConfig:
    return ADAPTConfig(max_token_forwards=DEFAULT_BUDGET)


@dataclass(frozen=True, kw_only=True)
class SweepSettings:
    """Everything that decides a sweep's results but its objectives; plain and picklable (what a worker
    gets). `dream` is each objective's dream config (its method's; `max_token_forwards` is each objective's
    budget, shared by a run of a list with EPO/GCG); `scan` is what the scan of every chunk reads from
    `corpus` and keeps."""

    model: str | None = None  # None: the embedded model; a name or folder for load_model; "package.module:function"
    dream: DreamConfig = field(default_factory=_default_dream)
    scan: ScanConfig = SWEEP_SCAN
    corpus: str | tuple[str, ...] | None = None  # as scan takes it; a list of texts becomes a tuple
    chunk_size: int = 32
    limits: tuple[float, ...] = (4.0, 6.0, 8.0)  # the fluency limits (xe) of the summary's best activations
    modes: int = 1  # distinct dreams per objective (`dream(..., modes=K)`); 1: one ordinary dream each
    mode_limit: float = DEFAULT_LIMIT  # the fluency limit (xe) modes are ranked at (`ModeSettings.limit`); only with modes > 1

    @property
    def method(self) -> str:
        """The dreams' method ("adapt", "epo", "gcg"), from their config."""
        return method_name(self.dream)

    @property
    def budget(self) -> int:
        """Each objective's dream budget in token-forwards (`dream.max_token_forwards`; checked by `check`)."""
        return int(self.dream.max_token_forwards or 0)

    def check(self) -> None:
        """Raise `SweepError` (or the method's `DreamError`) naming the first bad setting and its fix."""
        if not isinstance(self.dream, DreamConfig):
            raise SweepError(f"dream must be a method's config (e.g. ADAPTConfig(max_token_forwards=12_000)), got {self.dream!r}")
        if not isinstance(self.scan, ScanConfig):
            raise SweepError(f"scan must be a ScanConfig (e.g. ScanConfig(tokens=100_000)), got {self.scan!r}")
        self.method  # noqa: B018  # a config of no method fails here
        b = self.dream.max_token_forwards
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1:
            raise SweepError(f"max_token_forwards must be a positive integer (each objective's budget), got {b!r}")
        c = self.chunk_size
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 1:
            raise SweepError(f"chunk_size must be a positive integer, got {c!r}")
        if not self.limits or any(not (isinstance(x, (int, float)) and x > 0 and math.isfinite(x)) for x in self.limits):
            raise SweepError(f"limits must be positive numbers (fluency limits, nats/token, e.g. (4, 6, 8)), got {self.limits!r}")
        for key in RESERVED:
            if getattr(self.dream, key) is not None:
                raise SweepError(f"the option {key!r} is set by the sweep itself; drop it (the sweep's store is its checkpoint)")
        check_mode_count(self.modes, error=SweepError)
        check_mode_limit(self.mode_limit, name="mode_limit", finite=True, error=SweepError)
        self.dream.validate()
        # a lower bound of the attribution's cost (a prompt is at least `length` tokens); the exact check,
        # with the model's start token, prefix and suffix, runs on the model (before a sweep, in every chunk)
        self.check_mode_budget(self.dream.length)

    def mode_settings(self) -> ModeSettings:
        """How the modes of each objective are kept apart and ranked (`dream(..., mode_settings=)`)."""
        return ModeSettings(limit=float(self.mode_limit))

    def check_mode_budget(self, model: HookedTransformer | int) -> None:
        """`SweepError` if each mode's budget does not cover what separates it from the modes before it (the
        attribution of their key tokens; the patterns of the objective's top examples, at most `top_k`, that
        pick its start), for prompts as `model` scores them (start token, prefix, suffix), or of `model`
        tokens: a sweep stops on it, rather than storing an error row for every objective."""
        if self.modes == 1:
            return
        config = self.dream
        if isinstance(model, int):
            seq_len = model
        else:
            seq_len = make_layout(model, config.length, config.prefix, config.suffix).seq_len
        check_mode_budget(self.budget, seq_len, config.length, self.mode_settings(), self.modes, self.scan.top_k,
                          fix="raise the budget, lower top_k, or lower modes to 1", error=SweepError)

    def dream_config(self, n: int) -> DreamConfig:
        """The dreams' config for a run of `n` objectives (the budget is shared by a run of a list with EPO/GCG)."""
        share = n if self.method in SHARED_BUDGET else 1
        return dataclasses.replace(self.dream, max_token_forwards=self.budget * share)

    def to_config(self) -> dict[str, Any]:
        """The sweep's identity as JSON: what sweep.json records and a later run must match. The dream
        config is written out in full (its defaults too) but for performance knobs and the budget, which is
        `budget`; the scan's settings are `tokens`, `window`, `top_k`, `per_document` (sweep.json's names
        since its first format, so stored sweeps resume). `modes` and `mode_limit` only when modes > 1: a
        sweep of one dream per objective has the identity it had before sweeps took modes."""
        opts = self.dream.to_dict()
        if isinstance(self.corpus, tuple):
            corpus = f"texts:{len(self.corpus)}:{digest(repr(self.corpus).encode())}"
        else:
            corpus = describe(self.corpus)
        out: dict[str, Any] = {"model": self.model or "embedded", "method": self.method, "budget": self.budget,
                               **self.scan.identity(), "chunk_size": self.chunk_size, "limits": [float(x) for x in self.limits]}
        if self.modes > 1:
            out.update(modes=int(self.modes), mode_limit=float(self.mode_limit))
        out.update(corpus=corpus, options={k: v for k, v in opts.items() if k not in NOT_IDENTITY})
        return out


class ChunkFrames(NamedTuple):
    """What a chunk gives: one summary row per objective and mode, every mode's frontier and every objective's
    top examples."""

    summary: pd.DataFrame
    frontiers: pd.DataFrame
    examples: pd.DataFrame


def limit_name(limit: float) -> str:
    """The suffix of the summary columns at a fluency limit: 6.0 -> 'xe6', 5.5 -> 'xe5.5'."""
    return f"xe{float(limit):g}"


def load_model_spec(spec: str | None, *, device: Any = None, dtype: Any = None) -> HookedTransformer:
    """The model a spec names: None (or "embedded") the embedded model, "package.module:function" a
    factory called with no arguments, anything else a name or folder for `dreamlens.load_model`; on
    `device`, in `dtype` (as `load_model` takes them; a factory's model is moved there when they are given)."""
    if spec is None or spec == "embedded":
        return models.load_model(device=device, dtype=dtype)
    if not _FACTORY.fullmatch(spec):
        return models.load_model(spec, device=device, dtype=dtype)
    module, func = spec.split(":")
    try:
        factory = getattr(importlib.import_module(module), func)
    except ImportError as e:
        raise SweepError(
            f"cannot import {module!r} for the model spec {spec!r} ({e}); make the module importable in every worker "
            "(installed, or on PYTHONPATH), or give a model name or folder"
        ) from e
    except AttributeError:
        raise SweepError(f"the module {module!r} has no {func!r} (the model spec {spec!r}); name its model factory") from None
    from transformer_lens import HookedTransformer  # lazy: seconds to load; only a factory's model needs it

    model = factory()
    if not isinstance(model, HookedTransformer):
        raise SweepError(f"the factory {spec!r} returned a {type(model).__name__}, not a HookedTransformer; return the model")
    if device is not None or dtype is not None:
        if device is not None:
            model.to(resolve_device(device), print_details=False)
        if dtype is not None:
            model.to(resolve_dtype(dtype), print_details=False)
    return model


def parse_objectives(objectives: Sequence[str], saes: dict[str, Any] | None = None) -> list[Objective]:
    """The objectives from their string forms, each SAE loaded once (into `saes`, which may be kept
    between chunks), so latents of one SAE share one encoding in a forward pass."""
    cache: dict[str, Any] = {} if saes is None else saes

    def loader(source: str) -> Any:
        if source not in cache:
            cache[source] = load_sae(source)
        return cache[source]

    return [objective(o, sae_loader=loader) for o in objectives]


def example_starts(scan: ScanResult, i: int, length: int) -> list[tuple[int, tuple[int, ...]]]:
    """Where a dream of objective `i` that cannot start from random prompts may start instead: the last
    `length` tokens of its top examples where it fires (activation > 0), best first, at most `N_STARTS`,
    each with its rank."""
    return example_spans(scan, i, length, N_STARTS)


def _dreams(
    model: HookedTransformer, objs: list[Objective], settings: SweepSettings, starts: list[list[tuple[int, tuple[int, ...]]]],
    examples: list[list[tuple[int, tuple[int, ...]]]] | None = None,
) -> tuple[list[DreamResult | Modes | str], list[str], list[int]]:
    """Each objective's dream (its `Modes` with `settings.modes` > 1), where it started ("random", "self-scan", "given":
    the options' init, "example N": its top example of rank N) and how many objectives shared its run: one
    run of the list with EPO/GCG, one run each otherwise (always with modes: one objective at a time, given
    its top examples as (rank, span) `examples`, where its later modes may start). An objective that cannot
    start from random prompts (a `DreamError` before any search, e.g. an SAE latent that fires nowhere near
    them: nothing to climb) leaves the list (the error names it; if it does not, every objective of the list
    goes alone) and is dreamed alone from its `starts` in turn; if none takes, the error's message stands in
    for its dream. A Ctrl-C (or SIGTERM) inside a run (any mode's) ends it early: raised again here, so no
    partial dream is ever stored."""
    def stop_if_interrupted(results: Sequence[DreamResult]) -> None:
        if any(r.stopped == "interrupted" for r in results):
            raise KeyboardInterrupt("the sweep was interrupted during a dream")

    def run(batch: list[Objective], config: DreamConfig) -> list[DreamResult]:
        results = dream(model, batch, settings.method, config=config, progress=False)
        assert isinstance(results, list)  # a list of objectives gives a list of results
        stop_if_interrupted(results)
        return results

    def alone(k: int, config: DreamConfig) -> DreamResult | Modes:
        if settings.modes == 1:
            return run([objs[k]], config)[0]
        found = dream(model, objs[k], settings.method, config=config, modes=settings.modes,
                      mode_settings=settings.mode_settings(), examples=None if examples is None else examples[k],
                      progress=False)
        assert isinstance(found, Modes)  # modes= gives Modes
        stop_if_interrupted(found.dreams)
        return found

    base = settings.dream_config(1)
    first = base.start_kind()
    out: list[DreamResult | Modes | str] = [""] * len(objs)
    how, share = [""] * len(objs), [1] * len(objs)
    batch = list(range(len(objs))) if settings.method in SHARED_BUDGET and settings.modes == 1 else []
    while len(batch) > 1:
        try:
            for k, r in zip(batch, run([objs[k] for k in batch], settings.dream_config(len(batch)))):
                out[k], how[k], share[k] = r, first, len(batch)
            break
        except DreamError as e:
            named = [k for k in batch if repr(str(objs[k])) in str(e)] or batch
            batch = [k for k in batch if k not in named]
        except Exception as e:  # out of memory with the whole list: each objective alone needs less
            if not out_of_memory(e):
                raise
            break
    for k in range(len(objs)):
        if how[k]:
            continue
        tries = [(first, base)] + ([] if first == "given" else
                                   [(f"example {rank}", dataclasses.replace(base, init_ids=ids)) for rank, ids in starts[k]])
        error = ""
        for label, config in tries:
            try:
                out[k], how[k] = alone(k, config), label
                break
            except DreamError as e:
                error = error or f"{type(e).__name__}: {e}"
            except Exception as e:  # out of memory even one prompt per pass: this objective's row says so
                if not out_of_memory(e):
                    raise
                error = memory_error(e)
                break
        if not how[k]:
            out[k] = error
    return out, how, share


def out_of_memory(e: BaseException) -> bool:
    """Whether an error is running out of memory (torch's, a RuntimeError saying so, or Python's MemoryError)."""
    return isinstance(e, MemoryError) or is_oom(e)


def memory_error(e: BaseException) -> str:
    """The `error` of an objective whose dream ran out of memory (its passes already halved to one prompt),
    once the memory it held is released."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    first = (str(e).strip().splitlines() or [""])[0]
    return (f"{type(e).__name__}: {first} (out of memory with one prompt per pass: give each worker more memory, e.g. "
            "fewer workers per GPU or node, or dream shorter prompts)")


def _no_frontier() -> pd.DataFrame:
    """The frontier of an objective that could not be dreamed: no rows, the columns of `DreamResult.frontier`."""
    return pd.DataFrame({"text": pd.Series(dtype=str), "ids": pd.Series(dtype=object), "activation": pd.Series(dtype=float),
                         "xe": pd.Series(dtype=float), "iteration": pd.Series(dtype="int64")})


def _concat(frames: list[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
    """The frames one under the other (empty ones left out: they carry no column types)."""
    full = [f for f in frames if len(f)]
    return pd.concat(full, ignore_index=True) if full else frames[0] if frames else pd.DataFrame(columns=columns)


def _best(frontier: pd.DataFrame, limit: float) -> tuple[float, float, str]:
    """The frontier prompt of highest activation at xe <= limit: (activation, xe, text), NaNs if none."""
    i = best_under(frontier["activation"].to_numpy(float), frontier["xe"].to_numpy(float), limit)
    if i is None:
        return math.nan, math.nan, ""
    r = frontier.iloc[i]
    return float(r["activation"]), float(r["xe"]), str(r["text"])


def _summary_row(i: int, name: str, scan: ScanResult, dream: DreamResult | str, frontier: pd.DataFrame,
                 settings: SweepSettings, share: int) -> dict[str, Any]:
    stats = scan.stats.iloc[i]
    top = scan.top(i)
    best, best_xe, best_text = _best(frontier, math.inf)
    row: dict[str, Any] = {
        "objective": name,
        "dataset_max": dataset_max(scan, i), "dataset_mean": float(stats["mean"]), "frac_active": float(stats["frac_active"]),
        "dataset_q99": float(stats["q99"]), "median_top_xe": median_top_xe(scan, i),
        "best": best, "best_xe": best_xe, "best_text": best_text,
        "ratio": activation_ratio(best, scan, i), "percentile": dataset_percentile(best, scan, i),
    }
    for limit in settings.limits:
        a, x, text = _best(frontier, limit)
        s = limit_name(limit)
        row.update({f"best_{s}": a, f"best_{s}_xe": x, f"best_{s}_text": text, f"ratio_{s}": activation_ratio(a, scan, i),
                    f"percentile_{s}": dataset_percentile(a, scan, i)})
    fa, fx = frontier["activation"].to_numpy(float), frontier["xe"].to_numpy(float)
    row["beats_dataset"] = bool(np.any(beats_dataset(fa, fx, scan, i))) if len(fa) else False
    first = top.iloc[0] if len(top) else None
    row.update({
        "top_text": "" if first is None else str(first["text"]),
        "top_activation": math.nan if first is None else float(first["activation"]),
        "top_xe": math.nan if first is None else float(first["xe"]),
    })
    if isinstance(dream, str):  # no dream: the error says why and what to do instead
        row.update({"n_prompts": 0, "iterations": 0, "token_forwards": 0, "seconds": 0.0, "stopped": "error", "error": dream})
        return row
    row.update({
        "n_prompts": len(dream), "iterations": int(dream.iterations),
        # a run of a list shares its compute and time: each objective's share
        "token_forwards": round(dream.token_forwards / share), "seconds": dream.wall_time / share, "stopped": dream.stopped,
        "error": dream.error,
    })
    return row


def run_chunk(
    model: HookedTransformer, objectives: list[str], settings: SweepSettings, scan: ScanResult | None = None, *,
    first: int = 0, saes: dict[str, Any] | None = None,
) -> ChunkFrames:
    """Scan, dream and measure the objectives of one chunk (`first`: the sweep index of the first one).

    `scan`: the chunk's scan when it was made elsewhere (the Ray engine merges the scans of corpus
    slices); its objectives are these, in order; unscored top examples are scored here. Deterministic:
    the dreams are seeded (`options["seed"]`, default 0), so the same chunk gives the same frames.

    The summary has one row per dream: per objective, its modes 1..K (`mode`, best first at xe <=
    `mode_limit`; `found`: the order they were dreamed in; `key_tokens`: the tokens banned from the modes
    found after it, with their neighbours; `n_banned`: how many tokens it was dreamed without; `start`: the
    top example a later mode started from, picked as the least like the modes before it), or one row
    (mode 1) with modes == 1 or when it could not be dreamed. The frontiers carry the mode too; the top
    examples are one set per objective."""
    objs = parse_objectives(objectives, saes)
    settings.check_mode_budget(model)
    if scan is None:
        scan = scan_corpus(model, objs, settings.corpus, config=settings.scan, score=True, cache=False, progress=False)
    elif len(scan.objectives) != len(objs):
        raise SweepError(
            f"the scan given has {len(scan.objectives)} objective(s), the chunk {len(objs)}; scan the chunk's objectives"
        )
    elif not scan.scored:
        scan.score(model, objs)
    length = settings.dream.length
    starts = [example_starts(scan, i, length) for i in range(len(objs))]
    spans = [example_spans(scan, i, length) for i in range(len(objs))] if settings.modes > 1 else None
    dreams, how, share = _dreams(model, objs, settings, starts, spans)
    summary, fronts, examples = [], [], []
    for i, (name, d) in enumerate(zip(objectives, dreams)):
        index = first + i
        if isinstance(d, Modes):
            # a mode's start: its top example when Modes picked one, else where the objective's dream started
            modes = [(m + 1, d.found[m], d.dreams[m], d.starts[m] if d.starts[m].startswith("example") else how[i],
                      list(d.key_tokens[m]), len(d.banned[m])) for m in range(len(d))]
        else:
            modes = [(1, 1, d, how[i], [], 0)]
        for mode, found, r, start, keys, n_banned in modes:
            f = _no_frontier() if isinstance(r, str) else r.frontier
            row = _summary_row(i, name, scan, r, f, settings, share[i])
            summary.append({"index": index, "objective": name, "mode": mode, "found": found, **row, "start": start,
                            "key_tokens": [int(t) for t in keys], "n_banned": n_banned})
            f = f.assign(rank=np.arange(len(f)))
            fronts.append(f.assign(index=index, objective=name, mode=mode)[FRONTIER_COLUMNS])
        ex = scan.top(i).drop(columns=["rank"]).assign(index=index, objective=name)
        ex = ex.assign(rank=np.arange(len(ex)))
        examples.append(ex[EXAMPLE_COLUMNS])
    return ChunkFrames(pd.DataFrame(summary), _concat(fronts, FRONTIER_COLUMNS), _concat(examples, EXAMPLE_COLUMNS))
