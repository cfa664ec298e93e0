"""Deprecated: the optimizers' shared machinery moved to `dreamlens.scoring` (layout, xe, gradients,
tokens, reuse, batching, cache, evaluator, checks) and the run loop's SIGTERM handling to
`dreamlens.optim.loop`. The old public names keep working here, with a DeprecationWarning."""

from __future__ import annotations

from ..lazy import moved

_SCORING = (
    "CE_CHUNK_ELEMENTS",
    "GRADIENT_COST",
    "DreamError",
    "Evaluator",
    "Layout",
    "ScoreCache",
    "add_selection_term",
    "banned_mask",
    "check_not_constant",
    "check_vocab_sizes",
    "estimate_batch_tokens",
    "fast_weights",
    "forward_scores",
    "make_layout",
    "objective_is_constant",
    "onehot_inputs",
    "retokenizes",
    "score",
    "span_xe",
    "token_gradients",
)

__getattr__ = moved(
    "dreamlens.optim.core",
    {**dict.fromkeys(_SCORING, "dreamlens.scoring"), "sigterm_as_interrupt": "dreamlens.optim.loop"},
)
