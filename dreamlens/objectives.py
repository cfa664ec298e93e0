"""Objectives: what a dream maximizes. One protocol for neurons, SAE latents, directions and logits.

An objective reads activations captured at TransformerLens hook points (or the logits) and returns one
scalar per prompt, shape `[batch]`. `run_objectives` is the single forward pass every caller shares.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

Reduce = str | int  # "last" | "max" | "mean" | a position index within the prompt


class ObjectiveError(ValueError):
    """An objective does not fit the model, or its specification is malformed."""


class NonFiniteError(FloatingPointError):
    """The model produced NaN or infinite values for an objective."""


# ---------------------------------------------------------------------------------------------
# What one forward pass hands to objectives


@dataclass
class Capture:
    """Activations of one forward pass: `acts[hook]` is `[batch, pos, ...]`; `logits` `[batch, pos, vocab]`
    when the pass ran to the end. `start` is the first position that belongs to the prompt (positions
    before it, such as BOS, are never reduced over)."""

    acts: dict[str, Tensor]
    logits: Tensor | None
    start: int = 0
    memo: dict[Any, Any] = field(default_factory=dict)


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
    if how in ("last", "max", "mean") or (isinstance(how, int) and not isinstance(how, bool)):
        return how
    raise ObjectiveError(f"reduce must be 'last', 'max', 'mean' or an integer position, got {how!r}")


def _reduce_suffix(how: Reduce) -> str:
    return "" if how == "last" else f"@{how}"


def _layer_of(hook: str) -> int | None:
    """Block index a hook lives in; -1 for embedding hooks; None for hooks after the last block."""
    m = re.match(r"blocks\.(\d+)\.", hook)
    if m:
        return int(m.group(1))
    if hook in ("hook_embed", "hook_pos_embed", "hook_tokens"):
        return -1
    return None


def _check_hook(model: Any, hook: str) -> None:
    if hook not in model.hook_dict:
        close = difflib.get_close_matches(hook, list(model.hook_dict), n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ObjectiveError(f"unknown hook {hook!r}{hint} (see model.hook_dict for all names)")


def hook_shape(model: Any, hook: str) -> tuple[int, ...]:
    """Shape of one position's activation at `hook` (e.g. `(d_mlp,)` or `(n_heads, d_head)`)."""
    _check_hook(model, hook)
    memo = model.__dict__.setdefault("_dreamlens_hook_shapes", {})
    if hook not in memo:
        layer = _layer_of(hook)
        stop = None if layer is None else max(layer + 1, 1)
        seen: dict[str, tuple[int, ...]] = {}

        def grab(act: Tensor, hook: Any) -> None:
            seen[hook.name] = tuple(act.shape[2:])

        with torch.no_grad():
            tokens = torch.zeros((1, 2), dtype=torch.long, device=model.cfg.device)
            model.run_with_hooks(tokens, fwd_hooks=[(hook, grab)], stop_at_layer=stop)
        if hook not in seen:
            raise ObjectiveError(f"hook {hook!r} did not fire in a forward pass; it cannot be an objective")
        memo[hook] = seen[hook]
    return memo[hook]


# ---------------------------------------------------------------------------------------------
# The protocol


class Objective:
    """Base of all objectives. Subclasses define `hooks`, `value`, `validate` and `__str__`.

    Objectives combine linearly: `a + b`, `a - 0.5 * b`, `2 * a`, `-a`.
    """

    needs_logits: bool = False

    @property
    def hooks(self) -> tuple[str, ...]:
        return ()

    def validate(self, model: Any) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def value(self, capture: Capture) -> Float[Tensor, " batch"]:  # pragma: no cover - overridden
        raise NotImplementedError

    def stop_at_layer(self, model: Any) -> int | None:
        """The `stop_at_layer` a forward pass needs to compute this objective (None: the whole model)."""
        return stop_at_layer(model, [self])

    def evaluate(
        self, model: Any, tokens: Int[Tensor, "batch pos"], *, start: int | None = None
    ) -> Float[Tensor, " batch"]:
        """The objective for each row of `tokens`, without gradients, stopping the forward early."""
        self.validate(model)
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

    def __sub__(self, other: Objective) -> Objective:
        if not isinstance(other, Objective):
            return NotImplemented
        return Combination(self._terms() + [(-c, o) for c, o in other._terms()])

    def __mul__(self, k: float) -> Objective:
        if not isinstance(k, (int, float)) or isinstance(k, bool):
            return NotImplemented
        return Combination([(float(k) * c, o) for c, o in self._terms()])

    __rmul__ = __mul__

    def __neg__(self) -> Objective:
        return self * -1.0

    def __repr__(self) -> str:
        return f"objective({str(self)!r})"


