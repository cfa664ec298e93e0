"""Objectives: what a dream maximizes. One protocol for neurons, SAE latents, directions and logits.

An objective reads activations captured at TransformerLens hook points (or the logits) and returns one
scalar per prompt, shape `[batch]`. `run_objectives` is the single forward pass every caller shares.
"""

from __future__ import annotations

import ast
import difflib
import functools
import json
import math
import numbers
import operator
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .errors import DreamlensError

Reduce = str | int  # "last" | "max" | "mean" | a position index within the prompt


class ObjectiveError(DreamlensError, ValueError):
    """An objective does not fit the model, or its specification is malformed."""


class NonFiniteError(DreamlensError, FloatingPointError):
    """The model produced NaN or infinite values for an objective."""


# ---------------------------------------------------------------------------------------------
# What one forward pass hands to objectives


@dataclass
class Capture:
    """Activations of one forward pass: `acts[hook]` as the hook saw it (`[batch, pos, ...]`, or
    `[batch, head, query, key]` for attention patterns); `logits` `[batch, 1, vocab]` at the final
    position when an objective needs them. `start` is the first position that belongs to the prompt
    (positions before it, such as the start token, are never reduced over)."""

    acts: dict[str, Tensor]
    logits: Tensor | None
    start: int = 0
    memo: dict[Any, Any] = field(default_factory=dict)
    model: Any = None


def _reduce(x: Float[Tensor, "batch pos"], how: Reduce, start: int) -> Float[Tensor, " batch"]:
    if how == "last":
        return x[:, -1]
    if how == "max":
        return x[:, start:].max(dim=1).values
    if how == "mean":
        return x[:, start:].mean(dim=1)
    pos = int(how)
    return x[:, start + pos] if pos >= 0 else x[:, pos]


def _check_reduce(how: Reduce) -> Reduce:
    if isinstance(how, str) and how in ("last", "max", "mean"):
        return how
    if isinstance(how, numbers.Integral) and not isinstance(how, bool):
        return int(how)
    raise ObjectiveError(f"reduce must be 'last', 'max', 'mean' or an integer position, got {how!r}")


def _check_position(how: Reduce, n_pos: int, start: int, what: str) -> None:
    """A fixed position must fall inside the prompt (`n_pos` tokens, the first `start` not part of it)."""
    if not isinstance(how, int):
        return
    n = n_pos - start
    if not -n <= how < n:
        raise ObjectiveError(
            f"position {how} of {what} is outside the prompt of {n} token(s): use 0..{n - 1} (counted "
            f"after the start token) or -{n}..-1 (from the end)"
        )


def _reduce_suffix(how: Reduce) -> str:
    return "" if how == "last" else f"@{how}"


def _as_index(i: Any, what: str) -> int:
    if isinstance(i, bool):
        raise ObjectiveError(f"{what} must be an integer, got {i!r}")
    try:
        return operator.index(i)
    except TypeError:
        raise ObjectiveError(f"{what} must be an integer, got {i!r}") from None


# ---------------------------------------------------------------------------------------------
# Hook points: names, shapes and where their position axis is


def _layer_of(hook: str) -> int | None:
    """Block index a hook lives in; -1 for embedding hooks; None for hooks after the last block."""
    m = re.match(r"blocks\.(\d+)\.", hook)
    if m:
        return int(m.group(1))
    if hook in ("hook_embed", "hook_pos_embed", "hook_tokens"):
        return -1
    return None


