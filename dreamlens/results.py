"""DreamResult: every prompt an optimizer evaluated, its Pareto frontier, and saving without pickle.

A result folder holds `result.json` (objective, config, counters, optimizer state for `resume`) and
`history.parquet` (one row per evaluated prompt: iteration, text, ids, activation, xe).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import pandas as pd

from .errors import OutputError, ResultError

FORMAT_VERSION = 1

# Why a run stopped. completed: every iteration ran; budget: max_token_forwards was spent; callback:
# the callback returned True; interrupted: Ctrl-C or SIGTERM; checkpoint: a checkpoint written mid-run
# (the run may still be going, or was killed); error: an exception (its text in `DreamResult.error`),
# re-raised after the partial result was saved. Every one of them can be resumed.
STOP_REASONS = ("completed", "budget", "callback", "interrupted", "checkpoint", "error")


_RESULT_FILES = ("result.json", "history.parquet")


def check_output_folder(path: Path, *, overwrite: bool = False, fix: str = "pass overwrite=True to replace it") -> None:
    """Refuse (`OutputError`) to write a result to `path` if that would destroy something: an existing
    result unless `overwrite`, and never a file or a folder holding other things."""
    if not path.exists():
        return
    if not path.is_dir():
        raise OutputError(f"{str(path)!r} is a file; a result is written to a folder: choose another path")
    if (path / "result.json").exists():
        if not overwrite:
            raise OutputError(f"{str(path)!r} already holds a dream result; {fix}, or choose another folder")
        return
    if any(path.iterdir()):
        raise OutputError(
            f"{str(path)!r} is a folder holding other files, not a dream result: saving would replace them; "
            "choose a new or empty folder"
        )


def pareto_front(activation: np.ndarray, xe: np.ndarray) -> np.ndarray:
    """Indices of the non-dominated points (higher activation, lower xe), sorted by xe ascending.

    A point is kept when no other point has xe <= its xe and activation >= its activation with one of
    them strict. This is the true frontier, non-convex parts included."""
    activation = np.asarray(activation, dtype=np.float64)
    xe = np.asarray(xe, dtype=np.float64)
    ok = np.isfinite(activation) & np.isfinite(xe)
    idx = np.flatnonzero(ok)
    order = idx[np.lexsort((-activation[idx], xe[idx]))]  # by xe, then highest activation first
    keep, best = [], -np.inf
    for i in order:
        if activation[i] > best:
            keep.append(i)
            best = activation[i]
    return np.asarray(keep, dtype=np.int64)


def stack_ids(rows: Sequence[Any], length: int = 0) -> np.ndarray:
    """Prompts' token ids as one array: [n, length] int64 when they share one length (`length` for
    none), else (prompts of a length range) a 1-D object array holding one int64 array per prompt."""
    arrays = [np.asarray(r, dtype=np.int64) for r in rows]
    if not arrays:
        return np.zeros((0, length), np.int64)
    if len({len(a) for a in arrays}) == 1:
        return np.stack(arrays)
    out = np.empty(len(arrays), dtype=object)
    out[:] = arrays
    return out


def best_under(activation: np.ndarray, xe: np.ndarray, max_xe: float = float("inf")) -> int | None:
    """The index of the highest activation among the points with xe <= max_xe (the first on ties; None if none)."""
    ok = np.flatnonzero(np.asarray(xe, dtype=np.float64) <= max_xe)
    return int(ok[np.argmax(np.asarray(activation, dtype=np.float64)[ok])]) if ok.size else None


@dataclass(frozen=True)
class _Column:
    """Marks a per-prompt field of DreamResult: one column of `history` and of history.parquet. Every
    other field is stored in result.json."""

    position: int  # the column's place in `history`
    kind: Literal["tokens", "int", "float", "text"]  # tokens: one row of token ids per prompt


def _column(position: int, kind: Literal["tokens", "int", "float", "text"]) -> dict[str, _Column]:
    return {"column": _Column(position, kind)}


@dataclass
class DreamResult:
    """What a dream produced. `history` has every evaluated prompt; `frontier` its Pareto set."""

    objective: str
    method: str
    config: dict[str, Any]
    # [n, length] int; with a length range (prompts of several lengths) a 1-D object array of rows (`stack_ids`)
    ids: np.ndarray = field(metadata=_column(2, "tokens"))
    activation: np.ndarray = field(metadata=_column(3, "float"))  # [n] float
    xe: np.ndarray = field(metadata=_column(4, "float"))  # [n] float
    iteration: np.ndarray = field(metadata=_column(0, "int"))  # [n] int
    text: list[str] = field(metadata=_column(1, "text"))
    prefix: str = ""
    suffix: str = ""
    bos_token_id: int | None = None
    model_name: str = ""
    wall_time: float = 0.0
    n_forward: int = 0  # prompts scored in batched forward passes
    n_gradient: int = 0  # prompts passed through forward+backward for one-hot gradients
    token_forwards: int = 0  # compute spent, in token-forwards (a gradient pass counts 3 per token)
    iterations: int = 0  # iterations completed
    stopped: str = "completed"  # one of STOP_REASONS
    state: dict[str, Any] = field(default_factory=dict)  # the optimizer's state, for resume
    error: str = ""  # when stopped == "error": the exception, as "TypeName: message"

    # -- views -----------------------------------------------------------------------------------
    @property
    def history(self) -> pd.DataFrame:
        """One row per evaluated prompt: the per-prompt fields as columns (iteration, text, ids,
        activation, xe); `ids` holds each prompt's token ids as a list of ints."""
        return self._table()

    def _table(self, token_dtype: type | None = None) -> pd.DataFrame:
        """The history columns in their order; token rows as lists of ints, or as arrays of `token_dtype`."""
        table: dict[str, Any] = {}
        for name, column in _history_fields():
            value = getattr(self, name)
            if column.kind == "tokens":
                if token_dtype is None:
                    table[name] = [list(map(int, r)) for r in value]
                else:
                    table[name] = [np.asarray(r, dtype=token_dtype) for r in value]
            elif column.kind == "text":
                table[name] = value
            else:
                table[name] = value.astype(_DTYPES[column.kind])
        return pd.DataFrame(table)

    def to_dataframe(self) -> pd.DataFrame:
        return self.history

    @property
    def frontier(self) -> pd.DataFrame:
        """The non-dominated prompts (activation high, xe low), sorted by xe."""
        keep = pareto_front(self.activation, self.xe)
        return self.history.iloc[keep].reset_index(drop=True)[["text", "ids", "activation", "xe", "iteration"]]

    def best_index(self, max_xe: float = float("inf")) -> int | None:
        """The row of the prompt with the highest activation among those with xe <= max_xe (None if none)."""
        return best_under(self.activation, self.xe, max_xe)

    def best(self, max_xe: float = float("inf")) -> pd.Series:
        """The prompt with the highest activation among those with xe <= max_xe."""
        i = self.best_index(max_xe)
        if i is None:
            lo = float(np.min(self.xe)) if self.xe.size else float("nan")
            raise ResultError(f"no prompt has xe <= {max_xe}; the lowest xe in this result is {lo:.3f}")
        return self.history.iloc[i][["text", "ids", "activation", "xe", "iteration"]]

    def __len__(self) -> int:
        return len(self.text)

    def __repr__(self) -> str:
        best = f"{float(np.max(self.activation)):.3f}" if len(self) else "n/a"
        return (
            f"DreamResult({self.method}, {self.objective!r}, {len(self)} prompts, {self.iterations} iterations, "
            f"best activation {best}, stopped: {self.stopped})"
        )

    # -- saving ----------------------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        """The content of result.json: every field that is not a history column, and the frontier
        (for a reader of the file; `load` recomputes it)."""
        meta: dict[str, Any] = {"format": "dreamlens.DreamResult", "version": FORMAT_VERSION}
        meta.update({f.name: getattr(self, f.name) for f in _meta_fields()})
        meta["frontier"] = json.loads(cast(str, self.frontier.to_json(orient="records")))
        return meta

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the result folder atomically (a crash never leaves a half-written result).

        A folder that already holds a result is replaced only with `overwrite=True` (other files in it,
        such as a report, are kept); a file, or a folder holding anything but a result, is never replaced."""
        path = Path(path)
        check_output_folder(path, overwrite=overwrite)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        except OSError as e:
            raise OutputError(f"cannot write a result to {str(path)!r} ({e.strerror or e}); choose a writable folder") from e
        moved: list[str] = []  # the user's other files in the folder, carried over into the new one
        old = None
        try:
            (tmp / "result.json").write_text(json.dumps(self._meta(), indent=1))
            self._table(token_dtype=np.int32).to_parquet(tmp / "history.parquet", index=False)
            if path.exists():
                for entry in path.iterdir():  # keep what else lives beside the result (a report, a plot)
                    if entry.name not in _RESULT_FILES:
                        os.replace(entry, tmp / entry.name)
                        moved.append(entry.name)
                old = path.with_name(f".{path.name}.old-{os.getpid()}")
                os.replace(path, old)
            os.replace(tmp, path)
        except BaseException:
            if old is not None and not path.exists():
                os.replace(old, path)
            for name in moved:  # nothing of the user's is lost when the save fails
                os.replace(tmp / name, path / name)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> DreamResult:
        path = Path(path)
        meta_file = path / "result.json"
        if not meta_file.is_file():
            raise ResultError(
                f"{str(path)!r} is not a dream result folder (no result.json); pass the folder given to --out or save()"
            )
        try:
            meta = json.loads(meta_file.read_text())
        except json.JSONDecodeError as e:
            raise ResultError(f"{meta_file} is not valid JSON ({e}); the result is corrupt") from e
        if meta.get("format") != "dreamlens.DreamResult" or meta.get("version") != FORMAT_VERSION:
            raise ResultError(
                f"{str(path)!r} holds format {meta.get('format')!r} version {meta.get('version')!r}; this dreamlens "
                f"reads dreamlens.DreamResult version {FORMAT_VERSION}"
            )
        try:
            hist = pd.read_parquet(path / "history.parquet")
        except Exception as e:
            raise ResultError(f"cannot read {path / 'history.parquet'}: {e}") from e
        required = [f.name for f in _meta_fields() if f.default is MISSING and f.default_factory is MISSING]
        missing = [k for k in required if k not in meta]
        columns = _history_fields()
        if missing or not {name for name, _ in columns} <= set(hist.columns):
            raise ResultError(
                f"{str(path)!r} is an incomplete dream result (missing {missing or 'history columns'}); save it again"
            )
        values: dict[str, Any] = {f.name: meta[f.name] for f in _meta_fields() if f.name in meta}  # else the default
        length = int(meta["config"].get("length", 0))
        for name, column in columns:
            if column.kind == "tokens":
                values[name] = stack_ids(list(hist[name]), length)
            elif column.kind == "text":
                values[name] = list(hist[name])
            else:
                values[name] = hist[name].to_numpy(_DTYPES[column.kind])
        return cls(**values)


_DTYPES = {"int": np.int64, "float": np.float64}


def _history_fields() -> list[tuple[str, _Column]]:
    """The per-prompt fields of DreamResult with their column, in `history`'s column order."""
    marked = [(f.name, f.metadata["column"]) for f in fields(DreamResult) if "column" in f.metadata]
    return sorted(marked, key=lambda item: item[1].position)


def _meta_fields() -> list[Field[Any]]:
    """The fields of DreamResult stored in result.json (all but the history columns), in their order."""
    return [f for f in fields(DreamResult) if "column" not in f.metadata]
