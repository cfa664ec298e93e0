"""`Logit` and `LogitDiff`: next-token logits at the final position, and `token_id`, the one lookup
of a token (a string of one token, or an id) that every logit objective and the scan share."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from jaxtyping import Float
from torch import Tensor

from ..models import encode
from .base import Objective, as_index
from .errors import ObjectiveError
from .forward import Capture

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


def token_id(model: HookedTransformer, token: str | int) -> int:
    """The vocabulary id of `token`: an id (checked against the vocabulary), or a string that encodes
    to exactly one token (e.g. ' Paris', with its leading space). ObjectiveError otherwise."""
    if not isinstance(token, str):
        token = as_index(token, "a logit token (a string or a token id)")
        if not 0 <= token < model.cfg.d_vocab:
            raise ObjectiveError(f"token id {token} is outside the vocabulary (0..{model.cfg.d_vocab - 1})")
        return token
    ids = encode(model, token)
    if len(ids) != 1:
        pieces = [model.tokenizer.decode([i]) for i in ids]  # type: ignore[union-attr]
        raise ObjectiveError(
            f"{token!r} is {len(ids)} tokens {pieces}, not one; a logit objective needs a single token "
            "(a token id, or a string such as ' Paris' with its leading space)"
        )
    return ids[0]


def _check_token(token: Any) -> str | int:
    return token if isinstance(token, str) else as_index(token, "a logit token (a string or a token id)")


def _token_repr(token: str | int) -> str:
    return str(token) if isinstance(token, int) else json.dumps(token)


def _cached_token_id(capture: Capture, token: str | int) -> int:
    key = ("token", token)
    if key not in capture.memo:
        capture.memo[key] = token_id(capture.model, token)  # type: ignore[arg-type]  # run_objectives sets it
    return capture.memo[key]


@dataclass(frozen=True, eq=False, repr=False)
class Logit(Objective):
    """The logit of one next token at the final position."""

    token: str | int
    needs_logits = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "token", _check_token(self.token))

    def validate(self, model: HookedTransformer) -> None:
        token_id(model, self.token)

    def value(self, capture: Capture) -> Float[Tensor, " batch"]:
        return capture.logits[:, -1, _cached_token_id(capture, self.token)]  # type: ignore[index]

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

    def validate(self, model: HookedTransformer) -> None:
        a, b = token_id(model, self.token_a), token_id(model, self.token_b)
        if a == b:
            raise ObjectiveError(
                f"{self.token_a!r} and {self.token_b!r} are the same token (id {a}): their logit difference is always 0"
            )

    def value(self, capture: Capture) -> Float[Tensor, " batch"]:
        last = capture.logits[:, -1]  # type: ignore[index]
        return last[:, _cached_token_id(capture, self.token_a)] - last[:, _cached_token_id(capture, self.token_b)]

    def __str__(self) -> str:
        return f"logitdiff[{_token_repr(self.token_a)},{_token_repr(self.token_b)}]"