def _check_hook(model: Any, hook: str, whose: str = "") -> None:
    if not isinstance(hook, str) or hook not in model.hook_dict:
        close = difflib.get_close_matches(str(hook), list(model.hook_dict), n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ObjectiveError(f"unknown hook {hook!r}{whose}{hint} (model.hook_dict lists all hook names)")


@dataclass(frozen=True)
class _HookInfo:
    shape: tuple[int, ...]  # full activation shape for one 2-token prompt
    varying: tuple[int, ...]  # the axes whose size follows the prompt length

    @property
    def kind(self) -> str:
        if self.varying == (1,):
            return "positional"  # [batch, pos, ...]
        if self.varying == (2, 3) and len(self.shape) == 4:
            return "pattern"  # [batch, head, query, key]
        return "other"

    def describe(self) -> str:
        if self.kind == "pattern":
            return "[batch, head, query, key]"
        return f"shaped {list(self.shape)} for a 2-token prompt"


# Hooks TransformerLens computes only when switched on.
_SWITCHES = {
    "attn.hook_result": "set_use_attn_result",
    "hook_attn_in": "set_use_attn_in",
    "hook_q_input": "set_use_split_qkv_input",
    "hook_k_input": "set_use_split_qkv_input",
    "hook_v_input": "set_use_split_qkv_input",
    "hook_mlp_in": "set_use_hook_mlp_in",
}


def _hook_info(model: Any, hooks: Sequence[str]) -> dict[str, _HookInfo]:
    """Shapes and position axes of `hooks`, found by probing 1- and 2-token prompts (memoized on the
    model). The probe tells which axes grow with the prompt: attention patterns have two such axes
    (query and key) and none at axis 1, so they cannot be read as one activation per position."""
    for h in hooks:
        _check_hook(model, h)
    memo = model.__dict__.setdefault("_dreamlens_hook_info", {})
    todo = [h for h in dict.fromkeys(hooks) if h not in memo]
    if todo:
        stop = _stop_for_hooks(todo)
        seen: dict[int, dict[str, tuple[int, ...]]] = {1: {}, 2: {}}
        for n in (1, 2):

            def grab(act: Tensor, hook: Any, n: int = n) -> None:
                seen[n][hook.name] = tuple(act.shape)

            with torch.no_grad():
                tokens = torch.zeros((1, n), dtype=torch.long, device=model.cfg.device)
                model.run_with_hooks(tokens, fwd_hooks=[(h, grab) for h in todo], stop_at_layer=stop)
        for h in todo:
            if h not in seen[2] or h not in seen[1]:
                switch = next((s for suffix, s in _SWITCHES.items() if h.endswith(suffix)), None)
                fix = f"turn it on with model.{switch}(True)" if switch else "pick another hook from model.hook_dict"
                raise ObjectiveError(
                    f"hook {h!r} did not fire in a forward pass (it is off in this model's config); {fix}"
                )
            a, b = seen[1][h], seen[2][h]
            varying = tuple(i for i, (x, y) in enumerate(zip(a, b)) if x != y) if len(a) == len(b) else ()
            memo[h] = _HookInfo(shape=b, varying=varying)
    return {h: memo[h] for h in hooks}


def hook_shape(model: Any, hook: str) -> tuple[int, ...]:
    """Shape of one position's activation at `hook` (e.g. `(d_mlp,)` or `(n_heads, d_head)`)."""
    info = _hook_info(model, [hook])[hook]
    if info.kind == "pattern":
        raise ObjectiveError(
            f"{hook} is {info.describe()} (attention from every query position to every key position), "
            f"not one activation per position; address one entry as {hook}[head,query,key]"
        )
    if info.kind == "other":
        raise ObjectiveError(f"{hook} ({info.describe()}) has no position axis at axis 1; it cannot be an objective")
    return info.shape[2:]


def _stop_for_hooks(hooks: Sequence[str]) -> int | None:
    layers = [_layer_of(h) for h in hooks]
    if not layers or any(layer is None for layer in layers):
        return None
    return max(layers) + 1  # type: ignore[type-var]  # hook_embed alone: 0, the embedding only


# ---------------------------------------------------------------------------------------------
# The protocol


class Objective:
    """Base of all objectives. Subclasses define `hooks`, `validate`, `value` and `__str__`.

    Objectives combine linearly: `a + b`, `a - 0.5 * b`, `2 * a`, `-a`, `a / 2`, `sum([a, b])`.
    """

    needs_logits: bool = False

    @property
    def hooks(self) -> tuple[str, ...]:
        return ()

    def validate(self, model: Any) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def value(self, capture: Capture) -> Float[Tensor, " batch"]:  # pragma: no cover - overridden
        raise NotImplementedError

    def _check_positions(self, model: Any, n_pos: int, start: int) -> None:
        """Fixed positions against the actual prompt length (known only once tokens are given)."""
        _check_position(getattr(self, "reduce", "last"), n_pos, start, str(self))

    def stop_at_layer(self, model: Any) -> int | None:
        """The `stop_at_layer` a forward pass needs to compute this objective (None: the whole model)."""
        return stop_at_layer(model, [self])

    def evaluate(
        self, model: Any, tokens: Int[Tensor, "batch pos"], *, start: int | None = None
    ) -> Float[Tensor, " batch"]:
        """The objective for each row of `tokens`, without gradients, stopping the forward early."""
        with torch.no_grad():
            values, _ = run_objectives(model, [self], tokens, start=start)
        return values[0]

    # linear combinations ---------------------------------------------------------------------
    def _terms(self) -> list[tuple[float, Objective]]:
        return [(1.0, self)]

    def __add__(self, other: Objective) -> Objective:
        if not isinstance(other, Objective):
            return NotImplemented
        return Combination(self._terms() + other._terms())

    def __radd__(self, other: Any) -> Objective:
        if isinstance(other, numbers.Number) and other == 0:  # so that sum([a, b]) works
            return self
        return NotImplemented

    def __sub__(self, other: Objective) -> Objective:
        if not isinstance(other, Objective):
            return NotImplemented
        return Combination(self._terms() + [(-c, o) for c, o in other._terms()])

    def __mul__(self, k: float) -> Objective:
        if not isinstance(k, numbers.Real) or isinstance(k, bool):
            return NotImplemented
        return Combination([(float(k) * c, o) for c, o in self._terms()])

    __rmul__ = __mul__

    def __truediv__(self, k: float) -> Objective:
        if not isinstance(k, numbers.Real) or isinstance(k, bool):
            return NotImplemented
        if k == 0:
            raise ObjectiveError("cannot divide an objective by 0")
        return self * (1.0 / float(k))

    def __neg__(self) -> Objective:
        return self * -1.0

    def __repr__(self) -> str:
        return f"objective({str(self)!r})"


@dataclass(frozen=True, eq=False, repr=False)
class Neuron(Objective):
    """One unit at any hook point: an index into the last axis, or a tuple for hooks with a head axis
    (`Neuron("blocks.3.attn.hook_z", (4, 10))` is head 4, dimension 10).

    Attention patterns and scores (`[batch, head, query, key]`) have no single position axis: index
    them with (head, query, key), sequence positions counted from 0 (the start token, if any) or from
    the end (-1); they take no position reduction."""

    hook: str
    index: int | tuple[int, ...]
    reduce: Reduce = "last"

    def __post_init__(self) -> None:
        object.__setattr__(self, "reduce", _check_reduce(self.reduce))
        if isinstance(self.index, (tuple, list)):
            if not self.index:
                raise ObjectiveError(f"neuron index of {self.hook} is empty; give one integer per axis")
            idx = tuple(_as_index(i, f"neuron index of {self.hook}") for i in self.index)
            object.__setattr__(self, "index", idx[0] if len(idx) == 1 else idx)
        else:
            object.__setattr__(self, "index", _as_index(self.index, f"neuron index of {self.hook}"))

    @property
    def hooks(self) -> tuple[str, ...]:
        return (self.hook,)

    @property
    def _index(self) -> tuple[int, ...]:
        return self.index if isinstance(self.index, tuple) else (self.index,)

    def validate(self, model: Any) -> None:
        info = _hook_info(model, [self.hook])[self.hook]
        idx = self._index
        if info.kind == "pattern":
            self._validate_pattern(model, info)
            return
        shape = hook_shape(model, self.hook)
        if len(idx) != len(shape):
            example = ",".join(["0"] * (len(shape) - 1) + [str(idx[-1])])
            raise ObjectiveError(
                f"{self.hook} has per-position shape {list(shape)}, so its index needs {len(shape)} "
                f"number(s), got {list(idx)}; e.g. {self.hook}[{example}]"
            )
        for axis, (i, n) in enumerate(zip(idx, shape)):
            if not 0 <= i < n:
                raise ObjectiveError(
                    f"index {i} is out of range for axis {axis} of {self.hook} (size {n}): use 0..{n - 1}"
                )

    def _validate_pattern(self, model: Any, info: _HookInfo) -> None:
        idx = self._index
        n_heads, n_ctx = info.shape[1], model.cfg.n_ctx
        if len(idx) != 3:
            raise ObjectiveError(
                f"{self.hook} is {info.describe()}: index it with three numbers, head, query position and "
                f"key position (e.g. {self.hook}[0,-1,0]: head 0, from the last token to the first), "
                f"got {list(idx)}"
            )
        if not 0 <= idx[0] < n_heads:
            raise ObjectiveError(
                f"head {idx[0]} is out of range for {self.hook} ({n_heads} heads): use 0..{n_heads - 1}"
            )
        for name, p in (("query", idx[1]), ("key", idx[2])):
            if not -n_ctx <= p < n_ctx:
                raise ObjectiveError(
                    f"{name} position {p} of {self.hook} is beyond the model's context of {n_ctx} tokens"
                )
        if self.reduce != "last":
            raise ObjectiveError(
                f"{self.hook} is {info.describe()}: it has no single position axis, so it cannot be "
                f"reduced with {self.reduce!r}; pick the query and key positions in the index instead, "
                f"e.g. {self.hook}[{idx[0]},-1,0]"
            )

    def _check_positions(self, model: Any, n_pos: int, start: int) -> None:
        idx = self._index
        if _hook_info(model, [self.hook])[self.hook].kind == "pattern":
            for name, p in (("query", idx[1]), ("key", idx[2])):
                if not -n_pos <= p < n_pos:
                    raise ObjectiveError(
                        f"{name} position {p} of {self} is outside the sequence of {n_pos} tokens: use "
                        f"0..{n_pos - 1} (0 is the start token, if any) or -{n_pos}..-1"
                    )
            return
        super()._check_positions(model, n_pos, start)

    def value(self, capture: Capture) -> Float[Tensor, " batch"]:
        act = capture.acts[self.hook]
        idx = self._index
        if act.ndim == len(idx) + 1:  # [batch, head, query, key]: the index names every axis
            return act[(slice(None), *idx)]
        return _reduce(act[(slice(None), slice(None), *idx)], self.reduce, capture.start)

    def __str__(self) -> str:
        return f"{self.hook}[{','.join(map(str, self._index))}]{_reduce_suffix(self.reduce)}"


def _sae_hook(sae: Any) -> str | None:
    meta = getattr(sae.cfg, "metadata", None)
    hook = getattr(meta, "hook_name", None) if meta is not None else None
    return hook or getattr(sae.cfg, "hook_name", None)


@dataclass(frozen=True, eq=False, repr=False)
class SAELatent(Objective):
    """One latent of a sae-lens SAE (any architecture), read at the SAE's own hook
    (`sae.cfg.metadata.hook_name`). `pre_activation=True` uses the encoder's pre-activation (the
    value at the SAE's `hook_sae_acts_pre`), whose gradient is not zero below a ReLU/JumpReLU/TopK cut."""

    sae: Any
    index: int
    pre_activation: bool = False
    reduce: Reduce = "last"
    source: str | None = None  # how to load the SAE again, for the string form

    def __post_init__(self) -> None:
        object.__setattr__(self, "reduce", _check_reduce(self.reduce))
        object.__setattr__(self, "index", _as_index(self.index, "SAE latent index"))
        cfg = getattr(self.sae, "cfg", None)
        if cfg is None or not hasattr(cfg, "d_in") or not hasattr(cfg, "d_sae") or not hasattr(self.sae, "encode"):
            raise ObjectiveError(
                f"expected a sae-lens SAE (with .cfg.d_in, .cfg.d_sae and .encode), got {type(self.sae).__name__}"
            )

    @property
    def hook(self) -> str:
        return _sae_hook(self.sae) or ""

    @property
    def hooks(self) -> tuple[str, ...]:
        return (self.hook,)

    def validate(self, model: Any) -> None:
        hook = self.hook
        if not hook:
            raise ObjectiveError(
                "the SAE's cfg.metadata.hook_name is empty, so it does not say where it reads the model; "
                "set it, e.g. sae.cfg.metadata.hook_name = 'blocks.6.hook_resid_post'"
            )
        _check_hook(model, hook, whose=" (the SAE's cfg.metadata.hook_name)")
        info = _hook_info(model, [hook])[hook]
        if info.kind != "positional":
            raise ObjectiveError(
                f"the SAE reads {hook}, which is {info.describe()}, not one vector per position; "
                "an SAE needs a hook such as blocks.N.hook_resid_post or blocks.N.attn.hook_z"
            )
        shape = info.shape[2:]
        d_in, width = self.sae.cfg.d_in, math.prod(shape)
        if width != d_in:
            raise ObjectiveError(
                f"the SAE reads {d_in} values per position at {hook}, but this model has {width} there "
                f"(shape {list(shape)}): an SAE for another model, or for another hook?"
            )
        d_sae = self.sae.cfg.d_sae
        if not 0 <= self.index < d_sae:
            raise ObjectiveError(
                f"SAE latent {self.index} is out of range: this SAE has {d_sae} latents (0..{d_sae - 1})"
            )

    def _encode(self, capture: Capture) -> tuple[Tensor | None, Tensor]:
        key = ("sae", id(self.sae))
        if key not in capture.memo:
            act = capture.acts[self.hook]
            w = next(self.sae.parameters(), None)
            device = w.device if w is not None else act.device
            # hook_z SAEs either flatten the heads themselves or expect us to.
            x = act if getattr(self.sae, "hook_z_reshaping_mode", False) or act.ndim == 3 else act.flatten(2)
            # Read the pre-activation from the SAE's own hook point, so every architecture works.
            got: dict[str, Tensor] = {}
            pre_hook = getattr(self.sae, "hook_sae_acts_pre", None)
            handle = (
                pre_hook.register_forward_hook(lambda m, i, o: got.__setitem__("pre", o))
                if isinstance(pre_hook, torch.nn.Module)
                else None
            )
            try:
                post = self.sae.encode(x.to(device=device, dtype=self.sae.dtype))
            finally:
                if handle is not None:
                    handle.remove()
            pre = got.get("pre")
            capture.memo[key] = (None if pre is None else pre.to(act.device), post.to(act.device))
        return capture.memo[key]

    def value(self, capture: Capture) -> Float[Tensor, " batch"]:
        pre, post = self._encode(capture)
        if self.pre_activation and pre is None:
            raise ObjectiveError(
                f"this {type(self.sae).__name__} does not pass through hook_sae_acts_pre, so its "
                "pre-activation is unknown; use the latent itself (pre_activation=False)"
            )
        x = (pre if self.pre_activation else post)[..., self.index]
        return _reduce(x, self.reduce, capture.start)

    def __str__(self) -> str:
        kind = "sae_pre" if self.pre_activation else "sae"
        return f"{kind}:{self.source or '<in-memory>'}[{self.index}]{_reduce_suffix(self.reduce)}"


@dataclass(frozen=True, eq=False, repr=False)
class Direction(Objective):
    """Dot product of the activation at `hook` with `vector` (not normalized). For hooks with a head
    axis (`hook_z`) the vector spans all heads, flattened: `n_heads * d_head` entries."""

    hook: str
    vector: Tensor
    reduce: Reduce = "last"
    source: str | None = None  # file the vector came from, for the string form

    def __post_init__(self) -> None:
        object.__setattr__(self, "reduce", _check_reduce(self.reduce))
        v = torch.as_tensor(self.vector).detach()
        if not v.is_floating_point():
            v = v.float()
        if v.ndim != 1:
            raise ObjectiveError(f"a direction must be a 1-D vector, got shape {list(v.shape)}; flatten it")
        if not torch.isfinite(v).all():
            n_bad = int((~torch.isfinite(v)).sum())
            raise ObjectiveError(
                f"the direction for {self.hook} has {n_bad} NaN or infinite entries; every entry must be a "
                "finite number"
            )
        if v.numel() == 0 or v.abs().max() == 0:
            raise ObjectiveError(
                f"the direction for {self.hook} is all zeros (length {v.numel()}): it would give a constant "
                "objective; pass a vector with at least one non-zero entry"
            )
        object.__setattr__(self, "vector", v)

    @property
    def hooks(self) -> tuple[str, ...]:
        return (self.hook,)

    def validate(self, model: Any) -> None:
        info = _hook_info(model, [self.hook])[self.hook]
        if info.kind != "positional":
            raise ObjectiveError(
                f"{self.hook} is {info.describe()}, not one vector per position; a direction needs a hook "
                "such as blocks.N.hook_resid_post"
            )
        shape = info.shape[2:]
        if math.prod(shape) != self.vector.numel():
            raise ObjectiveError(
                f"the direction has {self.vector.numel()} entries but {self.hook} has {math.prod(shape)} per "
                f"position (shape {list(shape)}); give a vector of length {math.prod(shape)}"
            )

    def value(self, capture: Capture) -> Float[Tensor, " batch"]:
        act = capture.acts[self.hook]
        if act.ndim > 3:
            act = act.flatten(2)
        return _reduce(act @ self.vector.to(act.device, act.dtype), self.reduce, capture.start)

    def __str__(self) -> str:
        return f"dir:{self.hook}:{self.source or '<in-memory>'}{_reduce_suffix(self.reduce)}"


def _token_id(model: Any, token: str | int) -> int:
    from .models import encode

    if not isinstance(token, str):
        token = _as_index(token, "a logit token (a string or a token id)")
        if not 0 <= token < model.cfg.d_vocab:
            raise ObjectiveError(f"token id {token} is outside the vocabulary (0..{model.cfg.d_vocab - 1})")
        return token
    ids = encode(model, token)
    if len(ids) != 1:
        pieces = [model.tokenizer.decode([i]) for i in ids]
        raise ObjectiveError(
            f"{token!r} is {len(ids)} tokens {pieces}, not one; a logit objective needs a single token "
            "(a token id, or a string such as ' Paris' with its leading space)"
        )
    return ids[0]


def _check_token(token: Any) -> str | int:
    return token if isinstance(token, str) else _as_index(token, "a logit token (a string or a token id)")


def _token_repr(token: str | int) -> str:
    return str(token) if isinstance(token, int) else json.dumps(token)


def _cached_token_id(capture: Capture, token: str | int) -> int:
    key = ("token", token)
    if key not in capture.memo:
        capture.memo[key] = _token_id(capture.model, token)
    return capture.memo[key]


@dataclass(frozen=True, eq=False, repr=False)
class Logit(Objective):
    """The logit of one next token at the final position."""

    token: str | int
    needs_logits = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "token", _check_token(self.token))

    def validate(self, model: Any) -> None:
        _token_id(model, self.token)

    def value(self, capture: Capture) -> Float[Tensor, " batch"]:
        return capture.logits[:, -1, _cached_token_id(capture, self.token)]

    def __str__(self) -> str:
        return f"logit[{_token_repr(self.token)}]"


