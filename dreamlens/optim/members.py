"""Members: the prompts a population-based optimizer (EPO, ADAPT's mutation phase, GCG) keeps, member i
under its own fluency penalty lam_i, minimizing `-activation + lam_i * xe`.

Here: where members start (the user's initial prompt, or random prompts of allowed tokens), the
elitist selection that every such optimizer shares, and `MemberState`, the members' part of a run's
resumable state (as `DreamResult.state` stores it).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..models import encode
from ..scoring import DreamError, Layout, retokenizes

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from .config import DreamConfig


def allowed_tokens(banned: Bool[Tensor, " d_vocab"]) -> Int[Tensor, " n_allowed"]:
    """The ids of the tokens not banned."""
    return torch.nonzero(~banned).flatten()


def random_prompts(
    model: HookedTransformer, n: int, layout: Layout, allowed: Int[Tensor, " n_allowed"], gen: torch.Generator,
    prefix: str, suffix: str, tries: int = 100,
) -> Int[Tensor, "n length"]:
    """n random prompts of allowed tokens that re-tokenize to themselves in context."""
    ids = allowed[torch.randint(len(allowed), (n, layout.length), generator=gen)]
    for _ in range(tries):
        ok, _ = retokenizes(model, ids, layout, prefix, suffix)
        if ok.all():
            return ids
        bad = torch.nonzero(~ok).flatten()
        ids[bad] = allowed[torch.randint(len(allowed), (len(bad), layout.length), generator=gen)]
    raise DreamError("could not sample random prompts that re-tokenize to themselves; check the banned tokens and context")


def initial_span(model: HookedTransformer, cfg: DreamConfig, layout: Layout) -> Int[Tensor, "1 length"] | None:
    """The user's initial prompt as ids (None: random), checked against length and re-tokenization."""
    if cfg.init_ids is not None:
        ids = list(cfg.init_ids)
    elif cfg.init_text is not None:
        ids = encode(model, cfg.init_text)
    else:
        return None
    if len(ids) != layout.length:
        raise DreamError(
            f"the initial prompt has {len(ids)} tokens but length is {layout.length}; set length={len(ids)}"
        )
    span = torch.tensor([ids], dtype=torch.long)
    ok, _ = retokenizes(model, span, layout, cfg.prefix, cfg.suffix)
    if not ok.all():
        raise DreamError("the initial prompt's text does not tokenize back to the same ids in its context; pick other ids")
    return span


def select_members(
    f: Float[Tensor, " candidates"], xe: Float[Tensor, " candidates"], lams: Float[Tensor, " members"]
) -> Int[Tensor, " members"]:
    """For each penalty lam_i, the index of the candidate minimizing -f + lam_i * xe (first on ties)."""
    return (-f[None, :] + lams[:, None] * xe[None, :]).argmin(dim=1)


def generator_state(gen: torch.Generator) -> str:
    """A generator's state as text (for a result's JSON)."""
    return base64.b64encode(gen.get_state().numpy().tobytes()).decode()


def load_generator(state: str) -> torch.Generator:
    """A generator continuing from `generator_state`'s text."""
    gen = torch.Generator()
    gen.set_state(torch.frombuffer(bytearray(base64.b64decode(state)), dtype=torch.uint8))
    return gen


@dataclass
class MemberState:
    """The members of one objective, their activations and xe, and the generator that draws their
    children. Subclasses add their method's own state; `to_dict` keys are those results store."""

    members: Int[Tensor, "members length"]
    activation: Float[Tensor, " members"]
    xe: Float[Tensor, " members"]
    generator: torch.Generator

    def members_dict(self) -> dict[str, Any]:
        """The members' part of `to_dict` (the keys results have always stored)."""
        return {"population": self.members.tolist(), "pop_f": self.activation.tolist(), "pop_xe": self.xe.tolist()}

    def generator_text(self) -> str:
        """The generator's part of `to_dict` (its "generator")."""
        return generator_state(self.generator)

    @staticmethod
    def members_from_dict(d: dict[str, Any]) -> dict[str, Any]:
        """The constructor arguments of `members_dict`'s output, and of its "generator"."""
        return {
            "members": torch.tensor(d["population"], dtype=torch.long),
            "activation": torch.tensor(d["pop_f"], dtype=torch.float64),
            "xe": torch.tensor(d["pop_xe"], dtype=torch.float64),
            "generator": load_generator(d["generator"]),
        }

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def select(
        self, children: Int[Tensor, "children length"], f: Float[Tensor, " children"], xe: Float[Tensor, " children"],
        lams: Float[Tensor, " members"],
    ) -> Bool[Tensor, " members"]:
        """Member i becomes the best of the members and the children under its own penalty lams[i]
        (elitist: never worse). Returns which members' losses improved."""
        pool = torch.cat([self.members, children])
        pool_f, pool_xe = torch.cat([self.activation, f]), torch.cat([self.xe, xe])
        best = select_members(pool_f, pool_xe, lams)
        old = -self.activation + lams * self.xe
        self.members, self.activation, self.xe = pool[best], pool_f[best], pool_xe[best]
        return -self.activation + lams * self.xe < old - 1e-12
