"""The string form of objectives: `objective(spec)` parses what `str(obj)` writes, with a registry of
forms (`FORMS`, each a pattern, a builder and examples) that also writes the help text `FORMS_HELP`."""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor

from ..sae import load_sae
from .base import Combination, Objective, Reduce
from .direction import Direction
from .errors import ObjectiveError
from .logit import Logit, LogitDiff
from .maximum import Max
from .neuron import Neuron
from .sae_latent import SAELatent

# ---------------------------------------------------------------------------------------------
# Splitting a spec into terms, tokens and its '@reduce' suffix


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


def _at_top_level(text: str) -> Iterator[tuple[str, bool]]:
    """Each character of `text` with whether it stands at the top level: outside brackets, parentheses
    and quoted tokens (quotes count only inside brackets, where tokens are written, so an apostrophe in
    a path is harmless)."""
    depth = 0
    for ch, free in _outside_quotes(text, lambda: depth > 0):  # noqa: B023  # the depth at each character, on purpose
        if free and ch in "[(":
            depth += 1
        elif free and ch in "])":
            depth = max(depth - 1, 0)
        yield ch, free and depth == 0


def _split_terms(spec: str) -> list[str]:
    """Split a combination at '+' and '-' at the top level (`_at_top_level`), keeping each sign with its
    term. A sign separates terms only after a space or a closing bracket (`a - b`, `a[1]-b[2]`), so paths keep their
    dashes and `@-1` stays a position."""
    parts, cur = [], ""
    for ch, top in _at_top_level(spec):
        if top and ch in "+-" and cur.strip() and (cur[-1].isspace() or cur[-1] in "])"):
            parts.append(cur)
            cur = ""
        cur += ch
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def split_outside(text: str, sep: str) -> list[str]:
    """Split `text` at `sep` at the top level: outside brackets, parentheses and quoted tokens (quotes count
    only inside brackets, where tokens are written, so an apostrophe in a path is harmless); parts are not
    stripped."""
    parts, cur = [], ""
    for ch, top in _at_top_level(text):
        if top and ch == sep:
            parts.append(cur)
            cur = ""
            continue
        cur += ch
    parts.append(cur)
    return parts


def _split_args(inner: str) -> list[str]:
    """Split the arguments of `max(...)` at commas outside brackets, parentheses and quoted tokens."""
    return [p.strip() for p in split_outside(inner, ",")]


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


# ---------------------------------------------------------------------------------------------
# The forms

LoadSAE = Callable[[str], Any]


@dataclass(frozen=True)
class Form:
    """One string form of a single objective. `pattern` must match all of the spec's body (the spec
    without its '@reduce' suffix); `build(match, reduce, spec, load_sae)` makes the objective (or
    raises ObjectiveError); `examples` are what the help text `FORMS_HELP` shows for it."""

    name: str
    pattern: re.Pattern[str]
    build: Callable[[re.Match[str], Reduce, str, LoadSAE], Objective]
    examples: tuple[str, ...]


def _neuron(m: re.Match[str], how: Reduce, spec: str, load_sae: LoadSAE) -> Objective:
    idx = tuple(int(x) for x in m.group(2).split(","))
    return Neuron(m.group(1), idx[0] if len(idx) == 1 else idx, reduce=how)


def _sae_latent(m: re.Match[str], how: Reduce, spec: str, load_sae: LoadSAE) -> Objective:
    kind, source, index = m.groups()
    if source == "<in-memory>":
        raise ObjectiveError(
            f"{spec!r} was built from an in-memory SAE and cannot be read back; pass the SAE object "
            "(SAELatent(sae, index)), or give SAELatent a `source` it can be loaded from"
        )
    return SAELatent(load_sae(source), int(index), pre_activation=kind == "sae_pre", reduce=how, source=source)


def _at_final_position(spec: str, how: Reduce) -> None:
    if how != "last":
        raise ObjectiveError(f"{spec!r}: logit objectives are read at the final position; drop '@{how}'")


def _logit(m: re.Match[str], how: Reduce, spec: str, load_sae: LoadSAE) -> Objective:
    _at_final_position(spec, how)
    return Logit(_parse_token(m.group(1)))


def _logit_diff(m: re.Match[str], how: Reduce, spec: str, load_sae: LoadSAE) -> Objective:
    _at_final_position(spec, how)
    toks = _split_tokens(m.group(1))
    if len(toks) != 2:
        raise ObjectiveError(f"logitdiff needs two tokens, e.g. logitdiff[\" Paris\",\" London\"], got {spec!r}")
    return LogitDiff(_parse_token(toks[0]), _parse_token(toks[1]))


def _direction(m: re.Match[str], how: Reduce, spec: str, load_sae: LoadSAE) -> Objective:
    hook, path = m.groups()
    if path == "<in-memory>":
        raise ObjectiveError(
            f"{spec!r} was built from an in-memory vector and cannot be read back; pass "
            "Direction(hook, vector), or save the vector (torch.save) and write 'dir:HOOK:PATH'"
        )
    return Direction(hook, load_vector(path), reduce=how, source=path)


