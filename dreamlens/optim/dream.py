"""`dream()`: the one entry point for every optimizer, so notebooks and the CLI switch methods with a word.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import DreamError
from ..objectives import Objective
from ..results import DreamResult
from .adapt import adapt
from .config import CONFIGS, DreamConfig
from .epo import epo
from .gcg import gcg
from .loop import Callback
from .modes import Modes, ModeSettings, dream_modes

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from ..analysis.scan import ScanResult

METHODS: dict[str, tuple[Callable[..., Any], type[DreamConfig]]] = {
    name: (run, CONFIGS[name]) for name, run in (("adapt", adapt), ("epo", epo), ("gcg", gcg))
}
DEFAULT_METHOD = "adapt"  # chosen by benchmarks/fluency.py (see the README)


def make_config(method: str = DEFAULT_METHOD, config: DreamConfig | None = None, **options: Any) -> DreamConfig:
    """The config of `method`: `config` (or the defaults) with `options` replaced."""
    if method not in METHODS:
        close = difflib.get_close_matches(str(method), list(METHODS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise DreamError(f"unknown method {method!r}{hint} (choose from {', '.join(sorted(METHODS))})")
    cls = METHODS[method][1]
    if config is not None and not isinstance(config, cls):
        raise DreamError(f"method {method!r} takes a {cls.__name__}, got a {type(config).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    for key in options:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            others = [m for m, (_, c) in METHODS.items() if key in {f.name for f in dataclasses.fields(c)}]
            where = f" ({key!r} is an option of {', '.join(others)})" if others else ""
            raise DreamError(f"{key!r} is not an option of {method}{hint}{where}")
    options = {k: _frozen(v) for k, v in options.items()}
    return dataclasses.replace(config or cls(), **options)


def _frozen(value: Any) -> Any:
    """Lists as tuples, nested ones too (config fields are hashable)."""
    return tuple(_frozen(v) for v in value) if isinstance(value, (list, tuple)) else value


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
    without the key tokens of those before it, see `dreamlens.optim.modes`), ranked by activation at a
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
        from ..analysis.scan import ScanResult, example_spans

        if isinstance(examples, ScanResult):
            window = int(examples.meta.get("window", cfg.length))
            examples = example_spans(examples, objective, cfg.length)
            if not examples and window < cfg.length:
                raise DreamError(f"the scan's examples have {window} tokens, the dream {cfg.length}; scan with window >= "
                                 f"{cfg.length} to start modes from them")
        return dream_modes(model, objective, run, cfg, modes, settings=mode_settings, examples=examples, callback=callback,
                           progress=progress)
    if mode_settings is not None:
        raise DreamError("mode_settings= applies only with modes=K; pass modes=2 or more, or drop mode_settings")
    if examples is not None:
        if not isinstance(objective, (Objective, str)):
            raise DreamError("examples= starts one objective's dream from its examples; pass a single objective")
        if resume is not None:
            raise DreamError("examples= sets where a fresh run starts; a resumed run continues from its own state, drop one")
        cfg = dataclasses.replace(cfg, init_prompts=example_starts(examples, objective, cfg.length), init_text=None,
                                  init_ids=None)
    return run(model, objective, cfg, callback=callback, resume=resume, progress=progress)


def example_starts(
    examples: ScanResult | Sequence[tuple[int, Sequence[int]]], objective: Objective | str, length: int
) -> tuple[tuple[int, ...], ...]:
    """The candidate starts of a dream from dataset examples: the last `length` tokens of each top
    example (the window that ends at its max-activating token), without repeats, in the scan's order."""
    from ..analysis.scan import ScanResult, example_spans

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
