"""`dream()`: the one entry point for every optimizer, so notebooks and the CLI switch methods with a word;
with `modes=K` it dreams K distinct modes (`dreamlens.modes`), with `examples=` it starts from dataset
examples. Above `optim/` and `modes/`, which it dispatches to.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .analysis.scan import ScanResult, example_spans
from .errors import DreamError
from .modes.result import Modes
from .modes.search import dream_modes
from .modes.settings import ModeSettings, check_needs_modes
from .objectives import Objective
from .optim.config import DreamConfig
from .optim.loop import Callback
from .optim.methods import DEFAULT_METHOD, METHODS, make_config
from .results import DreamResult

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


def dream(
    model: HookedTransformer,
    objective: Objective | str | Sequence[Objective | str],
    method: str = DEFAULT_METHOD,
    *,
    config: DreamConfig | None = None,
    callback: Callback | None = None,
    resume: DreamResult | str | Path | Sequence[Any] | None = None,
    progress: bool = True,
    modes: int | None = None,
    mode_settings: ModeSettings | None = None,
    examples: ScanResult | Sequence[tuple[int, Sequence[int]]] | None = None,
    **options: Any,
) -> DreamResult | list[DreamResult] | Modes:
    """Dream with `method` ("adapt", the default; "epo"; or "gcg"). `options` are fields of the
    method's config (`ADAPTConfig`, `EPOConfig`, `GCGConfig`), e.g. `dream(model, obj, "epo", iters=50)`;
    `config=` starts from a config object instead of the defaults. Every method returns a DreamResult
    (a list of them for a list of objectives).

    `modes=K` returns `Modes`: K dreams of one objective, distinct by construction (each later one
    without the key tokens of those before it, see `dreamlens.modes.search`), ranked by activation at a
    fluency limit (`mode_settings`); the first one found is the ordinary dream with the same seed.
    `examples` (a scan of the objective, or its top examples as (rank, ids)): the dream starts from
    them (`init_prompts`: every example scored as a dream, charged to the budget; the members start
    from those covering the examples' activation-fluency region, see `members.cover`); with modes,
    later modes start from the top example least like the modes before them."""
    cfg = make_config(method, config, **options)
    run = METHODS[method][0]
    if modes is not None:
        if not isinstance(objective, (Objective, str)):
            raise DreamError("modes= dreams one objective at a time; pass a single objective (or its string form)")
        if resume is not None:
            raise DreamError("modes= cannot resume a run; dream the modes again (with a fixed seed they come out the same)")
        if isinstance(examples, ScanResult):
            window = int(examples.meta.get("window", cfg.length))
            examples = example_spans(examples, objective, cfg.length)
            if not examples and window < cfg.length:
                raise DreamError(f"the scan's examples have {window} tokens, the dream {cfg.length}; scan with window >= "
                                 f"{cfg.length} to start modes from them")
        return dream_modes(model, objective, run, cfg, modes, settings=mode_settings, examples=examples, callback=callback,
                           progress=progress)
    check_needs_modes(modes, {"mode_settings=": mode_settings})
    if examples is not None:
        if not isinstance(objective, (Objective, str)):
            raise DreamError("examples= starts one objective's dream from its examples; pass a single objective")
        if resume is not None:
            raise DreamError("examples= sets where a fresh run starts; a resumed run continues from its own state, drop one")
        if getattr(cfg, "self_scan", None):
            raise DreamError("self_scan finds starts when no examples are given, and examples= gives them; "
                             "drop self_scan or examples=")
        cfg = dataclasses.replace(cfg, init_prompts=example_starts(examples, objective, cfg.length), init_text=None,
                                  init_ids=None)
    return run(model, objective, cfg, callback=callback, resume=resume, progress=progress)


def example_starts(
    examples: ScanResult | Sequence[tuple[int, Sequence[int]]], objective: Objective | str, length: int
) -> tuple[tuple[int, ...], ...]:
    """The candidate starts of a dream from dataset examples: the last `length` tokens of each top
    example (the window that ends at its max-activating token), without repeats, in the scan's order."""
    if isinstance(examples, ScanResult):
        window = int(examples.meta.get("window", length))
        if window < length:
            raise DreamError(f"the scan's examples have {window} tokens, the dream {length}; scan with window >= {length} "
                             f"or dream with length <= {window}")
        spans = example_spans(examples, objective, length, positive=False)
    else:
        spans = [(int(r), tuple(int(t) for t in ids)[-length:]) for r, ids in examples]
    starts = tuple(dict.fromkeys(s for _, s in spans if len(s) == length))
    if not starts:
        raise DreamError(f"no example has {length} tokens to start from; give examples of at least length={length} tokens")
    return starts