@dataclass(frozen=True, eq=False, repr=False)
class LogitDiff(Objective):
    """logit(token_a) - logit(token_b) at the final position."""

    token_a: str | int
    token_b: str | int
    needs_logits = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "token_a", _check_token(self.token_a))
        object.__setattr__(self, "token_b", _check_token(self.token_b))

    def validate(self, model: Any) -> None:
        a, b = _token_id(model, self.token_a), _token_id(model, self.token_b)
        if a == b:
            raise ObjectiveError(
                f"{self.token_a!r} and {self.token_b!r} are the same token (id {a}): their logit difference is always 0"
            )

    def value(self, capture: Capture) -> Float[Tensor, " batch"]:
        last = capture.logits[:, -1]
        return last[:, _cached_token_id(capture, self.token_a)] - last[:, _cached_token_id(capture, self.token_b)]

    def __str__(self) -> str:
        return f"logitdiff[{_token_repr(self.token_a)},{_token_repr(self.token_b)}]"


def _format_coef(c: float) -> str:
    short = f"{c:g}"
    return short if float(short) == c else repr(c)


@dataclass(frozen=True, eq=False, repr=False)
class Combination(Objective):
    """A weighted sum of objectives, e.g. "activate A but not B": `a - 0.5 * b`."""

    terms: list[tuple[float, Objective]]

    def __post_init__(self) -> None:
        flat: list[tuple[float, Objective]] = []
        for term in self.terms:
            if not (isinstance(term, tuple) and len(term) == 2 and isinstance(term[1], Objective)):
                raise ObjectiveError(f"a combination's terms are (coefficient, objective) pairs, got {term!r}")
            c, o = term
            if not isinstance(c, numbers.Real) or isinstance(c, bool) or not math.isfinite(c):
                raise ObjectiveError(f"the coefficient of {o} must be a finite number, got {c!r}")
            flat.extend((float(c) * c2, o2) for c2, o2 in o._terms())  # nested combinations flatten
        if not flat:
            raise ObjectiveError("a combination needs at least one objective")
        object.__setattr__(self, "terms", flat)

    def _terms(self) -> list[tuple[float, Objective]]:
        return list(self.terms)

    @property
    def hooks(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(h for _, o in self.terms for h in o.hooks))

    @property
    def needs_logits(self) -> bool:  # type: ignore[override]
        return any(o.needs_logits for _, o in self.terms)

    def validate(self, model: Any) -> None:
        for _, o in self.terms:
            o.validate(model)

    def _check_positions(self, model: Any, n_pos: int, start: int) -> None:
        for _, o in self.terms:
            o._check_positions(model, n_pos, start)

    def value(self, capture: Capture) -> Float[Tensor, " batch"]:
        return sum(c * o.value(capture) for c, o in self.terms)  # type: ignore[return-value]

    def __str__(self) -> str:
        out = ""
        for i, (c, o) in enumerate(self.terms):
            mag = abs(c)
            body = str(o) if mag == 1 else f"{_format_coef(mag)}*{o}"
            if i == 0:
                out = f"-{body}" if c < 0 else body
            else:
                out += f" {'-' if c < 0 else '+'} {body}"
        return out


