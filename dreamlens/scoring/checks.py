"""Input checks every optimizer runs before searching: the error they raise (DreamError), sizes that
must fit the vocabulary, and objectives that are constant (zero gradient) on the initial prompts."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from jaxtyping import Int
from torch import Tensor

from ..errors import DreamError  # defined beside the other errors, so the configs need no torch
from ..objectives import SAELatent, run_objectives
from .gradients import onehot_inputs

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from ..objectives import Objective
    from .layout import Layout


def check_vocab_sizes(model: HookedTransformer, **sizes: int) -> None:
    """Refuse a population, children or top-k larger than the model's vocabulary (each draws tokens from it)."""
    V = int(model.cfg.d_vocab)
    for name, value in sizes.items():
        if value > V:
            raise DreamError(f"{name} {value} is larger than the model's vocabulary ({V} tokens); use {name} <= {V}")


def objective_is_constant(
    model: HookedTransformer, objective: Objective, span_ids: Int[Tensor, "batch length"], layout: Layout
) -> bool:
    """True when the objective's one-hot gradient is exactly zero for every row (nothing to climb)."""
    tokens, onehot, embeds = onehot_inputs(model, span_ids, layout)
    values, _ = run_objectives(model, [objective], tokens, embeds=embeds, start=layout.start)
    if not values.requires_grad:
        return True
    (grad,) = torch.autograd.grad(values.sum(), onehot, allow_unused=True)
    return grad is None or bool((grad == 0).all())


def check_not_constant(
    model: HookedTransformer, objective: Objective, span_ids: Int[Tensor, "batch length"], layout: Layout
) -> None:
    """Raise a DreamError, before any search, when the objective has nothing to climb on these prompts."""
    if not objective_is_constant(model, objective, span_ids, layout):
        return
    gated = [o for _, o in objective.terms if isinstance(o, SAELatent) and not o.pre_activation]
    if gated:
        hint = (
            f"an SAE latent ({gated[0]}) is exactly 0 with zero gradient wherever it does not fire (below its "
            "ReLU/JumpReLU threshold or outside the top k): dream its pre-activation instead (the string "
            "form 'sae_pre:...', or SAELatent(..., pre_activation=True)), or start from a text where it "
            "fires (init_text)"
        )
    else:
        hint = "a hook before the tokens can influence it, or a dead unit; pick another target"
    raise DreamError(
        f"the objective {str(objective)!r} has zero gradient for every token of the initial prompts: it is "
        f"constant here ({hint})"
    )
