"""The optimizers' knobs as command-line flags, generated from the config dataclasses' fields (`--field-name`
for `field_name`), with each method's own default in the help, so a new field gets a flag by itself.

A flag's value is None unless given: the method's config keeps its default (`knob_options`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Iterable
from typing import Any

from ..errors import DreamError
from ..optim.config import CONFIGS, DreamConfig

# What each knob does, for its help line (the defaults are appended from the configs). A config field that
# is neither here nor in SKIPPED fails `tests/test_cli_knobs.py`.
HELP: dict[str, str] = {
    # every method
    "length": "optimized tokens (with a length range: the starting length)",
    "min_length": "adapt: deletions may shrink the prompt to this many tokens (default: --length; epo, gcg: fixed)",
    "max_length": "adapt: insertions may grow the prompt to this many tokens (default: --length; epo, gcg: fixed)",
    "children": "children per member per iteration (adapt: of the mutation phase; gcg: candidates per step)",
    "iters": "iterations at most (the budget usually ends a dream first)",
    "seed": "random seed",
    "init_text": "start every member from this text (exactly --length tokens; default: random tokens)",
    "prefix": "fixed text before the dream",
    "suffix": "fixed text after the dream",
    "ascii_only": "ban tokens with non-ASCII characters",
    "ban_whitespace_only": "ban tokens that are only whitespace",
    "batch_size": "prompts per forward pass when scoring children",
    "max_batch_tokens": "tokens per forward pass (default: estimated from free memory)",
    "reuse_prefix": "score children from their first changed position, on the parent's KV cache",
    "checkpoint_every": "save to --out every N iterations (default: at the end only)",
    # EPO and GCG
    "population": "members, each with its own fluency penalty",
    "topk": "gradient top-k: a child's new token is drawn from the top-k tokens of the negative gradient",
    "restart_every": "restart period in iterations (0: never)",
    "init": "start from random tokens (the paper) or from text sampled from the model",
    "lam": "the one fluency penalty",
    # EPO and ADAPT
    "lam_min": "smallest fluency penalty (penalties are log-spaced)",
    "lam_max": "largest fluency penalty",
    "restart_patience": "restart a member after this many iterations without improvement (0: never)",
    "lm_share": "share of children whose new token is sampled from the model (0..1)",
    # ADAPT
    "self_scan": "without examples: share of the budget that samples text from the model and scans it for the "
                 "objective; its top windows are the starts (0: the beam search; none: 0.35 with a budget)",
    "beams": "partial prompts of the beam search, then the members of the mutation phase",
    "beam_lm": "proposals per beam and step from the model's next-token distribution",
    "beam_grad": "proposals per beam and step from the gradient's top-k",
    "beam_share": "share of the budget the beam search may take (0..1]",
    "max_positions": "positions a child changes at the highest mutation strength",
    "topk_min": "proposal width at the lowest mutation strength",
    "topk_max": "proposal width at the highest mutation strength",
    "temp_min": "sampling temperature over the proposals at the lowest strength",
    "temp_max": "sampling temperature over the proposals at the highest strength",
    "patience": "iterations without improvement before the mutation strength rises",
    "step": "how much the strength (0..1) rises on stagnation or falls on improvement",
    "shift_share": "share of children that insert or delete a token, shifting the prompt or, with a length range, "
                   "changing its length (0..1)",
    "lineage": "each member keeps the best of itself and its own children (not of all children)",
}
# Fields without a flag of their own: token-id lists (no command-line form), and what other flags set.
SKIPPED: dict[str, str] = {
    "init_ids": "token ids: use --init-text",
    "init_prompts": "token ids: use --from-examples",
    "banned_tokens": "token ids",
    "max_token_forwards": "--budget",
    "checkpoint_dir": "--out",
}
# str fields with a closed set of values
CHOICES: dict[str, tuple[str, ...]] = {"init": ("random", "sample")}
METAVARS: dict[type, str] = {int: "N", float: "X", str: "TEXT"}
SWEEP_SKIPPED = ("checkpoint_every",)  # config fields a sweep sets itself: no flag (its store is its checkpoint)


def config_classes() -> dict[str, type]:
    """Each method's config class, by method name (`optim.config.CONFIGS`: no torch to import for --help)."""
    return dict(CONFIGS)


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


