"""GCG, Greedy Coordinate Gradient (Zou et al. 2023), as the special case of EPO it is: one member,
one fixed fluency penalty, no restarts. It runs EPO's own loop, so it is a baseline, not a rival copy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import DreamError
from ..objectives import Objective
from ..results import DreamResult
from .config import GCGConfig
from .epo import epo
from .loop import Callback, load_resume

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


def gcg(
    model: HookedTransformer,
    objective: Objective | str | Sequence[Objective | str],
    config: GCGConfig | None = None,
    *,
    callback: Callback | None = None,
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
        resume = [
            r if r.method == "epo" else dataclasses.replace(r, method="epo", config=GCGConfig.epo_dict(r.config)) for r in prev
        ]
        resume = resume if many else resume[0]
    out = epo(model, objective, ecfg, callback=callback, resume=resume, progress=progress)
    mine = cfg.to_dict()
    if isinstance(out, list):
        return [dataclasses.replace(r, method="gcg", config=mine) for r in out]
    return dataclasses.replace(out, method="gcg", config=mine)