# ---------------------------------------------------------------------------------------------
# The shared forward pass


def _leaves(objectives: Sequence[Objective]) -> list[Objective]:
    return [leaf for o in objectives for _, leaf in o._terms()]


def stop_at_layer(model: Any, objectives: Sequence[Objective]) -> int | None:
    """The earliest `stop_at_layer` that computes all `objectives` (None: run the whole model)."""
    if any(o.needs_logits for o in objectives):
        return None
    return _stop_for_hooks([h for o in objectives for h in o.hooks])


def default_start(model: Any, tokens: Int[Tensor, "batch pos"]) -> int:
    """1 when every row begins with the model's start token (it is not part of the prompt), else 0."""
    from .models import bos_token_id

    bos = bos_token_id(model)
    return int(bos is not None and tokens.shape[1] > 1 and bool((tokens[:, 0] == bos).all()))


def _check_inputs(
    model: Any, tokens: Any, embeds: Tensor | None, start: int | None, final_from: int | None
) -> Tensor:
    if not isinstance(tokens, Tensor):
        raise ObjectiveError(f"tokens must be a LongTensor [batch, pos], got {type(tokens).__name__}")
    if tokens.ndim != 2 or tokens.shape[1] == 0:
        hint = "; for one prompt use tokens[None]" if tokens.ndim == 1 else ""
        raise ObjectiveError(f"tokens must have shape [batch, pos] with pos >= 1, got {list(tokens.shape)}{hint}")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise ObjectiveError(f"tokens must be integer token ids, got dtype {tokens.dtype}")
    n_pos, V = tokens.shape[1], model.cfg.d_vocab
    if n_pos > model.cfg.n_ctx:
        raise ObjectiveError(f"prompts of {n_pos} tokens exceed the model's context of {model.cfg.n_ctx} tokens")
    if tokens.numel():
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= V:
            raise ObjectiveError(f"token id {lo if lo < 0 else hi} is outside the vocabulary (0..{V - 1})")
    if embeds is not None:
        want = [tokens.shape[0], n_pos, model.cfg.d_model]
        if list(embeds.shape) != want:
            raise ObjectiveError(f"embeds must have shape [batch, pos, d_model] = {want}, got {list(embeds.shape)}")
    if start is not None and not (isinstance(start, int) and 0 <= start < n_pos):
        raise ObjectiveError(f"start must be a position in 0..{n_pos - 1}, got {start!r}")
    if final_from is not None and not (isinstance(final_from, int) and 0 <= final_from < n_pos):
        raise ObjectiveError(f"final_from must be a position in 0..{n_pos - 1}, got {final_from!r}")
    return tokens.to(torch.long)


