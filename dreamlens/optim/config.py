"""The optimizers' configs: `DreamConfig` holds what every method shares (the span, its context, the
tokens allowed, batching, the budget, checkpoints, the seed) and its validation; `EPOConfig`,
`ADAPTConfig` and `GCGConfig` add only their own knobs.

Configs are frozen and keyword-only. A config's dict (what `DreamResult.config` stores, and what a
resume is checked against) is built from its dataclass fields: `config.to_dict()`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from ..errors import DreamError

# A check: (condition, message when it fails). Checks are generated lazily, in order, so a later
# condition is only evaluated once the earlier ones held.
Check = tuple[bool, str]

# The dream budget (`max_token_forwards`, token-forwards) of a sweep's dreams and of the demo, where a run
# needs one; a `DreamConfig` itself has none (`iters` ends it).
DEFAULT_BUDGET = 12_000


@dataclass(frozen=True, kw_only=True)
class DreamConfig:
    """The knobs every optimizer has. Subclasses add their own, and may change a default."""

    length: int = 12  # optimized tokens (with a length range: the starting length)
    # A length range (ADAPT): insertions and deletions may grow a prompt to max_length tokens or shrink it
    # to min_length (None: `length`, so by default every prompt keeps one length).
    min_length: int | None = None
    max_length: int | None = None
    children: int = 32  # children per member per iteration
    iters: int = 300
    seed: int = 0
    init_text: str | None = None  # start every member from this text instead of random tokens
    init_ids: tuple[int, ...] | None = None
    # Candidate starts (e.g. top dataset examples): all are scored as dreams (charged to the budget) and
    # the members start from those that cover their activation-fluency region (`members.cover`).
    init_prompts: tuple[tuple[int, ...], ...] | None = None
    prefix: str = ""  # fixed context before the optimized span
    suffix: str = ""  # fixed context after it
    ascii_only: bool = False  # ban tokens with non-ASCII characters
    ban_whitespace_only: bool = False
    banned_tokens: tuple[int, ...] = ()  # special tokens are always banned
    batch_size: int = 64  # prompts per forward pass when scoring children
    max_batch_tokens: int | None = None  # tokens per pass (None: estimated from free memory)
    reuse_prefix: bool = True  # compute children from their first changed position, on the parent's KV cache
    max_token_forwards: int | None = None  # stop once this much compute is spent (see scoring.GRADIENT_COST)
    checkpoint_every: int | None = None  # save the result every N iterations (atomic)
    checkpoint_dir: str | None = None

    # Settings that may change when a run is resumed: budgets, and how the work is batched and computed.
    RESUMABLE = ("iters", "checkpoint_every", "checkpoint_dir", "max_token_forwards", "max_batch_tokens", "reuse_prefix")

    def validate(self) -> None:
        """Raise a DreamError with the first check that fails (shared checks around the method's own)."""
        for ok, msg in self.checks():
            if not ok:
                raise DreamError(msg)

    def checks(self) -> Iterator[Check]:
        """Every check of this config, in the order they are made."""
        yield isinstance(self.length, int) and self.length >= 1, f"length must be at least 1 token, got {self.length!r}"
        yield from self.length_checks()
        yield from self.method_checks()
        yield self.children >= 1, f"children must be at least 1 per member, got {self.children}"
        yield self.iters >= 0, f"iters must be >= 0, got {self.iters}"
        yield self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}"
        yield (
            self.max_batch_tokens is None or self.max_batch_tokens >= 1,
            f"max_batch_tokens must be None (estimated from free memory) or at least 1, got {self.max_batch_tokens}",
        )
        yield self.checkpoint_every is None or self.checkpoint_every >= 1, "checkpoint_every must be None or >= 1"
        yield (
            self.checkpoint_every is None or self.checkpoint_dir is not None,
            "checkpoint_every needs checkpoint_dir: where to write the checkpoints",
        )
        yield self.init_text is None or self.init_ids is None, "give init_text or init_ids, not both"
        yield (
            self.init_prompts is None or (self.init_text is None and self.init_ids is None),
            "give init_prompts (candidate starts) or init_text / init_ids (one start), not both",
        )
        yield (
            self.init_prompts is None or (len(self.init_prompts) > 0 and all(len(p) == self.length for p in self.init_prompts)),
            f"init_prompts must be a non-empty list of prompts of length {self.length} (token ids), got "
            f"{sorted({len(p) for p in self.init_prompts or ()}) or 'none'} tokens; pass windows of length={self.length}",
        )
        yield (
            isinstance(self.seed, numbers.Integral) and not isinstance(self.seed, bool),
            f"seed must be an integer, got {self.seed!r}",
        )

    def length_checks(self) -> Iterator[Check]:
        """The length range's checks: 1 <= min_length <= length <= max_length."""
        for name in ("min_length", "max_length"):
            value = getattr(self, name)
            yield (
                value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1),
                f"{name} must be None (the same as length) or at least 1 token, got {value!r}",
            )
        lo, hi = self.length_range()
        start = f"length ({self.length}), the starting length"
        yield lo <= self.length, f"min_length ({lo}) must be <= {start}; use min_length <= {self.length}"
        yield hi >= self.length, f"max_length ({hi}) must be >= {start}; use max_length >= {self.length}"

    def length_range(self) -> tuple[int, int]:
        """(shortest, longest) prompt length: (length, length) unless min_length / max_length are set."""
        lo = self.length if self.min_length is None else self.min_length
        hi = self.length if self.max_length is None else self.max_length
        return lo, hi

    @property
    def variable_length(self) -> bool:
        """Whether prompts may change length (a range wider than one length)."""
        lo, hi = self.length_range()
        return lo < hi

    def fixed_length_check(self, method: str) -> Check:
        """The check of a method that keeps every prompt at one length: no length range."""
        return (
            not self.variable_length,
            f"{method} keeps every prompt at one length, but min_length={self.min_length} / max_length={self.max_length} "
            f"set a range; dream with method='adapt' (it inserts and deletes tokens within the range), or drop "
            f"min_length and max_length",
        )

    def method_checks(self) -> Iterator[Check]:
        """The checks of a method's own knobs (none here)."""
        return iter(())

    def start_kind(self) -> str:
        """Where a run of this config starts, as sweeps and modes report it: "given" (init_text or
        init_ids), else "random" (the method's own start)."""
        return "given" if self.init_text is not None or self.init_ids is not None else "random"

    def to_dict(self) -> dict[str, Any]:
        """Every field by name, tuples as lists (JSON-ready): what a result stores as its config."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, tuple) else value


def log_penalties(lam_min: float, lam_max: float, n: int) -> np.ndarray:
    """n fluency penalties log-spaced from lam_min to lam_max (just lam_min for one)."""
    if n == 1:
        return np.array([lam_min])
    return np.logspace(math.log10(lam_min), math.log10(lam_max), n)


@dataclass(frozen=True, kw_only=True)
class EPOConfig(DreamConfig):
    """EPO's knobs; defaults are the paper's."""

    population: int = 8  # members M
    lam_min: float = 0.1  # penalties log-spaced from lam_min to lam_max
    lam_max: float = 10.0
    topk: int = 512  # a child's new token is drawn from the top-k of the negative gradient
    restart_every: int = 50  # 0 disables restarts
    # Beyond the paper (defaults off): measured in benchmarks/fluency.py.
    init: str = "random"  # "random" tokens (the paper), or "sample": text sampled from the model itself
    restart_patience: int = 0  # also restart after this many iterations in which no member improved (0: off)
    lm_share: float = 0.0  # share of children whose new token is sampled from the model's next-token distribution

    def penalties(self) -> np.ndarray:
        return log_penalties(self.lam_min, self.lam_max, self.population)

    def method_checks(self) -> Iterator[Check]:
        yield self.fixed_length_check("EPO")
        yield self.population >= 1, f"population must be at least 1 member, got {self.population}"
        yield self.topk >= 1, f"topk must be at least 1, got {self.topk}"
        yield self.restart_every >= 0, f"restart_every must be >= 0 (0 disables restarts), got {self.restart_every}"
        yield (
            self.lam_min > 0 and self.lam_max > 0,
            f"penalties must be positive (they are log-spaced), got lam_min={self.lam_min}, lam_max={self.lam_max}",
        )
        yield self.lam_max >= self.lam_min, f"lam_max ({self.lam_max}) must be >= lam_min ({self.lam_min})"
        yield self.init in ("random", "sample"), f"init must be 'random' or 'sample', got {self.init!r}"
        yield self.restart_patience >= 0, f"restart_patience must be >= 0 (0: off), got {self.restart_patience}"
        yield 0.0 <= self.lm_share <= 1.0, f"lm_share must be between 0 and 1, got {self.lm_share}"


# ADAPT's share of the budget for a self-scan when no starts are given (ADAPTConfig.self_scan=None). Chosen by
# benchmarks/fluency.py (README, "How well it works"): at 40,000 token-forwards, from a self-scan of 0.35 of
# the budget ADAPT beat the held-out dataset max at its median fluency on 10 of 16 runs, from its beam search
# on 7; 0.35 was the best of 0.15 / 0.35 / 0.5 on the tuning proxy (benchmarks/results/tuning.md).
SELF_SCAN_SHARE = 0.35


@dataclass(frozen=True, kw_only=True)
class ADAPTConfig(DreamConfig):
    """ADAPT's knobs. The paper publishes no hyperparameters: these are ours. The penalties were chosen
    on four tuning neurons disjoint from the benchmark's targets (0.3..3 and 0.01..0.3 did worse than
    0.03..1). The mutation sizes were re-chosen on 2026-11-30 on two of those tuning neurons, once the
    one-hot gradient was exact (40,000 token-forwards, length 12): the earlier greedy mutation (16
    children, top-8..256 at temperature 0.5..4, up to 3 positions) stopped improving after about 10,000
    token-forwards; 32 children of one swap each from a wide, nearly uniform top-128..512 kept rising
    with the budget and ended better at every fluency limit.

    In ADAPT, `children` and `iters` are those of the mutation phase; `init_text` (or `init_ids`)
    skips the beam search (every member starts from it); `max_token_forwards` includes the beam search.
    With `min_length` / `max_length`, the beam search (or the starts) give prompts of `length` tokens and
    the `shift_share` of children change the length by one within the range."""

    beams: int = 4  # B: partial prompts kept by the beam search, then the members of the mutation phase
    lam_min: float = 0.03  # penalties of the B slots, log-spaced from lam_min to lam_max, in spreads of
    lam_max: float = 1.0  # the activation per nat of xe (see the module docstring of optim.adapt)
    beam_lm: int = 8  # proposals per beam and step from the model's next-token distribution
    beam_grad: int = 8  # proposals per beam and step from the gradient's top-k
    beam_share: float = 0.5  # with a token budget, the beam search gets at most this share of it
    max_positions: int = 1  # strength 0 changes 1 position per child, strength 1 this many
    topk_min: int = 128  # proposal width at strength 0 ...
    topk_max: int = 512  # ... and at strength 1 (log-interpolated)
    temp_min: float = 8.0  # sampling temperature over the proposals at strength 0 ...
    temp_max: float = 8.0  # ... and at strength 1 (in units of the proposals' score spread)
    patience: int = 2  # iterations without improvement before the strength rises
    step: float = 0.25  # how much the strength (0..1) rises on stagnation or falls on improvement
    # Moves beyond the gradient (optim.moves), as shares of each member's children; chosen on the tuning
    # proxy (benchmarks/tuning.py, results/tuning.json): together they gave the best fluent activation.
    lm_share: float = 0.25  # one position swapped for a token sampled from the model's distribution
    shift_share: float = 0.25  # an insertion or a deletion (the span shifts by one token)
    lineage: bool = False  # each member keeps the best of itself and its own children (not of all children)
    restart_patience: int = 0  # a member this many iterations without improvement restarts from an unused
    # candidate start (init_prompts), the best one under its own penalty (0: never)
    # Without starts given: this share of max_token_forwards samples text from the model and scans it
    # for the objective; its top windows are the starts, as dataset examples would be (optim.self_scan).
    # None: SELF_SCAN_SHARE when a budget is set and no starts are given, else the beam search.
    self_scan: float | None = None

    def self_scan_share(self) -> float:
        """The share of the budget the self-scan takes in this run: 0 when starts are given (they win: the
        later modes of `modes=K` start from examples), else `self_scan`, or without it SELF_SCAN_SHARE
        when a budget is set (0 without one: the beam search)."""
        if self.init_prompts is not None or self.init_text is not None or self.init_ids is not None:
            return 0.0
        if self.self_scan is not None:
            return self.self_scan
        return SELF_SCAN_SHARE if self.max_token_forwards is not None else 0.0

    def start_kind(self) -> str:
        """As `DreamConfig.start_kind`, or "self-scan" when the run starts from one."""
        return "self-scan" if self.self_scan_share() else super().start_kind()

    def penalties(self) -> np.ndarray:
        return log_penalties(self.lam_min, self.lam_max, self.beams)

    def method_checks(self) -> Iterator[Check]:
        yield self.beams >= 1, f"beams must be at least 1, got {self.beams}"
        yield (
            self.lam_min > 0 and self.lam_max >= self.lam_min,
            f"need 0 < lam_min <= lam_max, got lam_min={self.lam_min}, lam_max={self.lam_max}",
        )
        yield (
            self.beam_lm >= 1,
            f"beam_lm must be at least 1 (the model's proposals keep the start fluent), got {self.beam_lm}",
        )
        yield self.beam_grad >= 0, f"beam_grad must be >= 0, got {self.beam_grad}"
        yield 0 < self.beam_share <= 1, f"beam_share must be in (0, 1], got {self.beam_share}"
        yield self.max_positions >= 1, f"max_positions must be at least 1, got {self.max_positions}"
        yield (
            1 <= self.topk_min <= self.topk_max,
            f"need 1 <= topk_min <= topk_max, got {self.topk_min}, {self.topk_max}",
        )
        yield (
            0 < self.temp_min <= self.temp_max,
            f"need 0 < temp_min <= temp_max, got {self.temp_min}, {self.temp_max}",
        )
        yield self.patience >= 1, f"patience must be at least 1 iteration, got {self.patience}"
        yield 0 < self.step <= 1, f"step must be in (0, 1], got {self.step}"
        yield (
            self.lm_share >= 0 and self.shift_share >= 0 and self.lm_share + self.shift_share <= 1,
            f"lm_share and shift_share must be >= 0 with a sum <= 1, got {self.lm_share} and {self.shift_share}",
        )
        yield self.restart_patience >= 0, f"restart_patience must be >= 0 (0: never), got {self.restart_patience}"
        share = self.self_scan
        yield share is None or 0 <= share < 1, f"self_scan is a share of the budget in [0, 1), got {share}"
        yield (
            not share or self.max_token_forwards is not None,
            "self_scan spends a share of the token budget; set max_token_forwards (e.g. 40_000), or self_scan=0",
        )


@dataclass(frozen=True, kw_only=True)
class GCGConfig(DreamConfig):
    """GCG's knobs; sizes are the GCG paper's (512 candidates per step from the top-256 tokens).

    GCG maximizes `f - lam * xe` with one fixed `lam`; the original attack had no fluency term:
    a tiny `lam` (1e-6) comes close. `lam` must be positive. Its checkpoints are EPO's (method
    "epo"); `gcg(resume=)` reads them."""

    lam: float = 1.0
    children: int = 512  # candidates per step, each one token swapped
    topk: int = 256
    iters: int = 500

    def method_checks(self) -> Iterator[Check]:
        yield self.fixed_length_check("GCG")
        yield (
            self.lam > 0,
            f"lam must be positive, got {self.lam}; for GCG without fluency use a tiny lam such as 1e-6",
        )
        yield self.topk >= 1, f"topk must be at least 1, got {self.topk}"

    def to_epo(self) -> EPOConfig:
        """The EPO configuration this GCG is: one member with penalty lam, never restarted."""
        keep = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "lam"}
        return EPOConfig(**keep, population=1, lam_min=self.lam, lam_max=self.lam, restart_every=0)

    @staticmethod
    def epo_dict(config: dict[str, Any]) -> dict[str, Any]:
        """The EPO config dict of a saved GCG config dict (fields it lacks take EPO's defaults)."""
        d = {k: v for k, v in config.items() if k != "lam"}
        lam = config.get("lam")
        return {**EPOConfig().to_dict(), **d, "population": 1, "lam_min": lam, "lam_max": lam, "restart_every": 0}


# Each method's config, by the method's name (`optim.methods.METHODS` pairs them with their optimizers).
CONFIGS: dict[str, type[DreamConfig]] = {"adapt": ADAPTConfig, "epo": EPOConfig, "gcg": GCGConfig}


def method_name(config: DreamConfig) -> str:
    """The method a config is of ("adapt", "epo", "gcg")."""
    for name, cls in CONFIGS.items():
        if type(config) is cls:
            return name
    names = ", ".join(c.__name__ for c in CONFIGS.values())
    raise DreamError(f"a {type(config).__name__} is no method's config; pass one of {names}")
