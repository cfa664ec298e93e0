"""A sweep's folder: sweep.json (config, objectives, format) and one Parquet file per chunk under summary/,
frontiers/ and examples/ (summary written last: a chunk is done iff its summary file exists); `load_sweep`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from ..errors import OutputError
from ..io import atomic_write_text, write_parquet
from .chunk import MODE_DEFAULTS
from .errors import SweepConfigError, SweepError

if TYPE_CHECKING:
    from .chunk import ChunkFrames

FORMAT, VERSION = "dreamlens.Sweep", 1
TABLES = ("frontiers", "examples", "summary")  # the order a chunk is written in: summary last


def chunk_name(number: int) -> str:
    return f"chunk-{number:05d}.parquet"


def plan_chunks(objectives: Sequence[str], chunk_size: int) -> list[list[str]]:
    """The objectives in chunks of `chunk_size` (the last one may be shorter); chunk k starts at k * chunk_size."""
    return [list(objectives[i : i + chunk_size]) for i in range(0, len(objectives), chunk_size)]


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """The keys whose values differ, each as 'key (OLD there, NEW now)'; nested dicts by 'key.sub'."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} ({a!r} there, {b!r} now)")
    return out


def _objective_difference(old: list[str], new: list[str]) -> str:
    if len(old) != len(new):
        return f"objectives ({len(old)} there, {len(new)} now)"
    i = next(i for i, (a, b) in enumerate(zip(old, new)) if a != b)
    return f"objectives (number {i} is {old[i]!r} there, {new[i]!r} now)"


class SweepStore:
    """The files of one sweep folder. `open` checks (or, with `create`, writes) its sweep.json; `write_chunk`
    stores a finished chunk; `done` says which chunks are finished."""

    def __init__(self, folder: str | os.PathLike, config: dict[str, Any], objectives: list[str]):
        self.folder, self.config, self.objectives = Path(folder), config, objectives
        self.chunks = plan_chunks(objectives, int(config["chunk_size"]))

    @classmethod
    def check(cls, folder: str | os.PathLike, config: dict[str, Any], objectives: list[str]) -> SweepStore:
        """The store for this config and these objectives, refusing (`SweepConfigError`, naming each differing
        key) a folder that holds another sweep, and (`OutputError`) a file or a folder of other things.
        Writes nothing: `create` does, once the sweep is ready to run."""
        path = Path(folder)
        if path.exists() and not path.is_dir():
            raise OutputError(f"{str(path)!r} is a file; a sweep is written to a folder: choose another path")
        meta_file = path / "sweep.json"
        if meta_file.is_file():
            meta = read_meta(path)
            diff = _differences(meta.get("config", {}), config)
            if meta.get("objectives") != objectives:
                diff.append(_objective_difference(list(meta.get("objectives", [])), objectives))
            if diff:
                raise SweepConfigError(
                    f"{str(path)!r} holds a sweep with another config: {'; '.join(diff)}. Resume it with the same "
                    "settings, or sweep into another folder"
                )
        elif path.is_dir() and any(p for p in path.iterdir() if not p.name.startswith(".")):
            raise OutputError(
                f"{str(path)!r} holds other files, not a sweep (no sweep.json): a sweep needs a new or empty folder; "
                "choose another one"
            )
        return cls(path, config, objectives)

    def create(self) -> None:
        """Write sweep.json and the table folders (nothing if sweep.json exists: it was checked)."""
        try:
            for name in TABLES:
                (self.folder / name).mkdir(parents=True, exist_ok=True)
            if not (self.folder / "sweep.json").is_file():
                meta = {"format": FORMAT, "version": VERSION, "config": self.config, "objectives": self.objectives}
                atomic_write_text(self.folder / "sweep.json", json.dumps(meta, indent=1))
        except OSError as e:
            where = str(self.folder)
            raise OutputError(f"cannot write the sweep to {where!r} ({e.strerror or e}); choose a writable folder") from e

    def record_run(self, run: dict[str, Any]) -> None:
        """Note in sweep.json what a run of this sweep ran on (`run`: its engine, and for Ray its address and
        each worker's node, GPUs and device), under "runs"; a run recorded again (same "id") is updated."""
        meta = read_meta(self.folder)
        runs = [r for r in meta.get("runs", []) if r.get("id") != run.get("id")]
        meta["runs"] = [*runs, run]
        try:
            atomic_write_text(self.folder / "sweep.json", json.dumps(meta, indent=1))
        except OSError as e:
            raise OutputError(f"cannot write {str(self.folder / 'sweep.json')!r} ({e.strerror or e}); choose a writable "
                              "folder") from e

    def done(self, number: int) -> bool:
        return (self.folder / "summary" / chunk_name(number)).is_file()

    def todo(self) -> list[tuple[int, list[str]]]:
        """The unfinished chunks: (chunk number, its objectives)."""
        return [(k, c) for k, c in enumerate(self.chunks) if not self.done(k)]

    def write_chunk(self, number: int, frames: ChunkFrames | tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]) -> None:
        """Store a finished chunk: frontiers, examples, then its summary (each atomically), so a chunk is
        done exactly when its summary file exists. The rows must be the chunk's objectives, in order (each
        once per mode)."""
        summary, frontiers, examples = frames
        expect = self.chunks[number]
        if list(dict.fromkeys(summary["objective"])) != expect:  # one row per mode: repeats, in order
            raise SweepError(f"chunk {number} came back with other objectives than it holds ({expect[:3]}...); this is a bug")
        tables = {"summary": summary, "frontiers": frontiers, "examples": examples}
        for name in TABLES:
            write_parquet(tables[name], self.folder / name / chunk_name(number))


