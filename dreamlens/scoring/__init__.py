"""Scoring for every optimizer: where the prompt sits (layout), how a candidate is scored (xe), its
one-hot gradients, banned tokens and the re-tokenization check, prefix reuse, batching, and the
Evaluator that puts them together.

- layout.py     Layout, make_layout
- xe.py         logits, cross-entropy terms, span_xe, forward_scores, score
- gradients.py  onehot_inputs, token_gradients, gradient_pass, add_selection_term
- tokens.py     banned_mask, retokenizes
- reuse.py      prefix reuse on the parents' KV caches
- batching.py   Batching (an evaluator's settings), memory estimates, Batcher, buckets, fast_weights
- cache.py      ScoreCache
- evaluator.py  Evaluator, History, Compute, GRADIENT_COST
- recorder.py   PassRecorder (what an evaluator did, pass by pass, for benchmarks)
- lengths.py    LengthEvaluators (prompts of a length range)
- checks.py     check_vocab_sizes, check_not_constant (their DreamError lives in dreamlens.errors)
"""

from .batching import (
    CE_CHUNK_ELEMENTS,
    Batcher,
    Batching,
    buckets,
    call_cost_tokens,
    ce_rows,
    estimate_batch_tokens,
    fast_weights,
    is_oom,
    pass_tokens,
)
from .cache import ScoreCache
from .checks import check_not_constant, check_vocab_sizes, objective_is_constant
from .evaluator import GRADIENT_COST, Compute, Evaluator, History
from .gradients import add_selection_term, gradient_pass, onehot_inputs, token_gradients
from .layout import Layout, make_layout
from .lengths import LengthEvaluators
from .recorder import PassRecorder
from .reuse import KVRecorder, Parents, forward_from, kv_classes, record_parents, reuse_obstacle
from .tokens import banned_mask, retokenizes
from .xe import ce_terms, forward_scores, full_pass, logits, score, score_batched, span_xe, token_logits

__all__ = [
    "CE_CHUNK_ELEMENTS",
    "GRADIENT_COST",
    "Batcher",
    "Batching",
    "Compute",
    "Evaluator",
    "History",
    "KVRecorder",
    "Layout",
    "LengthEvaluators",
    "Parents",
    "PassRecorder",
    "ScoreCache",
    "add_selection_term",
    "banned_mask",
    "buckets",
    "call_cost_tokens",
    "ce_rows",
    "ce_terms",
    "check_not_constant",
    "check_vocab_sizes",
    "estimate_batch_tokens",
    "fast_weights",
    "forward_from",
    "forward_scores",
    "full_pass",
    "gradient_pass",
    "is_oom",
    "kv_classes",
    "logits",
    "make_layout",
    "objective_is_constant",
    "onehot_inputs",
    "pass_tokens",
    "record_parents",
    "retokenizes",
    "reuse_obstacle",
    "score",
    "score_batched",
    "span_xe",
    "token_gradients",
    "token_logits",
]