@dataclass(frozen=True, eq=False)
class Neuron(Objective):
    """One unit at any hook point: an index into the last axis, or a tuple for hooks with a head axis
    (`Neuron("blocks.3.attn.hook_z", (4, 10))` is head 4, dimension 10)."""

    hook: str
    index: int | tuple[int, ...]
    reduce: Reduce = "last"

    def __post_init__(self) -> None:
        object.__setattr__(self, "reduce", _check_reduce(self.reduce))
        idx = self.index if isinstance(self.index, tuple) else (self.index,)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in idx):
            raise ObjectiveError(f"neuron index must be integers, got {self.index!r}")

    @property
    def hooks(self) -> tuple[str, ...]:
        return (self.hook,)

    @property
    def _index(self) -> tuple[int, ...]:
        return self.index if isinstance(self.index, tuple) else (self.index,)

    def validate(self, model: Any) -> None:
        shape = hook_shape(model, self.hook)
        idx = self._index
        if len(idx) != len(shape):
            raise ObjectiveError(
                f"{self.hook} has per-position shape {list(shape)}, so its index needs {len(shape)} "
                f"number(s), got {list(idx)}" + (f"; e.g. {self.hook}[0,{idx[-1]}]" if len(shape) == 2 else "")
            )
        for i, n, axis in zip(idx, shape, range(len(shape))):
            if not 0 <= i < n:
                raise ObjectiveError(f"index {i} is out of range for axis {axis} of {self.hook} (size {n}): use 0..{n - 1}")

    def value(self, capture: Capture) -> Float[Tensor, " batch"]:
        act = capture.acts[self.hook]
        return _reduce(act[(slice(None), slice(None), *self._index)], self.reduce, capture.start)

    def __str__(self) -> str:
        return f"{self.hook}[{','.join(map(str, self._index))}]{_reduce_suffix(self.reduce)}"


@dataclass(frozen=True, eq=False)
class SAELatent(Objective):
    """One latent of a sae-lens SAE, read at the SAE's own hook. `pre_activation=True` uses the
    encoder's pre-activation, whose gradient is not zero below a JumpReLU/TopK threshold."""

    sae: Any
    index: int
    pre_activation: bool = False
    reduce: Reduce = "last"
    source: str | None = None  # how to load the SAE again, for the string form

    def __post_init__(self) -> None:
        object.__setattr__(self, "reduce", _check_reduce(self.reduce))

    @property
    def hook(self) -> str:
        return self.sae.cfg.metadata.hook_name

    @property
    def hooks(self) -> tuple[str, ...]:
        return (self.hook,)

    def validate(self, model: Any) -> None:
        if not self.hook:
            raise ObjectiveError("the SAE's cfg.metadata.hook_name is empty: it does not say where it reads the model")
        shape = hook_shape(model, self.hook)
        d_in = self.sae.cfg.d_in
        if math.prod(shape) != d_in:
            raise ObjectiveError(
                f"the SAE reads {d_in} values at {self.hook}, but this model has {math.prod(shape)} there "
                "(an SAE for another model or layer?)"
            )
        d_sae = self.sae.cfg.d_sae
        if not 0 <= self.index < d_sae:
            raise ObjectiveError(f"SAE latent {self.index} is out of range: this SAE has {d_sae} latents (0..{d_sae - 1})")

    def _encode(self, capture: Capture) -> tuple[Tensor, Tensor]:
        key = ("sae", id(self.sae))
        if key not in capture.memo:
            # Read the pre-activation from the SAE's own hook point, so every architecture works.
            got: dict[str, Tensor] = {}
            handle = self.sae.hook_sae_acts_pre.register_forward_hook(lambda m, i, o: got.__setitem__("pre", o))
            try:
                post = self.sae.encode(capture.acts[self.hook].to(self.sae.dtype))
            finally:
                handle.remove()
            capture.memo[key] = (got["pre"], post)
        return capture.memo[key]

    def value(self, capture: Capture) -> Float[Tensor, " batch"]:
        pre, post = self._encode(capture)
        x = (pre if self.pre_activation else post)[..., self.index].float()
        return _reduce(x, self.reduce, capture.start)

    def __str__(self) -> str:
        kind = "sae_pre" if self.pre_activation else "sae"
        return f"{kind}:{self.source or '<in-memory>'}[{self.index}]{_reduce_suffix(self.reduce)}"


