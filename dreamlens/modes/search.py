"""`dream_modes`: several distinct dreams of one objective, for features that respond to unrelated things.
Mode 1 is an ordinary dream; each later mode is dreamed without the tokens that carried the modes before
it and, given the objective's top dataset examples, starts from the one least like the modes before it.

Distinct, by definition: mode j's prompts contain none of the *key tokens* of modes 1..j-1, nor their
nearest neighbours in the embedding. A mode's key tokens are the `n_key` tokens of its best prompt at the
fluency limit whose swap costs the most activation (causal attribution: the prompt's activation minus
the median activation over the token's replacements, kept where that drop is positive); its neighbours
are the `neighbours` tokens whose embedding rows are closest to it in cosine (W_E), so that " North",
"north" and " northern" go together.

Where a later mode starts: with `examples` (the top examples' spans), the example whose
`pattern_similarity` to the earlier modes' best prompts is lowest (what the objective's hooks hold there,
and the direction the objective reads them in; for `max(A, B)`: A's where A is the larger term), among
those as fluent as the limit (xe <= `limit`) where there are any. Its banned tokens (the earlier modes'
key tokens are often common ones, such as digits) are replaced, left to right, by the model's most
likely allowed token there. So a later mode begins in a part of the dataset that the earlier modes do
not explain; without examples it starts at random, like mode 1.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from ..analysis.attribution import attribute
from ..models import bos_token_id
from ..objectives import Objective
from ..objectives import objective as parse_objective
from ..optim.config import DreamConfig
from ..results import DreamResult
from ..scoring import make_layout
from .budget import attribution_cost, check_mode_budget, separation_cost
from .keys import embedding_neighbours, key_tokens
from .result import Modes
from .settings import ModeSettings, check_mode_count
from .starts import Starts

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from ..optim.loop import Callback


def dream_modes(
    model: HookedTransformer,
    objective: Objective | str,
    run: Any,
    cfg: DreamConfig,
    modes: int,
    *,
    settings: ModeSettings | None = None,
    examples: Sequence[tuple[int, Sequence[int]]] | None = None,
    callback: Callback | None = None,
    progress: bool = True,
) -> Modes:
    """`modes` dreams of `objective` with the optimizer `run` (e.g. `adapt`) and its config `cfg`, each
    later one without the key tokens (and their neighbours) of those before it; ranked by activation at
    xe <= `settings.limit`. `examples`: the objective's top dataset examples as (rank, span of
    `cfg.length` ids), e.g. `analysis.example_spans(scan, objective, length)`; a later mode starts from
    the one least like the modes before it (see the module docstring), at random without them. With a
    token budget, a later mode's budget leaves room for what separated it (the attribution, the
    examples' patterns), so no mode costs more than one ordinary dream."""
    settings = settings or ModeSettings()
    settings.validate()
    check_mode_count(modes)
    obj = parse_objective(objective)
    layout = make_layout(model, cfg.length, cfg.prefix, cfg.suffix)
    n_grad = settings.n_alternatives // 2
    cost = attribution_cost(layout.seq_len, cfg.length, settings.n_alternatives)
    starts = Starts(model, obj, cfg, examples, settings.limit) if examples is not None and modes > 1 else None
    n_examples = None if starts is None else len(starts.spans)
    check_mode_budget(cfg.max_token_forwards, layout.seq_len, cfg.length, settings, modes, n_examples,
                      fix="raise max_token_forwards, lower ModeSettings.n_alternatives or pass fewer examples")
    keep = set(settings.exclude) | ({b} if (b := bos_token_id(model)) is not None else set())
    first = cfg.start_kind()
    dreams: list[DreamResult] = []
    keys: list[list[int]] = []
    banned: list[list[int]] = []
    how: list[str] = []
    extra: set[int] = set()
    spent = 0
    for k in range(modes):
        cfg_k, start = cfg, first
        if k:
            cfg_k = dataclasses.replace(cfg, banned_tokens=tuple(sorted(set(cfg.banned_tokens) | extra)))
            budget_k = separation_cost(layout.seq_len, cfg.length, settings, k, n_examples)
            if starts is not None:
                picked = starts.pick([_best_ids(r, settings.limit) for r in dreams], cfg_k)
                spent += budget_k - cost  # choosing the start; the attribution is counted where it runs
                if picked is not None:
                    rank, span, replaced = picked
                    cfg_k = dataclasses.replace(cfg_k, init_ids=tuple(span), init_text=None)
                    start = f"example {rank}" + (f" ({replaced} banned token{'s' * (replaced > 1)} replaced)" if replaced else "")
            if cfg.max_token_forwards is not None:
                cfg_k = dataclasses.replace(cfg_k, max_token_forwards=cfg.max_token_forwards - budget_k)
        r = run(model, obj, cfg_k, callback=callback, progress=progress)
        dreams.append(r)
        banned.append(sorted(extra))
        how.append(start)
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
                 [banned[i] for i in order], settings.limit, spent, [how[i] for i in order])


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