_integer.__name__, _number.__name__ = "integer", "number"  # what argparse names in its own messages


def _base_type(hint: Any) -> type:
    """int, float, str or bool of a field's type (`X | None` is X); TypeError for anything else."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return _base_type(args[0])
    if hint in (int, float, str, bool):
        return hint
    raise TypeError(f"no command-line form for the type {hint!r}")


@dataclasses.dataclass(frozen=True, eq=False)
class Knob:
    """One config field as a flag: its type and each method's default (methods without it are absent)."""

    name: str
    kind: type
    defaults: dict[str, Any]

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def shared(self, methods: Iterable[str]) -> bool:
        return set(self.defaults) == set(methods)

    def help(self) -> str:
        values = {_shown(v) for v in self.defaults.values()}
        if values == {"none"}:  # the help says what no value means
            return HELP[self.name].replace("%", "%%")
        if len(values) == 1 and len(self.defaults) == len(config_classes()):
            where = f"default {values.pop()}"
        else:
            where = "default: " + ", ".join(f"{m} {_shown(v)}" for m, v in self.defaults.items())
        return f"{HELP[self.name]} ({where})".replace("%", "%%")


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, str):
        return repr(value) if value == "" else value
    return f"{value:g}" if isinstance(value, float) else str(value)


def knobs(skip: Iterable[str] = ()) -> list[Knob]:
    """Every config field with a flag (but those in `skip`), in the order of the fields: the shared ones
    first (`DreamConfig`'s), then each method's own."""
    classes = config_classes()
    skip = set(skip) | set(SKIPPED)
    found: dict[str, Knob] = {}
    for method, cls in classes.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in skip:
                continue
            if f.name not in found:
                found[f.name] = Knob(f.name, _base_type(hints[f.name]), {})
            found[f.name].defaults[method] = f.default
    order = [f.name for f in dataclasses.fields(DreamConfig)]  # the shared fields first
    return sorted(found.values(), key=lambda k: (k.name not in order, order.index(k.name) if k.name in order else 0))


def add_knob_flags(parser: argparse.ArgumentParser, skip: Iterable[str] = ()) -> list[Knob]:
    """Add a flag for every knob: those of every method in one group, the others in one group of method
    options, each help line naming the methods that have it and their defaults."""
    methods = list(config_classes())
    every = parser.add_argument_group("options of every method")
    own = parser.add_argument_group("options of some methods (passing one to another method is an error)")
    added = knobs(skip)
    for k in added:
        group = every if k.shared(methods) else own
        if k.kind is bool:
            group.add_argument(k.flag, action=argparse.BooleanOptionalAction, default=None, help=k.help())
        elif k.name in CHOICES:
            group.add_argument(k.flag, choices=CHOICES[k.name], default=None, help=k.help())
        else:
            parse = {int: _integer, float: _number, str: str}[k.kind]
            group.add_argument(k.flag, type=parse, default=None, metavar=METAVARS[k.kind], help=k.help())
    return added


def knob_options(args: argparse.Namespace, method: str, skip: Iterable[str] = ()) -> dict[str, Any]:
    """The knobs given on the command line, by field name, for `method`'s config; a knob `method` lacks is a
    `DreamError` naming its flag and the methods that have it."""
    given = [(k, getattr(args, k.name)) for k in knobs(skip) if getattr(args, k.name, None) is not None]
    for k, _ in given:
        if method not in k.defaults:
            others = ", ".join(k.defaults)
            raise DreamError(f"{k.flag} is not an option of {method} (it is one of {others}); pass --method "
                             f"{next(iter(k.defaults))}, or drop {k.flag}")
    return {k.name: v for k, v in given}