@dataclass(frozen=True, eq=False)
class Direction(Objective):
    """Dot product of the activation at `hook` with `vector` (not normalized)."""

    hook: str
    vector: Tensor
    reduce: Reduce = "last"
    source: str | None = None  # file the vector came from, for the string form

    def __post_init__(self) -> None:
        object.__setattr__(self, "reduce", _check_reduce(self.reduce))
        v = torch.as_tensor(self.vector, dtype=torch.float32)
        if v.ndim != 1:
            raise ObjectiveError(f"a direction must be a 1-D vector, got shape {list(v.shape)}")
        if not torch.isfinite(v).all() or v.abs().max() == 0:
            raise ObjectiveError("the direction is all zeros or not finite: it would give a constant objective")
        object.__setattr__(self, "vector", v)

    @property
    def hooks(self) -> tuple[str, ...]:
        return (self.hook,)

    def validate(self, model: Any) -> None:
        shape = hook_shape(model, self.hook)
        if len(shape) != 1 or shape[0] != self.vector.numel():
            raise ObjectiveError(
                f"the direction has {self.vector.numel()} entries but {self.hook} has per-position shape {list(shape)}"
            )

    def value(self, capture: Capture) -> Float[Tensor, " batch"]:
        act = capture.acts[self.hook]
        return _reduce(act @ self.vector.to(act.device, act.dtype), self.reduce, capture.start)

    def __str__(self) -> str:
        return f"dir:{self.hook}:{self.source or '<in-memory>'}{_reduce_suffix(self.reduce)}"


def _token_id(model: Any, token: str | int) -> int:
    from .models import encode

    if isinstance(token, int):
        if not 0 <= token < model.cfg.d_vocab:
            raise ObjectiveError(f"token id {token} is outside the vocabulary (0..{model.cfg.d_vocab - 1})")
        return token
    ids = encode(model, token)
    if len(ids) != 1:
        pieces = [model.tokenizer.decode([i]) for i in ids]
        raise ObjectiveError(
            f"{token!r} is {len(ids)} tokens {pieces}, not one; a logit objective needs a single token "
            "(note the leading space in ' Paris')"
        )
    return ids[0]


def _token_repr(token: str | int) -> str:
    return str(token) if isinstance(token, int) else json.dumps(token)


@dataclass(frozen=True, eq=False)
class Logit(Objective):
    """The logit of one next token at the final position."""

    token: str | int
    needs_logits = True

    def validate(self, model: Any) -> None:
        _token_id(model, self.token)

    def value(self, capture: Capture) -> Float[Tensor, " batch"]:
        return capture.logits[:, -1, capture.memo[("token", self.token)]]

    def __str__(self) -> str:
        return f"logit[{_token_repr(self.token)}]"


@dataclass(frozen=True, eq=False)
class LogitDiff(Objective):
    """logit(token_a) - logit(token_b) at the final position."""

    token_a: str | int
    token_b: str | int
    needs_logits = True

    def validate(self, model: Any) -> None:
        _token_id(model, self.token_a)
        _token_id(model, self.token_b)

    def value(self, capture: Capture) -> Float[Tensor, " batch"]:
        last = capture.logits[:, -1]
        return last[:, capture.memo[("token", self.token_a)]] - last[:, capture.memo[("token", self.token_b)]]

    def __str__(self) -> str:
        return f"logitdiff[{_token_repr(self.token_a)},{_token_repr(self.token_b)}]"


@dataclass(frozen=True, eq=False)
class Combination(Objective):
    """A weighted sum of objectives, e.g. "activate A but not B": `a - 0.5 * b`."""

    terms: list[tuple[float, Objective]]

    def __post_init__(self) -> None:
        if not self.terms:
            raise ObjectiveError("a combination needs at least one objective")

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

    def value(self, capture: Capture) -> Float[Tensor, " batch"]:
        return sum(c * o.value(capture) for c, o in self.terms)  # type: ignore[return-value]

    def __str__(self) -> str:
        out = ""
        for i, (c, o) in enumerate(self.terms):
            sign = "-" if c < 0 else "+"
            mag = abs(c)
            body = str(o) if mag == 1 else f"{mag:g}*{o}"
            out += (f"-{body}" if sign == "-" else body) if i == 0 else f" {sign} {body}"
        return out