def _rows(mask: Tensor) -> str:
    rows = mask.nonzero().flatten().tolist()
    return f"{rows[:8]}{' ...' if len(rows) > 8 else ''} of {mask.numel()}"


def run_objectives(
    model: Any,
    objectives: Sequence[Objective],
    tokens: Int[Tensor, "batch pos"],
    *,
    embeds: Float[Tensor, "batch pos d_model"] | None = None,
    start: int | None = None,
    final_from: int | None = None,
    check_finite: bool = True,
) -> tuple[Float[Tensor, "n_objectives batch"], Float[Tensor, "batch n d_model"] | None]:
    """One forward pass computing every objective for every row.

    Everything is validated first (objectives against the model, token ids, positions), so a bad input
    fails before any compute. The pass stops after the deepest hook needed, unless `final_from` is given
    or an objective needs logits or a hook after the last block: then it runs every block and also
    returns the final normalized residual stream at positions `final_from:` (the unembedding is left to
    the caller, so full `[batch, pos, vocab]` logits are never materialized). `embeds` replaces the
    token embeddings (for gradients through one-hot inputs); `tokens` still gives the shape. Gradients
    flow when called outside `torch.no_grad()`. Values are float32 (float64 for a float64 model);
    NaN or infinite values raise `NonFiniteError` unless `check_finite=False`.
    """
    objectives = [objective(o) for o in objectives]
    tokens = _check_inputs(model, tokens, embeds, start, final_from)
    leaves = _leaves(objectives)
    hooks = list(dict.fromkeys(h for o in leaves for h in o.hooks))
    if all(h in model.hook_dict for h in hooks):
        _hook_info(model, hooks)  # one shape probe for all hooks (unknown names: validate explains)
    for o in leaves:
        o.validate(model)
    start = default_start(model, tokens) if start is None else start
    for o in leaves:
        o._check_positions(model, tokens.shape[1], start)

    acts: dict[str, Tensor] = {}

    def save(act: Tensor, hook: Any) -> None:
        acts[hook.name] = act

    fwd_hooks: list[tuple[str, Callable]] = [(h, save) for h in hooks]
    if embeds is not None:
        fwd_hooks.insert(0, ("hook_embed", lambda act, hook: embeds.to(act.dtype)))
    needs_logits = any(o.needs_logits for o in leaves)
    stop = stop_at_layer(model, leaves)
    needs_final = final_from is not None or stop is None
    normed = logits = None
    with model.hooks(fwd_hooks=fwd_hooks):
        resid = model(tokens, stop_at_layer=model.cfg.n_layers if needs_final else stop)
        if needs_final:
            # ln_final runs on every position, so its hooks see the whole prompt; it is cheap.
            normed = model.ln_final(resid) if model.cfg.normalization_type is not None else resid
            if any(h.startswith("unembed.") for h in hooks):  # asked for: full logits, hooks fire
                logits = unembed(model, normed)[:, -1:]
    if needs_logits and logits is None:
        logits = unembed(model, normed[:, -1:])
    capture = Capture(acts=acts, logits=logits, start=start, model=model)
    if objectives:
        vals = [o.value(capture) for o in objectives]
        dtype = functools.reduce(torch.promote_types, [v.dtype for v in vals], torch.float32)
        values = torch.stack([v.to(dtype) for v in vals])
    else:
        values = torch.zeros((0, tokens.shape[0]), device=tokens.device)
    final = normed[:, final_from:] if final_from is not None else None
    if check_finite:
        bad = ~torch.isfinite(values.detach())
        if bool(bad.any()):
            where = "; ".join(f"{str(o)!r} in rows {_rows(row)}" for o, row in zip(objectives, bad) if row.any())
            raise NonFiniteError(
                f"the model produced NaN or infinite values for {where}. Usually an overflow in a low-precision "
                "dtype (load the model in float32) or broken weights or inputs; nothing was passed on."
            )
        if final is not None:
            bad_rows = ~torch.isfinite(final.detach()).flatten(1).all(dim=1)
            if bool(bad_rows.any()):
                raise NonFiniteError(
                    f"the model's final residual stream (used for fluency) is NaN or infinite in rows "
                    f"{_rows(bad_rows)}; load the model in float32, or check its weights and inputs"
                )
    return values, final


