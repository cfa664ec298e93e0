"""Modes: several distinct dreams of one objective, for features that respond to unrelated things.
Mode 1 is an ordinary dream; each later mode is dreamed without the tokens that carried the modes before it.

Distinct, by definition: mode j's prompts contain none of the *key tokens* of modes 1..j-1, nor their
nearest neighbours in the embedding. A mode's key tokens are the `n_key` tokens of its best prompt at the
fluency limit whose swap costs the most activation (causal attribution: the prompt's activation minus
the median activation over the token's replacements, kept where that drop is positive); its neighbours
are the `neighbours` tokens whose embedding rows are closest to it in cosine (W_E), so that " North",
"north" and " northern" go together.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor

from ..errors import OutputError
from ..io import atomic_write_text
from ..objectives import Objective
from ..objectives import objective as parse_objective
from ..results import DreamResult, ResultError, check_output_folder
from ..scoring import DreamError
from .config import DreamConfig

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from ..analysis.attribution import Attribution
    from .loop import Callback

MODES_FORMAT = 1
DEFAULT_LIMIT = 6.0  # nats/token: modes are ranked by their best activation at xe <= this


@dataclass
class Modes:
    """K distinct dreams of one objective, best first by activation at xe <= `limit`.

    `dreams[i]` is a full DreamResult (history, frontier); `found[i]` the order it was dreamed in (1 is
    the ordinary dream); `key_tokens[i]` its key tokens (banned for every mode found after it);
    `banned[i]` the tokens it was dreamed without (from the modes found before it)."""

    objective: str
    dreams: list[DreamResult]
    found: list[int]
    key_tokens: list[list[int]]
    banned: list[list[int]]
    limit: float = DEFAULT_LIMIT
    attribution_token_forwards: int = 0  # spent finding key tokens (counted in the later modes' budgets)

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
        its unconstrained best, the order it was found in, its key tokens and how many tokens it was
        dreamed without."""
        rows = []
        for i, r in enumerate(self.dreams):
            b = self.best(i)
            rows.append({
                "mode": i + 1, "found": self.found[i],
                "text": None if b is None else b["text"],
                "activation": float("nan") if b is None else float(b["activation"]),
                "xe": float("nan") if b is None else float(b["xe"]),
                "best_activation": float(np.max(r.activation)) if len(r) else float("nan"),
                "key_tokens": list(self.key_tokens[i]), "n_banned": len(self.banned[i]),
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
                "attribution_token_forwards": self.attribution_token_forwards}
        atomic_write_text(path / "modes.json", json.dumps(meta, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Modes:
        path = Path(path)
        f = path / "modes.json"
        if not f.is_file():
            raise ResultError(f"{str(path)!r} holds no modes (no modes.json); pass the folder Modes.save wrote")
        meta = json.loads(f.read_text())
        if meta.get("format") != "dreamlens.Modes" or meta.get("version") != MODES_FORMAT:
            got = f"{meta.get('format')!r} {meta.get('version')!r}"
            raise ResultError(f"{f} is not a modes file of format {MODES_FORMAT} (got {got})")
        dreams = [DreamResult.load(path / f"mode_{i + 1}") for i in range(len(meta["found"]))]
        return cls(meta["objective"], dreams, meta["found"], meta["key_tokens"], meta["banned"], meta["limit"],
                   meta.get("attribution_token_forwards", 0))

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


@dataclass(frozen=True)
class ModeSettings:
    """How later modes are kept away from earlier ones (see the module docstring)."""

    n_key: int = 3  # key tokens per mode
    neighbours: int = 8  # embedding neighbours banned with each key token (itself included)
    n_alternatives: int = 8  # replacements per position in the attribution (half gradient, half random)
    limit: float = DEFAULT_LIMIT
    exclude: tuple[int, ...] = ()  # never banned (the start token never is)

    def validate(self) -> None:
        for name in ("n_key", "neighbours", "n_alternatives"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise DreamError(f"{name} must be a positive integer, got {v!r}")
        if not self.limit > 0:
            raise DreamError(f"the fluency limit must be positive (nats per token), got {self.limit!r}")


def key_tokens(att: Attribution, n_key: int) -> list[int]:
    """The tokens of an attributed prompt whose swap costs the most activation: the prompt's value
    minus the median over each position's replacements, the `n_key` largest positive drops."""
    drop = att.value - np.median(att.alt_values, axis=1)
    order = [int(i) for i in np.argsort(-drop, kind="stable") if drop[i] > 0][:n_key]
    return list(dict.fromkeys(int(att.ids[i]) for i in order))


def embedding_neighbours(model: HookedTransformer, tokens: list[int], k: int) -> list[int]:
    """Each token and its `k - 1` nearest tokens by cosine of the embedding rows (W_E)."""
    if not tokens:
        return []
    w = model.W_E.detach().float()
    w = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sims = w[torch.tensor(tokens, device=w.device)] @ w.T  # [n, vocab]
    near = sims.topk(min(k, w.shape[0]), dim=-1).indices.cpu()
    return sorted({int(t) for t in tokens} | {int(t) for t in near.flatten()})


def attribution_cost(seq_len: int, length: int, n_alternatives: int) -> int:
    """Token-forwards of one attribution: a gradient pass (3 per token) and every swapped prompt."""
    return seq_len * (3 + length * n_alternatives)


def dream_modes(
    model: HookedTransformer,
    objective: Objective | str,
    run: Any,
    cfg: DreamConfig,
    modes: int,
    *,
    settings: ModeSettings | None = None,
    callback: Callback | None = None,
    progress: bool = True,
) -> Modes:
    """`modes` dreams of `objective` with the optimizer `run` (e.g. `adapt`) and its config `cfg`, each
    later one without the key tokens (and their neighbours) of those before it; ranked by activation at
    xe <= `settings.limit`. With a token budget, a later mode's budget leaves room for the attribution
    that found its bans, so no mode costs more than one ordinary dream."""
    from ..analysis.attribution import attribute
    from ..models import bos_token_id
    from ..scoring import make_layout

    settings = settings or ModeSettings()
    settings.validate()
    if not isinstance(modes, int) or isinstance(modes, bool) or modes < 1:
        raise DreamError(f"modes must be a positive integer, got {modes!r}")
    obj = parse_objective(objective)
    layout = make_layout(model, cfg.length, cfg.prefix, cfg.suffix)
    n_grad = settings.n_alternatives // 2
    cost = attribution_cost(layout.seq_len, cfg.length, settings.n_alternatives)
    if cfg.max_token_forwards is not None and modes > 1 and cfg.max_token_forwards <= cost:
        raise DreamError(
            f"a budget of {cfg.max_token_forwards} token-forwards leaves nothing for a mode after the attribution that "
            f"separates it ({cost} token-forwards); raise max_token_forwards or lower ModeSettings.n_alternatives"
        )
    keep = set(settings.exclude) | ({b} if (b := bos_token_id(model)) is not None else set())
    dreams: list[DreamResult] = []
    keys: list[list[int]] = []
    banned: list[list[int]] = []
    extra: set[int] = set()
    spent = 0
    for k in range(modes):
        cfg_k = cfg
        if k:
            cfg_k = dataclasses.replace(cfg, banned_tokens=tuple(sorted(set(cfg.banned_tokens) | extra)))
            if cfg.max_token_forwards is not None:
                cfg_k = dataclasses.replace(cfg_k, max_token_forwards=cfg.max_token_forwards - cost)
        r = run(model, obj, cfg_k, callback=callback, progress=progress)
        dreams.append(r)
        banned.append(sorted(extra))
        if k == modes - 1:
            keys.append([])
            break
        ids = _best_ids(r, settings.limit)
        if ids is None:
            keys.append([])
            continue
        att = attribute(model, obj, ids, prefix=cfg.prefix, suffix=cfg.suffix, n_gradient=n_grad,
                        n_random=settings.n_alternatives - n_grad, seed=cfg.seed)
        spent += cost
        key = [t for t in key_tokens(att, settings.n_key) if t not in keep]
        keys.append(key)
        extra |= {t for t in embedding_neighbours(model, key, settings.neighbours) if t not in keep}
    order = sorted(range(len(dreams)), key=lambda i: -_rank_value(dreams[i], settings.limit))
    return Modes(str(obj), [dreams[i] for i in order], [i + 1 for i in order], [keys[i] for i in order],
                 [banned[i] for i in order], settings.limit, spent)


def _best_ids(r: DreamResult, limit: float) -> Int[Tensor, " length"] | None:
    """The span of the result's best prompt at xe <= limit (its most fluent prompt if none is)."""
    if not len(r):
        return None
    i = r.best_index(limit)
    i = int(np.argmin(r.xe)) if i is None else i
    return torch.as_tensor(np.asarray(r.ids[i]), dtype=torch.long)


def _rank_value(r: DreamResult, limit: float) -> float:
    i = r.best_index(limit)
    return float("-inf") if i is None else float(r.activation[i])