# ---------------------------------------------------------------------------------------------
# The shared forward pass


def _leaves(objectives: Sequence[Objective]) -> list[Objective]:
    out = []
    for o in objectives:
        out.extend(o for _, o in o._terms()) if isinstance(o, Combination) else out.append(o)
    return out


def stop_at_layer(model: Any, objectives: Sequence[Objective]) -> int | None:
    """The earliest `stop_at_layer` that computes all `objectives` (None: run the whole model)."""
    if any(o.needs_logits for o in objectives):
        return None
    layers = [_layer_of(h) for o in objectives for h in o.hooks]
    if not layers or any(layer is None for layer in layers):
        return None
    return max(max(layers) + 1, 1)  # type: ignore[type-var]


def default_start(model: Any, tokens: Int[Tensor, "batch pos"]) -> int:
    """1 when every row begins with the model's start token (it is not part of the prompt), else 0."""
    from .models import bos_token_id

    bos = bos_token_id(model)
    return int(bos is not None and tokens.shape[1] > 1 and bool((tokens[:, 0] == bos).all()))


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

    The pass stops after the deepest hook needed, unless `final_from` is given or an objective needs
    logits: then it runs every block and also returns the final normalized residual stream at positions
    `final_from:` (the unembedding is left to the caller, so full `[batch, pos, vocab]` logits are
    never materialized). `embeds` replaces the token embeddings (for gradients through one-hot
    inputs); `tokens` still gives the shape. Gradients flow when called outside `torch.no_grad()`.
    """
    if tokens.ndim != 2 or tokens.shape[1] == 0:
        raise ObjectiveError(f"tokens must have shape [batch, pos] with pos >= 1, got {list(tokens.shape)}")
    start = default_start(model, tokens) if start is None else start
    leaves = _leaves(objectives)
    hooks = list(dict.fromkeys(h for o in leaves for h in o.hooks))
    acts: dict[str, Tensor] = {}

    def save(act: Tensor, hook: Any) -> None:
        acts[hook.name] = act

    fwd_hooks: list[tuple[str, Callable]] = [(h, save) for h in hooks]
    if embeds is not None:
        fwd_hooks.insert(0, ("hook_embed", lambda act, hook: embeds))
    needs_final = final_from is not None or any(o.needs_logits for o in leaves)
    stop = model.cfg.n_layers if needs_final else stop_at_layer(model, objectives)
    final = None
    with model.hooks(fwd_hooks=fwd_hooks):
        resid = model(tokens, stop_at_layer=stop)
        if needs_final:
            lo = tokens.shape[1] - 1 if final_from is None else final_from
            final = resid[:, lo:]
            if model.cfg.normalization_type is not None:
                final = model.ln_final(final)
    capture = Capture(acts=acts, logits=None, start=start)
    if any(o.needs_logits for o in leaves):
        capture.logits = unembed(model, final[:, -1:])
        for o in leaves:
            for t in [getattr(o, a) for a in ("token", "token_a", "token_b") if hasattr(o, a)]:
                capture.memo[("token", t)] = _token_id(model, t)
    values = (
        torch.stack([o.value(capture).float() for o in objectives])
        if objectives
        else torch.zeros((0, tokens.shape[0]), device=tokens.device)
    )
    if check_finite and not torch.isfinite(values).all():
        bad = [str(o) for o, row in zip(objectives, values) if not torch.isfinite(row).all()]
        raise NonFiniteError(f"the model produced NaN or infinite values for {bad}; check the model's dtype and weights")
    return values, final if final_from is not None else None


def unembed(model: Any, normed: Float[Tensor, "batch n d_model"]) -> Float[Tensor, "batch n d_vocab"]:
    """Logits from the final normalized residual stream (as the model's own forward computes them)."""
    logits = model.unembed(normed)
    cap = getattr(model.cfg, "output_logits_soft_cap", -1.0)
    return cap * torch.tanh(logits / cap) if cap and cap > 0 else logits


# ---------------------------------------------------------------------------------------------
# The string form


def _split_top(spec: str, seps: str) -> list[str]:
    """Split at separators outside brackets and quotes, keeping each separator with what follows.
    '+' and '-' separate terms only after a space (`a - b`), so paths and hook names keep their dashes."""
    parts, depth, quote, cur = [], 0, None, ""
    for i, ch in enumerate(spec):
        if quote:
            cur += ch
            if ch == "\\" and i + 1 < len(spec):
                continue
            if ch == quote and spec[i - 1] != "\\":
                quote = None
            continue
        if ch in "\"'":
            quote = ch
        elif ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch in seps and depth == 0 and cur.strip() and (ch == "," or cur[-1:].isspace()):
            parts.append(cur)
            cur = ""
        cur += ch
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


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
        value = json.loads(text if text.startswith('"') else '"' + text.strip("'").replace('"', '\\"') + '"')
    except json.JSONDecodeError as e:
        raise ObjectiveError(f"cannot read the token {text!r}: write it in double quotes, e.g. \" Paris\"") from e
    return value


def _parse_single(spec: str, sae_loader: Callable[[str], Any] | None) -> Objective:
    body, how = _parse_reduce(spec.strip())
    m = re.fullmatch(r"(sae|sae_pre):(.+)\[(\d+)\]", body)
    if m:
        kind, source, index = m.groups()
        if source == "<in-memory>":
            raise ObjectiveError("this SAE objective was built from an in-memory SAE; pass the SAE object instead")
        load = sae_loader or _default_sae_loader
        return SAELatent(load(source), int(index), pre_activation=kind == "sae_pre", reduce=how, source=source)
    m = re.fullmatch(r"logit\[(.+)\]", body)
    if m:
        return Logit(_parse_token(m.group(1)))
    m = re.fullmatch(r"logitdiff\[(.+)\]", body)
    if m:
        toks = _split_top(m.group(1), ",")
        toks = [t.lstrip(",").strip() for t in toks]
        if len(toks) != 2:
            raise ObjectiveError(f"logitdiff needs two tokens, e.g. logitdiff[\" Paris\",\" London\"], got {spec!r}")
        return LogitDiff(_parse_token(toks[0]), _parse_token(toks[1]))
    m = re.fullmatch(r"dir:([^:]+):(.+)", body)
    if m:
        hook, path = m.groups()
        return Direction(hook, load_vector(path), reduce=how, source=path)
    m = re.fullmatch(r"([A-Za-z_][\w.]*)\[\s*(-?\d+(?:\s*,\s*-?\d+)*)\s*\]", body)
    if m:
        idx = tuple(int(x) for x in m.group(2).split(","))
        return Neuron(m.group(1), idx[0] if len(idx) == 1 else idx, reduce=how)
    raise ObjectiveError(
        f"cannot read the objective {spec!r}. Forms: 'blocks.6.mlp.hook_post[123]', "
        "'blocks.3.attn.hook_z[4,10]', 'sae:embedded[42]', 'sae:PATH[42]', 'logit[\" Paris\"]', "
        "'logitdiff[\" Paris\",\" London\"]', 'dir:HOOK:vector.pt'; optional '@max', '@mean' or '@POS' "
        "after the brackets; combine with '+', '-' and 'k*'"
    )


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
        raise ObjectiveError(f"no direction file at {str(p)!r}")
    if p.suffix == ".npy":
        import numpy as np

        return torch.from_numpy(np.load(p)).float()
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(p))
        if len(tensors) != 1:
            raise ObjectiveError(f"{str(p)!r} holds {len(tensors)} tensors ({sorted(tensors)}); a direction file needs one")
        return next(iter(tensors.values())).float()
    return torch.as_tensor(torch.load(p, weights_only=True)).float()


def objective(spec: str | Objective, *, sae_loader: Callable[[str], Any] | None = None) -> Objective:
    """Parse the string form of an objective (`str(obj)` parses back to the same objective)."""
    if isinstance(spec, Objective):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ObjectiveError(f"an objective string is needed, got {spec!r}")
    terms: list[tuple[float, Objective]] = []
    for part in _split_top(spec, "+-"):
        sign = -1.0 if part.startswith("-") else 1.0
        part = part.lstrip("+-").strip()
        m = re.match(r"^([0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?)\s*\*\s*(.+)$", part)
        coef, body = (float(m.group(1)), m.group(2)) if m else (1.0, part)
        terms.append((sign * coef, _parse_single(body, sae_loader)))
    if len(terms) == 1 and terms[0][0] == 1.0:
        return terms[0][1]
    return Combination(terms)
