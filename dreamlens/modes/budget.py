"""The one budget rule of modes: what separating a later mode from those before it costs, in
token-forwards, charged to that mode's budget, so that no mode costs more than one ordinary dream.

Separating later mode k (1, 2, ...) costs the attribution of the key tokens of the mode before it and,
when later modes start from the objective's top examples, choosing that start (`starts_cost`). A
budget that does not cover the most any later mode is charged leaves nothing to dream it with.
"""

from __future__ import annotations

from ..errors import DreamError, DreamlensError
from .settings import ModeSettings

REPAIR_TRIES = 3  # examples tried, least alike first, until one is still a valid prompt once its banned tokens are replaced


def attribution_cost(seq_len: int, length: int, n_alternatives: int) -> int:
    """Token-forwards of one attribution: a gradient pass (3 per token) and every swapped prompt."""
    return seq_len * (3 + length * n_alternatives)


def starts_cost(seq_len: int, n_examples: int, mode: int, length: int) -> int:
    """Token-forwards charged for choosing where later mode `mode` (1, 2, ...) starts: with the first, the
    examples' patterns and their xe (two passes each); with each, the best prompt of every earlier mode
    and, at most, one pass per replaced token of each example tried."""
    return seq_len * ((2 * n_examples if mode == 1 else 0) + mode + REPAIR_TRIES * length)


def separation_cost(seq_len: int, length: int, settings: ModeSettings, mode: int, n_examples: int | None = None) -> int:
    """Token-forwards charged to later mode `mode` (1, 2, ...) for what separates it from the modes before
    it, for prompts of `seq_len` tokens (`length` of them dreamed): the attribution of the key tokens and,
    with `n_examples` top examples to start from (None: a random start), choosing its start."""
    cost = attribution_cost(seq_len, length, settings.n_alternatives)
    return cost + (0 if n_examples is None else starts_cost(seq_len, n_examples, mode, length))


def most_separation(seq_len: int, length: int, settings: ModeSettings, modes: int, n_examples: int | None = None) -> int:
    """The most token-forwards any later mode of `modes` is charged (`separation_cost`); 0 with one mode."""
    return max((separation_cost(seq_len, length, settings, k, n_examples) for k in range(1, modes)), default=0)


def check_mode_budget(budget: int | None, seq_len: int, length: int, settings: ModeSettings, modes: int,
                      n_examples: int | None = None, *, fix: str, error: type[DreamlensError] = DreamError) -> None:
    """`error` if a budget of `budget` token-forwards per mode (None: no budget) leaves nothing for a later
    mode after what separates it (`most_separation`); `fix` says what to change."""
    if budget is None or modes < 2:
        return
    need = most_separation(seq_len, length, settings, modes, n_examples)
    if budget <= need:
        examples = "" if n_examples is None else f", the patterns of {n_examples} top examples"
        raise error(
            f"a budget of {budget} token-forwards leaves nothing for a later mode after what separates it from those "
            f"before it (up to {need} token-forwards for prompts of {seq_len} tokens: the attribution of their key "
            f"tokens{examples}); {fix}"
        )