def read_meta(folder: str | os.PathLike) -> dict[str, Any]:
    """sweep.json of a sweep folder; `SweepError` if there is none, or it is not a sweep of this version."""
    path = Path(folder)
    meta_file = path / "sweep.json"
    if not meta_file.is_file():
        raise SweepError(f"{str(path)!r} is not a sweep folder (no sweep.json); pass the folder given to sweep(out=) or --out")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SweepError(f"{meta_file} is unreadable ({e}); the sweep folder is damaged") from e
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise SweepError(
            f"{str(path)!r} holds format {meta.get('format')!r} version {meta.get('version')!r}; this dreamlens reads "
            f"{FORMAT} version {VERSION}"
        )
    return meta


@dataclass
class Sweep:
    """A sweep read back: its `config`, `objectives`, and the finished chunks' rows, by objective (`index`
    is its place in the sweep) and `mode`: `summary` (one row per dream, i.e. per objective and mode, 1
    when the sweep took no modes: dataset statistics, best dream overall and at each fluency limit,
    ratio, percentile, beats-dataset, top example), `frontiers` (of each mode), `examples` (of each
    objective). A store written before sweeps took modes reads as mode 1 everywhere. `runs`: what each
    run of it ran on, in order (engine; for Ray the address and each worker's node, GPUs and device)."""

    folder: Path
    config: dict[str, Any]
    objectives: list[str]
    summary: pd.DataFrame
    frontiers: pd.DataFrame
    examples: pd.DataFrame
    runs: list[dict[str, Any]] = field(default_factory=list)  # what each run ran on (`SweepStore.record_run`)

    @property
    def n_done(self) -> int:
        """Objectives done (the summary has a row per mode of each)."""
        return int(self.summary["index"].nunique()) if len(self.summary) else 0

    @property
    def modes(self) -> int:
        """Dreams per objective (`sweep(modes=K)`; 1 for a sweep without modes)."""
        return int(self.config.get("modes", 1))

    @property
    def complete(self) -> bool:
        return self.n_done == len(self.objectives)

    def _index(self, objective: int | str) -> int:
        if isinstance(objective, str):
            if objective not in self.objectives:
                raise SweepError(f"{objective!r} is not an objective of this sweep (it has {self.objectives[:3]}...)")
            return self.objectives.index(objective)
        if not 0 <= int(objective) < len(self.objectives):
            raise SweepError(f"objective index {objective} is out of range: this sweep has {len(self.objectives)}")
        return int(objective)

    def frontier(self, objective: int | str, mode: int | None = 1) -> pd.DataFrame:
        """One objective's dream frontier (by its string form or index), sorted by xe: of its `mode` (1, the
        best, by default; None: every mode's, one after another)."""
        i = self._index(objective)
        rows = self.frontiers[self.frontiers["index"] == i]
        if mode is not None:
            if not 1 <= int(mode) <= self.modes:
                raise SweepError(f"mode {mode} is out of range: this sweep has {self.modes} mode(s) per objective "
                                 f"(1..{self.modes})")
            rows = rows[rows["mode"] == int(mode)] if "mode" in rows.columns else rows
        return rows.sort_values([c for c in ("mode", "rank") if c in rows.columns]).reset_index(drop=True)

    def top(self, objective: int | str) -> pd.DataFrame:
        """One objective's top dataset examples, best first."""
        i = self._index(objective)
        return self.examples[self.examples["index"] == i].sort_values("rank").reset_index(drop=True)

    def __len__(self) -> int:
        return len(self.objectives)

    def __repr__(self) -> str:
        c = self.config
        modes = f", {self.modes} modes of each" if self.modes > 1 else ""
        return (f"Sweep({str(self.folder)!r}: {self.n_done} of {len(self.objectives)} objectives done{modes}, "
                f"{c.get('method')} at {c.get('budget')} token-forwards each, model {c.get('model')!r})")