def unembed(model: Any, normed: Float[Tensor, "batch n d_model"]) -> Float[Tensor, "batch n d_vocab"]:
    """Logits from the final normalized residual stream (as the model's own forward computes them)."""
    logits = model.unembed(normed)
    cap = getattr(model.cfg, "output_logits_soft_cap", -1.0)
    return cap * torch.tanh(logits / cap) if cap and cap > 0 else logits


# ---------------------------------------------------------------------------------------------
# The string form


def _outside_quotes(text: str, quotes_open: Callable[[], bool]) -> Iterator[tuple[str, bool]]:
    """Each character of `text` with whether it stands outside a quoted token. A quote opens a token
    only where `quotes_open()` says so at that character; a backslash escapes inside quotes."""
    quote, escaped = None, False
    for ch in text:
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = None
            yield ch, False
        elif ch in "\"'" and quotes_open():
            quote = ch
            yield ch, False
        else:
            yield ch, True


def _split_terms(spec: str) -> list[str]:
    """Split a combination at '+' and '-' outside brackets, keeping each sign with its term. A sign
    separates terms only after a space or a closing bracket (`a - b`, `a[1]-b[2]`), so paths keep their
    dashes and `@-1` stays a position. Quotes count only inside brackets (tokens), so an apostrophe in
    a path is harmless."""
    parts, cur, depth = [], "", 0
    for ch, free in _outside_quotes(spec, lambda: depth > 0):
        if free and ch == "[":
            depth += 1
        elif free and ch == "]":
            depth = max(depth - 1, 0)
        elif free and ch in "+-" and depth == 0 and cur.strip() and (cur[-1].isspace() or cur[-1] == "]"):
            parts.append(cur)
            cur = ""
        cur += ch
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def _split_tokens(inner: str) -> list[str]:
    """Split `" Paris", " London"` at commas outside quotes."""
    parts, cur = [], ""
    for ch, free in _outside_quotes(inner, lambda: True):
        if free and ch == ",":
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts]