# No spec matches two patterns (a neuron's hook name never reads as a logit form, the other forms
# start with their own prefix), so the order is only that of the help text.
FORMS: tuple[Form, ...] = (
    Form(
        "neuron",
        re.compile(r"(?!(?:logit|logitdiff)\[.*\]\Z)([A-Za-z_][\w.]*)\[\s*(-?\d+(?:\s*,\s*-?\d+)*)\s*\]"),
        _neuron,
        ("blocks.6.mlp.hook_post[123]", "blocks.3.attn.hook_z[4,10]", "blocks.0.attn.hook_pattern[2,-1,0]"),
    ),
    Form(
        "sae",
        re.compile(r"(sae|sae_pre):(.+)\[\s*(\d+)\s*\]"),
        _sae_latent,
        ("sae:embedded[42]", "sae:PATH[42]", "sae_pre:PATH[42]"),
    ),
    Form("logit", re.compile(r"logit\[(.*)\]"), _logit, ('logit[" Paris"]',)),
    Form("logitdiff", re.compile(r"logitdiff\[(.*)\]"), _logit_diff, ('logitdiff[" Paris"," London"]',)),
    Form("direction", re.compile(r"dir:([^:]+):(.+)"), _direction, ("dir:HOOK:vector.pt",)),
)

FORMS_HELP = (
    "Forms: "
    + ", ".join(f"'{example}'" for form in FORMS for example in form.examples)
    + "; optional '@max', '@mean' or '@POS' after the brackets; combine with ' + ', ' - ' and 'k*', "
    "or take the largest with 'max(A, B)'"
)
MAX_HELP = "the largest of several objectives: 'max(A, B)', e.g. 'max(sae:embedded[1], 0.5*blocks.6.mlp.hook_post[2])'"


def _parse_single(spec: str, load_sae: LoadSAE, expression: Callable[[str], Objective]) -> Objective:
    m = re.fullmatch(r"max\s*\((.*)\)", spec.strip(), flags=re.S)
    if m:
        args = _split_args(m.group(1))
        if len(args) < 2 or not all(args):
            raise ObjectiveError(f"cannot read {spec.strip()!r}: max() takes two or more objectives; {MAX_HELP}")
        return Max(*(expression(a) for a in args))
    body, how = _parse_reduce(spec.strip())
    for form in FORMS:
        m = form.pattern.fullmatch(body)
        if m:
            return form.build(m, how, spec, load_sae)
    m = re.fullmatch(r"([A-Za-z_][\w.]*)\s*(?:\[\s*\])?", body)
    if m and "." in m.group(1):  # a hook name without its unit: the commonest slip
        raise ObjectiveError(
            f"the objective {spec.strip()!r} names a hook but no unit of it; add the index in brackets, "
            f"e.g. '{m.group(1)}[0]'"
        )
    raise ObjectiveError(f"cannot read the objective {spec!r}. {FORMS_HELP}")


@dataclass(frozen=True)
class Unit:
    """What the string form of a single neuron or SAE latent names, read without loading anything:
    `kind` "neuron" (`where` is its hook, `index` its numbers), "sae" or "sae_pre" (`where` is the SAE's
    source, `index` its latent); `reduce` as its '@' suffix says."""

    kind: str
    where: str
    index: tuple[int, ...]
    reduce: Reduce


def parse_unit(spec: str) -> Unit | None:
    """The neuron or SAE latent `spec` names (`Unit`), or None for any other objective (a logit, a direction,
    a combination, `max(...)`) and for text that is no objective at all."""
    body, how = _parse_reduce(spec.strip())
    for form in FORMS:
        m = form.pattern.fullmatch(body)
        if m and form.name == "neuron":
            return Unit("neuron", m.group(1), tuple(int(x) for x in m.group(2).split(",")), how)
        if m and form.name == "sae":
            return Unit(m.group(1), m.group(2), (int(m.group(3)),), how)
    return None


# ---------------------------------------------------------------------------------------------
# Loading what a spec names, and the parser


def _default_sae_loader(source: str) -> Any:
    return load_sae(source)


def load_vector(path: str | Path) -> Tensor:
    """A direction from a .pt, .npy or .safetensors (single tensor) file."""
    p = Path(path)
    if not p.is_file():
        raise ObjectiveError(f"no direction file at {str(p)!r} (expected a .pt, .npy or .safetensors file)")
    if p.suffix == ".npy":
        return torch.from_numpy(np.load(p)).float()
    if p.suffix == ".safetensors":
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
        raise ObjectiveError(f"an objective (or its string form) is needed, got {spec!r}. {FORMS_HELP}")
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

    def expression(text: str) -> Objective:
        terms: list[tuple[float, Objective]] = []
        for part in _split_terms(text):
            m = re.fullmatch(r"([+-]?)\s*(?:((?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*\*\s*)?(.+)", part, flags=re.S)
            if not m:  # pragma: no cover - the pattern accepts any non-empty part
                raise ObjectiveError(f"cannot read {part!r} in {spec!r}. {FORMS_HELP}")
            sign = -1.0 if m.group(1) == "-" else 1.0
            coef = float(m.group(2)) if m.group(2) else 1.0
            terms.append((sign * coef, _parse_single(m.group(3), load_sae, expression)))
        if len(terms) == 1 and terms[0][0] == 1.0:
            return terms[0][1]
        return Combination(terms)

    return expression(spec)
