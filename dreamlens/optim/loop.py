"""The run loop every optimizer runs on: a `Method` supplies its first members (`init`, `start`), one
iteration (`step`) and its state (`MemberState`s); the loop owns everything around them.

    restore a saved run (resume=), or init a fresh one
    start (inside the protection below; ADAPT's beam search)
    for each iteration: step, snapshot the state, progress bar, checkpoint, callback, budget
    Ctrl-C or SIGTERM: return what was found; any other error: save the partial result, re-raise

Snapshots are taken at iteration boundaries only, and every result reports the last one (its state,
its iteration and the compute spent up to it), so a run stopped anywhere resumes exactly.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from torch import Tensor
from tqdm.auto import tqdm

from ..errors import DreamError
from ..models import bos_token_id, decode
from ..objectives import Objective
from ..objectives import objective as parse_objective
from ..results import DreamResult
from ..scoring import Evaluator, Layout, banned_mask, check_vocab_sizes, fast_weights, make_layout

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from .config import DreamConfig
    from .members import MemberState


@dataclass
class IterationInfo:
    """What a callback sees after each iteration. Return True from the callback to stop the run."""

    iteration: int
    objective: int  # which objective (population) this is about
    texts: list[str]
    activation: list[float]
    xe: list[float]
    best_activation: float
    token_forwards: int
    extra: dict[str, Any] = field(default_factory=dict)


Callback = Callable[[IterationInfo], "bool | None"]


class Method:
    """An optimizer as the loop runs it: the objectives it dreams (`objectives`, the `indices` of the
    user's list they are), their evaluator `ev`, and one `MemberState` per objective in `states`
    (None until the members exist). Subclasses implement `init`, `restore` and `step`."""

    name = ""  # the results' method
    desc = "dreaming"  # the progress bar's label
    budget_first = False  # also stop for the budget before the first iteration (after `start`)

    def __init__(
        self, model: HookedTransformer, objectives: Sequence[Objective], cfg: DreamConfig, layout: Layout,
        ev: Evaluator, indices: Sequence[int] | None = None,
    ):
        self.model, self.objectives, self.cfg, self.layout, self.ev = model, list(objectives), cfg, layout, ev
        self.indices = list(indices) if indices is not None else list(range(len(self.objectives)))
        self.states: list[MemberState | None] = [None] * len(self.objectives)

    def init(self) -> None:
        """A fresh run's setup before the loop: an error here ends the run with no result."""
        raise NotImplementedError

    def start(self) -> None:
        """A fresh run's first members, found inside the loop's protection (a stop here still returns
        a result, with no state to resume from until `states` are set). Default: nothing (`init` did it)."""

    def restore(self, states: list[dict[str, Any]]) -> None:
        """The states of a saved run (`DreamResult.state`, one per objective)."""
        raise NotImplementedError

    def step(self, iteration: int) -> None:
        """One iteration."""
        raise NotImplementedError

    def extra(self, k: int) -> dict[str, Any]:
        """What the callback's `IterationInfo.extra` holds for objective k."""
        return {}

    def snapshot(self) -> list[dict[str, Any]]:
        """Each objective's state as a result stores it ({} while there is none)."""
        return [s.to_dict() if s is not None else {} for s in self.states]


@dataclass(frozen=True)
class Boundary:
    """The state after iteration `iteration` and the compute spent up to it: what every result reports."""

    iteration: int
    states: list[dict[str, Any]]
    counts: tuple[int, int, int]  # n_forward, n_gradient, token_forwards


def run(
    method: Method,
    *,
    resume: Sequence[DreamResult] | None = None,
    callback: Callback | None = None,
    progress: bool = True,
    folder: str | None = None,
    per_objective: bool = False,
) -> list[DreamResult]:
    """Run `method` for its config's iterations (or continue the saved run `resume`, one result per
    objective) and return one result per objective. Checkpoints and the partial result of a failed
    run go to `folder`; `per_objective`: each result to its own subfolder `objective_k`, and a failure
    carries the list of results (otherwise the first)."""
    model, cfg, ev = method.model, method.cfg, method.ev
    wall0, wall_prev = time.perf_counter(), 0.0
    with fast_weights(model), sigterm_as_interrupt():  # weights restored however the run ends; SIGTERM is Ctrl-C
        if resume is not None:
            for k, r in enumerate(resume):
                ev.restore(k, list(r.ids), r.activation, r.xe, r.iteration, r.text)
            ev.compute.restore(resume[0].n_forward, resume[0].n_gradient, resume[0].token_forwards)
            method.restore([r.state for r in resume])
            first, wall_prev = resume[0].iterations + 1, resume[0].wall_time
        else:
            method.init()
            first = 1
        mark = Boundary(first - 1, method.snapshot(), ev.compute.counts())

        def results(stopped: str, error: str = "") -> list[DreamResult]:
            wall = wall_prev + time.perf_counter() - wall0
            return _results(method, mark, wall, stopped, error)

        def spent() -> bool:
            return cfg.max_token_forwards is not None and ev.compute.token_forwards >= cfg.max_token_forwards

        bar = _progress(progress, cfg.iters, first - 1, method.desc)
        stopped = "completed"
        try:
            if resume is None:
                method.start()
                mark = Boundary(mark.iteration, method.snapshot(), ev.compute.counts())
            if method.budget_first and spent():
                stopped, first = "budget", cfg.iters + 1
            for it in range(first, cfg.iters + 1):
                method.step(it)
                mark = Boundary(it, method.snapshot(), ev.compute.counts())
                _update_bar(bar, ev)
                if cfg.checkpoint_every and it % cfg.checkpoint_every == 0:
                    save_checkpoint(results("checkpoint"), folder, per_objective)
                if callback is not None and _call(callback, method, it):
                    stopped = "callback"
                    break
                if spent():
                    stopped = "budget"
                    break
        except KeyboardInterrupt:
            stopped = "interrupted"
            warnings.warn(f"interrupted: returning the result of the {mark.iteration} completed iterations", stacklevel=3)
        except Exception as e:  # a bug or a failing callback: keep what was found, then fail
            save_partial(e, results("error", f"{type(e).__name__}: {e}"), folder, per_objective)
            raise
        finally:
            if bar is not None:
                bar.close()
    return results(stopped)


def _results(method: Method, mark: Boundary, wall: float, stopped: str, error: str) -> list[DreamResult]:
    """One result per objective, as of the boundary `mark`."""
    model, cfg = method.model, method.cfg
    n_forward, n_gradient, token_forwards = mark.counts
    out = []
    for k, o in enumerate(method.objectives):
        ids, vals, xe, it, text = method.ev.history[k].arrays()
        out.append(
            DreamResult(
                objective=str(o), method=method.name, config=cfg.to_dict(), ids=ids, activation=vals, xe=xe,
                iteration=it, text=text, prefix=cfg.prefix, suffix=cfg.suffix, bos_token_id=bos_token_id(model),
                model_name=str(model.cfg.model_name), wall_time=wall, n_forward=n_forward,
                n_gradient=n_gradient, token_forwards=token_forwards, iterations=mark.iteration,
                stopped=stopped, state=mark.states[k] if mark.states else {}, error=error,
            )
        )
    return out


def _call(callback: Callback, method: Method, it: int) -> bool:
    """The callback, once per objective (every one of them, even after one said stop); whether to stop."""
    stop = False
    for k, s in enumerate(method.states):
        assert s is not None  # every state exists once the iterations run
        info = IterationInfo(
            iteration=it, objective=method.indices[k], texts=[decode(method.model, r) for r in s.members],
            activation=s.activation.tolist(), xe=s.xe.tolist(), best_activation=method.ev.history[k].best_value(),
            token_forwards=method.ev.compute.token_forwards, extra=method.extra(k),
        )
        stop = bool(callback(info)) or stop
    return stop


def _progress(enabled: bool, total: int, initial: int, desc: str) -> Any:
    if not enabled:
        return None
    return tqdm(total=total, initial=initial, desc=desc, unit="it", dynamic_ncols=True)


def _update_bar(bar: Any, ev: Evaluator) -> None:
    if bar is None:
        return
    h = ev.history[0]
    i = h.best()
    if i is not None:
        bar.set_postfix(best=f"{h.values[i]:.3f}", xe=f"{h.xe[i]:.2f}", prompts=len(h))
    bar.update(1)


# ---------------------------------------------------------------------------------------------
# Before the run: the inputs, a saved run to continue


def prepare(
    model: HookedTransformer, objectives: Objective | str | Sequence[Objective | str], cfg: DreamConfig
) -> tuple[list[Objective], bool, Layout, Tensor]:
    """Validate everything before any compute: objectives, config, layout, banned tokens. Returns the
    objectives, whether one was given (not a list), the layout and the banned-token mask."""
    single = not isinstance(objectives, (list, tuple))
    items = cast("list[Objective | str]", [objectives] if single else list(objectives))
    objs = [parse_objective(o) for o in items]
    if not objs:
        raise DreamError("no objective given: pass one objective or a non-empty list")
    cfg.validate()
    for o in objs:
        o.validate(model)
    sizes = ("population", "beams", "children", "topk", "topk_max")
    check_vocab_sizes(model, **{k: getattr(cfg, k) for k in sizes if hasattr(cfg, k)})
    layout = make_layout(model, cfg.length, cfg.prefix, cfg.suffix)
    for name, n in zip(("min_length", "max_length"), cfg.length_range()):
        if n != cfg.length:  # every length of the range must fit the context and have a fluency to score
            try:
                make_layout(model, n, cfg.prefix, cfg.suffix)
            except DreamError as e:
                raise DreamError(f"{name}={n}: {e}") from None
    banned = banned_mask(
        model, ascii_only=cfg.ascii_only, ban_whitespace_only=cfg.ban_whitespace_only, extra=cfg.banned_tokens
    )
    return objs, single, layout, banned


def load_resume(resume: DreamResult | str | Path | Sequence[DreamResult | str | Path], n: int) -> list[DreamResult]:
    """The saved results (or folders) of `resume=`, one per objective."""
    items = cast("list[DreamResult | str | Path]", list(resume) if isinstance(resume, (list, tuple)) else [resume])
    out = [DreamResult.load(r) if isinstance(r, (str, Path)) else r for r in items]
    if len(out) != n:
        raise DreamError(f"resume has {len(out)} result(s) but {n} objective(s) were given")
    return out


def check_resume(prev: Sequence[DreamResult], objs: Sequence[Objective], cfg: DreamConfig, method: str) -> None:
    """Refuse to continue a run of another method, objective or config (budgets may change)."""
    new = cfg.to_dict()
    for r, o in zip(prev, objs):
        if r.method != method or r.objective != str(o):
            raise DreamError(f"cannot resume a {r.method} run of {r.objective!r} as a {method} run of {str(o)!r}")
        diff = [k for k in new if k not in cfg.RESUMABLE and r.config.get(k) != new[k]]
        if diff:
            raise DreamError(
                f"cannot resume with a different config: {', '.join(diff)} changed; only iters and budgets may change"
            )
        if not r.state:
            raise DreamError("this result holds no optimizer state to resume from")


# ---------------------------------------------------------------------------------------------
# Stops: checkpoints, failures, signals


def objective_folder(folder: str | Path, k: int) -> str:
    """Where objective k's result of a run of several objectives is saved."""
    return str(Path(folder) / f"objective_{k}")


def save_checkpoint(results: list[DreamResult], folder: str | None, per_objective: bool) -> None:
    """Save the results to `folder` (each to its own `objective_k` subfolder when `per_objective`),
    replacing the run's previous checkpoint; nothing without a folder."""
    if folder is None:
        return
    if not per_objective:
        results[0].save(folder, overwrite=True)
    else:
        for k, r in enumerate(results):
            r.save(objective_folder(folder, k), overwrite=True)


def save_partial(e: BaseException, results: list[DreamResult], folder: str | None, per_objective: bool) -> None:
    """Before an exception leaves a run: attach the partial result to it (`e.dreamlens_result`), save it
    to `folder` when there is one (a failed save is noted, never masks `e`), and say how to resume."""
    e.dreamlens_result = results if per_objective else results[0]  # type: ignore[attr-defined]
    where = "it is on the exception as .dreamlens_result"
    if folder is not None:
        try:
            save_checkpoint(results, folder, per_objective)
            where = f"saved to {folder}"
        except Exception as save_error:  # the original error matters more
            where += f" (saving it to {folder} failed: {save_error})"
    e.add_note(f"dreamlens: the partial result ({results[0].iterations} iterations) {where}; resume= continues it")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """For the duration, SIGTERM (a job scheduler's stop) raises KeyboardInterrupt as Ctrl-C does, so
    the run returns (and the CLI saves) its partial result. Only the main thread can take signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
