"""`Modes`: K distinct dreams of one objective, best first at a fluency limit; saved as a folder of
dream results and modes.json (no pickle), and loaded back.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import OutputError, ResultError
from ..io import atomic_write_text
from ..results import DreamResult, check_output_folder
from .settings import DEFAULT_LIMIT

MODES_FORMAT = 2  # 2 added `starts`; format 1 still loads


@dataclass
class Modes:
    """K distinct dreams of one objective, best first by activation at xe <= `limit`.

    `dreams[i]` is a full DreamResult (history, frontier); `found[i]` the order it was dreamed in (1 is
    the ordinary dream); `key_tokens[i]` its key tokens (banned for every mode found after it);
    `banned[i]` the tokens it was dreamed without (from the modes found before it); `starts[i]` where
    it started: "random", "self-scan" or "given" (`DreamConfig.start_kind`) or "example N" (the top example of rank N)."""

    objective: str
    dreams: list[DreamResult]
    found: list[int]
    key_tokens: list[list[int]]
    banned: list[list[int]]
    limit: float = DEFAULT_LIMIT
    attribution_token_forwards: int = 0  # spent separating modes: key tokens, starts (in the later modes' budgets)
    starts: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.starts:  # modes saved before starts were recorded started at random
            self.starts = ["random"] * len(self.dreams)

    def __len__(self) -> int:
        return len(self.dreams)

    def __getitem__(self, i: int) -> DreamResult:
        return self.dreams[i]

    def __iter__(self) -> Iterator[DreamResult]:
        return iter(self.dreams)

    def best(self, i: int) -> pd.Series | None:
        """Mode i's best prompt at xe <= limit (None when it has none that fluent)."""
        r = self.dreams[i]
        return None if r.best_index(self.limit) is None else r.best(self.limit)

    def to_frame(self) -> pd.DataFrame:
        """One row per mode, best first: its best prompt at the fluency limit (text, activation, xe),
        its unconstrained best, the order it was found in, its key tokens, how many tokens it was
        dreamed without and where it started."""
        rows = []
        for i, r in enumerate(self.dreams):
            b = self.best(i)
            rows.append({
                "mode": i + 1, "found": self.found[i],
                "text": None if b is None else b["text"],
                "activation": float("nan") if b is None else float(b["activation"]),
                "xe": float("nan") if b is None else float(b["xe"]),
                "best_activation": float(np.max(r.activation)) if len(r) else float("nan"),
                "key_tokens": list(self.key_tokens[i]), "n_banned": len(self.banned[i]), "start": self.starts[i],
            })
        return pd.DataFrame(rows)

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """A folder: mode_1/ .. mode_K/ (each a DreamResult folder) and modes.json, written last."""
        path = Path(path)
        check_modes_folder(path, overwrite=overwrite)
        if (path / "modes.json").exists():
            (path / "modes.json").unlink()  # written again last: a crash leaves no modes.json over mixed folders
            for old in path.glob("mode_*"):  # an earlier save may have had more modes
                if old.is_dir() and (old / "result.json").exists():
                    shutil.rmtree(old)
        path.mkdir(parents=True, exist_ok=True)
        for i, r in enumerate(self.dreams):
            r.save(path / f"mode_{i + 1}", overwrite=True)
        meta = {"format": "dreamlens.Modes", "version": MODES_FORMAT, "objective": self.objective, "limit": self.limit,
                "found": self.found, "key_tokens": self.key_tokens, "banned": self.banned,
                "attribution_token_forwards": self.attribution_token_forwards, "starts": self.starts}
        atomic_write_text(path / "modes.json", json.dumps(meta, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Modes:
        path = Path(path)
        f = path / "modes.json"
        if not f.is_file():
            raise ResultError(f"{str(path)!r} holds no modes (no modes.json); pass the folder Modes.save wrote")
        meta = json.loads(f.read_text())
        if meta.get("format") != "dreamlens.Modes" or meta.get("version") not in (1, MODES_FORMAT):
            got = f"{meta.get('format')!r} {meta.get('version')!r}"
            raise ResultError(f"{f} is not a modes file of format {MODES_FORMAT} (got {got})")
        dreams = [DreamResult.load(path / f"mode_{i + 1}") for i in range(len(meta["found"]))]
        return cls(meta["objective"], dreams, meta["found"], meta["key_tokens"], meta["banned"], meta["limit"],
                   meta.get("attribution_token_forwards", 0), meta.get("starts", []))

    def __repr__(self) -> str:
        parts = []
        for i in range(len(self)):
            b = self.best(i)
            parts.append(f"{i + 1}: " + ("none at this fluency" if b is None else f"{float(b['activation']):.3f} {b['text']!r}"))
        return f"Modes({self.objective!r}, xe <= {self.limit:g}; " + "; ".join(parts) + ")"


def check_modes_folder(path: Path, *, overwrite: bool = False) -> None:
    """Refuse (`OutputError`) to save modes to `path` where that would destroy something: modes already
    there unless `overwrite`, and never a dream result, a file or a folder holding other things."""
    if (path / "modes.json").exists():
        if not overwrite:
            raise OutputError(f"{str(path)!r} already holds modes; pass overwrite=True to replace them, or choose another folder")
        return
    if (path / "result.json").exists():
        raise OutputError(f"{str(path)!r} holds a dream result; modes go to a folder of their own: choose another folder")
    check_output_folder(path)
