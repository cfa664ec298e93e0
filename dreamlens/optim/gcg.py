"""GCG, Greedy Coordinate Gradient (Zou et al. 2023), as the special case of EPO it is: one member,
one fixed fluency penalty, no restarts. It runs EPO's own loop, so it is a baseline, not a rival copy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..objectives import Objective
from ..results import DreamResult
from .core import DreamError
from .epo import EPOConfig, IterationInfo, epo, load_resume


@dataclass(frozen=True)
class GCGConfig:
    """GCG's knobs; sizes are the GCG paper's (512 candidates per step from the top-256 tokens).

    GCG maximizes `f - lam * xe` with one fixed `lam`; the original attack had no fluency term:
    a tiny `lam` (1e-6) comes close. `lam` must be positive."""

    length: int = 12
    lam: float = 1.0
    children: int = 512  # candidates per step, each one token swapped
    topk: int = 256
    iters: int = 500
    seed: int = 0
    init_text: str | None = None
    init_ids: tuple[int, ...] | None = None
    prefix: str = ""
    suffix: str = ""
    ascii_only: bool = False
    ban_whitespace_only: bool = False
    banned_tokens: tuple[int, ...] = ()
    batch_size: int = 64
    max_token_forwards: int | None = None
    checkpoint_every: int | None = None  # checkpoints are EPO's (method "epo"); gcg(resume=) reads them
    checkpoint_dir: str | None = None

    def validate(self) -> None:
        if not self.lam > 0:
            raise DreamError(f"lam must be positive, got {self.lam}; for GCG without fluency use a tiny lam such as 1e-6")
        self.to_epo().validate()

    def to_epo(self) -> EPOConfig:
        """The EPO configuration this GCG is: one member with penalty lam, never restarted."""
        keep = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "lam"}
        return EPOConfig(**keep, population=1, lam_min=self.lam, lam_max=self.lam, restart_every=0)


def gcg(
    model: Any,
    objective: Objective | str | Sequence[Objective | str],
    config: GCGConfig | None = None,
    *,
    callback: Callable[[IterationInfo], bool | None] | None = None,
    resume: DreamResult | str | Path | Sequence[Any] | None = None,
    progress: bool = True,
) -> DreamResult | list[DreamResult]:
    """Dream with GCG: exactly `epo(model, objective, config.to_epo())`, labelled as GCG."""
    cfg = config or GCGConfig()
    cfg.validate()
    ecfg = cfg.to_epo()
    if resume is not None:
        many = isinstance(objective, (list, tuple))
        prev = load_resume(resume, len(objective) if many else 1)
        for r in prev:
            if r.method not in ("gcg", "epo"):
                raise DreamError(f"cannot resume a {r.method} run as a gcg run")
        # EPO checks the config it ran with: hand it the EPO form of the saved GCG config.
        resume = [r if r.method == "epo" else dataclasses.replace(r, method="epo", config=_as_epo(r.config)) for r in prev]
        resume = resume if many else resume[0]
    out = epo(model, objective, ecfg, callback=callback, resume=resume, progress=progress)
    mine = _as_dict(cfg)
    relabel = lambda r: dataclasses.replace(r, method="gcg", config=mine)  # noqa: E731
    return [relabel(r) for r in out] if isinstance(out, list) else relabel(out)


def _as_dict(cfg: Any) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def _as_epo(config: dict[str, Any]) -> dict[str, Any]:
    """The EPO config dict of a saved GCG config dict."""
    d = {k: v for k, v in config.items() if k != "lam"}
    lam = config.get("lam")
    return {**_as_dict(EPOConfig()), **d, "population": 1, "lam_min": lam, "lam_max": lam, "restart_every": 0}
