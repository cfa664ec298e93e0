"""Members: the prompts a population-based optimizer (EPO, ADAPT's mutation phase, GCG) keeps, member i
under its own fluency penalty lam_i, minimizing `-activation + lam_i * xe`.

Here: where members start (the user's initial prompt, candidate starts such as dataset examples, or
random prompts of allowed tokens), the elitist selection that every such optimizer shares, and
`MemberState`, the members' part of a run's resumable state (as `DreamResult.state` stores it).
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..errors import DreamError
from ..models import encode
from ..results import pareto_front
from ..scoring import Layout, retokenizes

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from .config import DreamConfig


def allowed_tokens(banned: Bool[Tensor, " d_vocab"]) -> Int[Tensor, " n_allowed"]:
    """The ids of the tokens not banned."""
    return torch.nonzero(~banned).flatten()


def random_prompts(
    model: HookedTransformer, n: int, layout: Layout, allowed: Int[Tensor, " n_allowed"], gen: torch.Generator,
    tries: int = 100,
) -> Int[Tensor, "n length"]:
    """n random prompts of allowed tokens that re-tokenize to themselves in context."""
    ids = allowed[torch.randint(len(allowed), (n, layout.length), generator=gen)]
    for _ in range(tries):
        ok, _ = retokenizes(model, ids, layout)
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
    ok, _ = retokenizes(model, span, layout)
    if not ok.all():
        raise DreamError("the initial prompt's text does not tokenize back to the same ids in its context; pick other ids")
    return span


def start_pool(prompts: Sequence[Sequence[int]] | None) -> Int[Tensor, "pool length"] | None:
    """Candidate starts (a config's `init_prompts`, their length checked by the config) as ids (None:
    the method's own start)."""
    return None if prompts is None else torch.tensor(prompts, dtype=torch.long)


def cover(f: Float[Tensor, " pool"], xe: Float[Tensor, " pool"], n: int) -> Int[Tensor, " n"]:
    """n candidates that cover the pool's activation-fluency region, most active first: evenly spaced
    along the non-dominated front (its most active and its most fluent point included), then along the
    next fronts once a front is used up, repeating only when fewer than n are valid. Raises when no
    candidate is valid (f or xe not finite: it did not re-tokenize in context)."""
    a, x = f.double().numpy().copy(), xe.double().numpy().copy()
    valid = int((np.isfinite(a) & np.isfinite(x)).sum())
    if valid == 0:
        raise DreamError(
            f"none of the {len(a)} candidate starts re-tokenizes to its own ids in context; give other starts "
            "(e.g. windows that begin at a word boundary) or drop them to start from the method's own"
        )
    chosen: list[int] = []
    while len(chosen) < min(n, valid):
        front = pareto_front(a, x)[::-1]  # most active first
        want = min(n, valid) - len(chosen)
        if len(front) > want:
            front = front[np.linspace(0, len(front) - 1, want).round().astype(int)]
        chosen += [int(i) for i in front]
        a[front] = -np.inf  # the next front is the best of what is left
    chosen.sort(key=lambda i: (-float(f[i]), float(xe[i])))
    return torch.tensor([chosen[i % len(chosen)] for i in range(n)], dtype=torch.long)


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


# Members as one [members, length] tensor, or (prompts of a length range, ADAPT) a list of 1-D rows.
Prompts = Int[Tensor, "members length"] | list[Int[Tensor, " length"]]


def pick(prompts: Prompts, idx: Int[Tensor, " n"]) -> Prompts:
    """The prompts at `idx`, in the form they came in (a tensor's rows, or a list's items)."""
    return prompts[idx] if isinstance(prompts, Tensor) else [prompts[int(i)] for i in idx]


def join(a: Prompts, b: Prompts) -> Prompts:
    """a's prompts then b's: one tensor when both are tensors of one length, else a list of rows."""
    if isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape[1:] == b.shape[1:]:
        return torch.cat([a, b])
    return [*a, *b]


@dataclass
class MemberState:
    """The members of one objective, their activations and xe, and the generator that draws their
    children. Subclasses add their method's own state; `to_dict` keys are those results store."""

    members: Prompts
    activation: Float[Tensor, " members"]
    xe: Float[Tensor, " members"]
    generator: torch.Generator

    def matrix(self) -> Int[Tensor, "members length"]:
        """The members as one tensor (how every method keeps them, but ADAPT with a length range)."""
        if not isinstance(self.members, Tensor):
            raise TypeError("these members have several lengths (a length range); only ADAPT takes them")
        return self.members

    def members_dict(self) -> dict[str, Any]:
        """The members' part of `to_dict` (the keys results have always stored)."""
        members = self.members.tolist() if isinstance(self.members, Tensor) else [m.tolist() for m in self.members]
        return {"population": members, "pop_f": self.activation.tolist(), "pop_xe": self.xe.tolist()}

    def generator_text(self) -> str:
        """The generator's part of `to_dict` (its "generator")."""
        return generator_state(self.generator)

    @staticmethod
    def members_from_dict(d: dict[str, Any]) -> dict[str, Any]:
        """The constructor arguments of `members_dict`'s output, and of its "generator"."""
        rows = d["population"]
        members: Prompts = (
            torch.tensor(rows, dtype=torch.long) if len({len(r) for r in rows}) <= 1
            else [torch.tensor(r, dtype=torch.long) for r in rows]
        )
        return {
            "members": members,
            "activation": torch.tensor(d["pop_f"], dtype=torch.float64),
            "xe": torch.tensor(d["pop_xe"], dtype=torch.float64),
            "generator": load_generator(d["generator"]),
        }

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def select_lineage(
        self, children: Prompts, parent: Int[Tensor, " children"], f: Float[Tensor, " children"],
        xe: Float[Tensor, " children"], lams: Float[Tensor, " members"],
    ) -> Bool[Tensor, " members"]:
        """Member i becomes the best of itself and its own children (`parent == i`) under its penalty
        lams[i]: lineages stay apart. Returns which members' losses improved."""
        loss = -f + lams[parent] * xe
        old = -self.activation + lams * self.xe
        improved = torch.zeros(len(lams), dtype=torch.bool)
        for i in range(len(lams)):
            mine = torch.nonzero(parent == i).flatten()
            if len(mine) == 0:
                continue
            j = mine[int(loss[mine].argmin())]
            if loss[j] < old[i] - 1e-12:
                self.members[i], self.activation[i], self.xe[i] = children[j], f[j], xe[j]
                improved[i] = True
        return improved

    def select(
        self, children: Prompts, f: Float[Tensor, " children"], xe: Float[Tensor, " children"],
        lams: Float[Tensor, " members"],
    ) -> Bool[Tensor, " members"]:
        """Member i becomes the best of the members and the children under its own penalty lams[i]
        (elitist: never worse). Returns which members' losses improved."""
        pool = join(self.members, children)
        pool_f, pool_xe = torch.cat([self.activation, f]), torch.cat([self.xe, xe])
        best = select_members(pool_f, pool_xe, lams)
        old = -self.activation + lams * self.xe
        self.members, self.activation, self.xe = pick(pool, best), pool_f[best], pool_xe[best]
        return -self.activation + lams * self.xe < old - 1e-12