def _parse_reduce(text: str) -> tuple[str, Reduce]:
    m = re.match(r"^(.*)@(last|max|mean|-?\d+)$", text)
    if not m:
        return text, "last"
    how = m.group(2)
    return m.group(1), int(how) if re.fullmatch(r"-?\d+", how) else how


def _parse_token(text: str) -> str | int:
    text = text.strip()
    if re.fullmatch(r"\d+", text):
        return int(text)
    try:
        if text.startswith('"'):
            value = json.loads(text)
        elif text.startswith("'"):
            value = ast.literal_eval(text)
        else:
            value = text  # bare text, e.g. logit[Paris]
    except (ValueError, SyntaxError) as e:
        raise ObjectiveError(f"cannot read the token {text!r}: write it in double quotes, e.g. \" Paris\"") from e
    if not isinstance(value, str):
        raise ObjectiveError(f"cannot read the token {text!r}: write it in double quotes, e.g. \" Paris\"")
    return value


_FORMS = (
    "Forms: 'blocks.6.mlp.hook_post[123]', 'blocks.3.attn.hook_z[4,10]', 'blocks.0.attn.hook_pattern[2,-1,0]', "
    "'sae:embedded[42]', 'sae:PATH[42]', 'sae_pre:PATH[42]', 'logit[\" Paris\"]', "
    "'logitdiff[\" Paris\",\" London\"]', 'dir:HOOK:vector.pt'; optional '@max', '@mean' or '@POS' after "
    "the brackets; combine with ' + ', ' - ' and 'k*'"
)