def _with_modes(frame: pd.DataFrame, table: str) -> pd.DataFrame:
    """A chunk's table with the mode columns, filled in (mode 1, the only dream) for a chunk stored before
    sweeps took modes."""
    if table == "examples" or "mode" in frame.columns:
        return frame
    frame = frame.copy()
    at = list(frame.columns).index("objective") + 1 if "objective" in frame.columns else len(frame.columns)
    for offset, (col, value) in enumerate(MODE_DEFAULTS.items() if table == "summary" else [("mode", 1)]):
        if col not in frame.columns:
            where = at + offset if col in ("mode", "found") else len(frame.columns)
            frame.insert(where, col, [list(value) if isinstance(value, list) else value for _ in range(len(frame))])
    return frame


def load_sweep(folder: str | os.PathLike) -> Sweep:
    """The sweep in `folder` (finished chunks only: a running or interrupted sweep reads as far as it got).
    The Parquet files can also be read directly: `pd.read_parquet(folder / "summary")`."""
    path = Path(folder)
    meta = read_meta(path)
    done = sorted(p.name for p in (path / "summary").glob("chunk-*.parquet")) if (path / "summary").is_dir() else []
    frames: dict[str, pd.DataFrame] = {}
    for name in ("summary", "frontiers", "examples"):
        parts = []
        for file in done:
            try:
                parts.append(pd.read_parquet(path / name / file))
            except Exception as e:
                raise SweepError(f"cannot read {path / name / file} ({e}); delete that chunk's files to compute it again") from e
        parts = [_with_modes(p, name) for p in parts if len(p.columns)]
        frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame({"index": [], "objective": []})
        sort = [c for c in ("index", "mode", "rank") if c in frame.columns]
        frame = frame.sort_values(sort, kind="stable").reset_index(drop=True)
        for col in ("ids", "key_tokens"):  # Parquet gives arrays: token ids as lists of ints, as a scan's examples
            if col in frame.columns:
                frame[col] = [[int(t) for t in w] for w in frame[col]]
        frames[name] = frame
    return Sweep(path, meta["config"], list(meta["objectives"]), frames["summary"], frames["frontiers"], frames["examples"],
                 list(meta.get("runs", [])))
