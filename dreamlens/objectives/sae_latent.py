"""`SAELatent`: one latent of a sae-lens SAE (any architecture), read at the SAE's own hook, after or
before its activation function; latents of one SAE share one encoding per forward pass."""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..sae import sae_neuronpedia_id
from ..settings import settings_mismatch
from .base import Objective, Reduce, as_index, check_reduce, reduce_positions, reduce_suffix
from .errors import ObjectiveError
from .forward import Capture
from .hooks import check_hook, hook_info

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


def _sae_hook(sae: Any) -> str | None:
    meta = getattr(sae.cfg, "metadata", None)
    hook = getattr(meta, "hook_name", None) if meta is not None else None
    return hook or getattr(sae.cfg, "hook_name", None)


_PLACED = "_dreamlens_placed"


def placed_sae(sae: Any, like: Tensor) -> Any:
    """`sae` on the device and in the dtype of the activations `like` it reads: the SAE itself when it is there
    already, else a copy, made once and kept on the SAE (made again when its weights change), so that the
    caller's SAE is never moved and latents of one SAE still share one copy."""
    params = list(sae.parameters())
    if not params or all(p.device == like.device and p.dtype == like.dtype for p in params):
        return sae
    version = tuple((p.data_ptr(), p._version) for p in params)  # in-place edits and reassignments both show
    memo: dict[Any, Any] = sae.__dict__.setdefault(_PLACED, {})
    key = (like.device, like.dtype)
    if key not in memo or memo[key][0] != version:
        del sae.__dict__[_PLACED]  # not part of the copy
        try:
            twin = copy.deepcopy(sae)
        finally:
            sae.__dict__[_PLACED] = memo
        twin.to(device=like.device, dtype=like.dtype)
        for p in twin.parameters():
            p.requires_grad_(False)  # gradients flow to the prompt, never into the SAE
        memo[key] = (version, twin)
    return memo[key][1]


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
        object.__setattr__(self, "reduce", check_reduce(self.reduce))
        object.__setattr__(self, "index", as_index(self.index, "SAE latent index"))
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

    @property
    def neuronpedia_id(self) -> str | None:
        """The SAE's id on Neuronpedia ("MODEL/SOURCE"; this latent's page is at .../INDEX), or None."""
        return sae_neuronpedia_id(self.sae)

    def validate(self, model: HookedTransformer) -> None:
        hook = self.hook
        if not hook:
            raise ObjectiveError(
                "the SAE's cfg.metadata.hook_name is empty, so it does not say where it reads the model; "
                "set it, e.g. sae.cfg.metadata.hook_name = 'blocks.6.hook_resid_post'"
            )
        check_hook(model, hook, whose=" (the SAE's cfg.metadata.hook_name)")
        info = hook_info(model, [hook])[hook]
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
        error, warning = settings_mismatch(model, self.sae, hook, repr(self.source) if self.source else "(in memory)")
        if error:
            raise ObjectiveError(error)
        if warning:
            warnings.warn(warning, stacklevel=3)

    def _encode(self, capture: Capture) -> tuple[Tensor | None, Tensor]:
        key = ("sae", id(self.sae))
        if key not in capture.memo:
            act = capture.acts[self.hook]
            sae = placed_sae(self.sae, act)  # on the model's device, in its dtype
            # hook_z SAEs either flatten the heads themselves or expect us to.
            x = act if getattr(sae, "hook_z_reshaping_mode", False) or act.ndim == 3 else act.flatten(2)
            # Read the pre-activation from the SAE's own hook point, so every architecture works.
            got: dict[str, Any] = {}
            pre_hook = getattr(sae, "hook_sae_acts_pre", None)
            handle = (
                pre_hook.register_forward_hook(lambda m, i, o: got.__setitem__("pre", o))
                if isinstance(pre_hook, torch.nn.Module)
                else None
            )
            try:
                post = sae.encode(x)
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
        x = (pre if self.pre_activation else post)[..., self.index]  # type: ignore[index]  # pre: checked above
        return reduce_positions(x, self.reduce, capture.start)

    def __str__(self) -> str:
        kind = "sae_pre" if self.pre_activation else "sae"
        return f"{kind}:{self.source or '<in-memory>'}[{self.index}]{reduce_suffix(self.reduce)}"