def _parse_single(spec: str, load_sae: Callable[[str], Any]) -> Objective:
    body, how = _parse_reduce(spec.strip())
    m = re.fullmatch(r"(sae|sae_pre):(.+)\[\s*(\d+)\s*\]", body)
    if m:
        kind, source, index = m.groups()
        if source == "<in-memory>":
            raise ObjectiveError(
                f"{spec!r} was built from an in-memory SAE and cannot be read back; pass the SAE object "
                "(SAELatent(sae, index)), or give SAELatent a `source` it can be loaded from"
            )
        return SAELatent(load_sae(source), int(index), pre_activation=kind == "sae_pre", reduce=how, source=source)
    m = re.fullmatch(r"(logit|logitdiff)\[(.*)\]", body)
    if m:
        if how != "last":
            raise ObjectiveError(f"{spec!r}: logit objectives are read at the final position; drop '@{how}'")
        if m.group(1) == "logit":
            return Logit(_parse_token(m.group(2)))
        toks = _split_tokens(m.group(2))
        if len(toks) != 2:
            raise ObjectiveError(f"logitdiff needs two tokens, e.g. logitdiff[\" Paris\",\" London\"], got {spec!r}")
        return LogitDiff(_parse_token(toks[0]), _parse_token(toks[1]))
    m = re.fullmatch(r"dir:([^:]+):(.+)", body)
    if m:
        hook, path = m.groups()
        if path == "<in-memory>":
            raise ObjectiveError(
                f"{spec!r} was built from an in-memory vector and cannot be read back; pass "
                "Direction(hook, vector), or save the vector (torch.save) and write 'dir:HOOK:PATH'"
            )
        return Direction(hook, load_vector(path), reduce=how, source=path)
    m = re.fullmatch(r"([A-Za-z_][\w.]*)\[\s*(-?\d+(?:\s*,\s*-?\d+)*)\s*\]", body)
    if m:
        idx = tuple(int(x) for x in m.group(2).split(","))
        return Neuron(m.group(1), idx[0] if len(idx) == 1 else idx, reduce=how)
    m = re.fullmatch(r"([A-Za-z_][\w.]*)\s*(?:\[\s*\])?", body)
    if m and "." in m.group(1):  # a hook name without its unit: the commonest slip
        raise ObjectiveError(
            f"the objective {spec.strip()!r} names a hook but no unit of it; add the index in brackets, "
            f"e.g. '{m.group(1)}[0]'"
        )
    raise ObjectiveError(f"cannot read the objective {spec!r}. {_FORMS}")


def _default_sae_loader(source: str) -> Any:
    try:
        from .sae import load_sae
    except ImportError as e:  # pragma: no cover - the module ships with the package
        raise ObjectiveError(f"cannot load SAE {source!r}: {e}") from e
    return load_sae(source)


def load_vector(path: str | Path) -> Tensor:
    """A direction from a .pt, .npy or .safetensors (single tensor) file."""
    p = Path(path)
    if not p.is_file():
        raise ObjectiveError(f"no direction file at {str(p)!r} (expected a .pt, .npy or .safetensors file)")
    if p.suffix == ".npy":
        import numpy as np

        return torch.from_numpy(np.load(p)).float()
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(p))
        if len(tensors) != 1:
            raise ObjectiveError(
                f"{str(p)!r} holds {len(tensors)} tensors ({sorted(tensors)}); a direction file needs one"
            )
        return next(iter(tensors.values())).float()
    obj = torch.load(p, weights_only=True)
    if not isinstance(obj, Tensor):
        raise ObjectiveError(f"{str(p)!r} holds a {type(obj).__name__}, not a tensor; save the vector itself")
    return obj.float()


def objective(spec: str | Objective, *, sae_loader: Callable[[str], Any] | None = None) -> Objective:
    """Parse the string form of an objective (`str(obj)` parses back to the same objective).

    `sae:SOURCE[i]` loads the SAE with `sae_loader` (default `dreamlens.sae.load_sae`); an SAE named
    twice in one string is loaded once, so its latents share one encoding in the forward pass."""
    if isinstance(spec, Objective):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ObjectiveError(f"an objective (or its string form) is needed, got {spec!r}. {_FORMS}")
    loader = sae_loader or _default_sae_loader
    loaded: dict[str, Any] = {}

    def load_sae(source: str) -> Any:
        if source not in loaded:
            try:
                loaded[source] = loader(source)
            except ObjectiveError:
                raise
            except Exception as e:
                raise ObjectiveError(f"cannot load the SAE {source!r}: {e}") from e
        return loaded[source]

    terms: list[tuple[float, Objective]] = []
    for part in _split_terms(spec):
        m = re.fullmatch(r"([+-]?)\s*(?:((?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*\*\s*)?(.+)", part, flags=re.S)
        if not m:  # pragma: no cover - the pattern accepts any non-empty part
            raise ObjectiveError(f"cannot read {part!r} in {spec!r}. {_FORMS}")
        sign = -1.0 if m.group(1) == "-" else 1.0
        coef = float(m.group(2)) if m.group(2) else 1.0
        terms.append((sign * coef, _parse_single(m.group(3), load_sae)))
    if len(terms) == 1 and terms[0][0] == 1.0:
        return terms[0][1]
    return Combination(terms)
