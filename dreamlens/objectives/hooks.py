"""Hook points: checking a hook name, probing each hook's shape and position axes (memoized on the
model), and the earliest `stop_at_layer` that computes a set of hooks."""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .errors import ObjectiveError

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


def _layer_of(hook: str) -> int | None:
    """Block index a hook lives in; -1 for embedding hooks; None for hooks after the last block."""
    m = re.match(r"blocks\.(\d+)\.", hook)
    if m:
        return int(m.group(1))
    if hook in ("hook_embed", "hook_pos_embed", "hook_tokens"):
        return -1
    return None


def check_hook(model: HookedTransformer, hook: str, whose: str = "") -> None:
    """ObjectiveError, with the closest hook name as a hint, unless `hook` is in `model.hook_dict`
    (`whose` says where the name came from, e.g. " (the SAE's cfg.metadata.hook_name)")."""
    if isinstance(hook, str) and hook not in model.hook_dict:
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", hook)
        n = model.cfg.n_layers
        if m and int(m.group(1)) >= n and f"blocks.0.{m.group(2)}" in model.hook_dict:  # only the block is wrong
            raise ObjectiveError(f"unknown hook {hook!r}{whose}: the model has {n} blocks (0..{n - 1}); the last "
                                 f"one's is 'blocks.{n - 1}.{m.group(2)}'")
    if not isinstance(hook, str) or hook not in model.hook_dict:
        close = difflib.get_close_matches(str(hook), list(model.hook_dict), n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ObjectiveError(f"unknown hook {hook!r}{whose}{hint} (model.hook_dict lists all hook names)")


@dataclass(frozen=True)
class HookInfo:
    """What a probe found out about one hook: its activation shape and which axes follow the prompt."""

    shape: tuple[int, ...]  # full activation shape for one 2-token prompt
    varying: tuple[int, ...]  # the axes whose size follows the prompt length

    @property
    def kind(self) -> str:
        """'positional' (`[batch, pos, ...]`), 'pattern' (`[batch, head, query, key]`) or 'other'."""
        if self.varying == (1,):
            return "positional"  # [batch, pos, ...]
        if self.varying == (2, 3) and len(self.shape) == 4:
            return "pattern"  # [batch, head, query, key]
        return "other"

    def describe(self) -> str:
        """The shape in words, for error messages."""
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


def hook_info(model: HookedTransformer, hooks: Sequence[str]) -> dict[str, HookInfo]:
    """Shapes and position axes of `hooks`, found by probing 1- and 2-token prompts (memoized on the
    model). The probe tells which axes grow with the prompt: attention patterns have two such axes
    (query and key) and none at axis 1, so they cannot be read as one activation per position."""
    for h in hooks:
        check_hook(model, h)
    memo = model.__dict__.setdefault("_dreamlens_hook_info", {})
    todo = [h for h in dict.fromkeys(hooks) if h not in memo]
    if todo:
        stop = stop_for_hooks(todo)
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
            memo[h] = HookInfo(shape=b, varying=varying)
    return {h: memo[h] for h in hooks}


def hook_shape(model: HookedTransformer, hook: str) -> tuple[int, ...]:
    """Shape of one position's activation at `hook` (e.g. `(d_mlp,)` or `(n_heads, d_head)`)."""
    info = hook_info(model, [hook])[hook]
    if info.kind == "pattern":
        raise ObjectiveError(
            f"{hook} is {info.describe()} (attention from every query position to every key position), "
            f"not one activation per position; address one entry as {hook}[head,query,key]"
        )
    if info.kind == "other":
        raise ObjectiveError(f"{hook} ({info.describe()}) has no position axis at axis 1; it cannot be an objective")
    return info.shape[2:]


def stop_for_hooks(hooks: Sequence[str]) -> int | None:
    """The earliest `stop_at_layer` at which every hook in `hooks` has fired (None: a hook after the
    last block, or no hooks: run the whole model)."""
    layers = [_layer_of(h) for h in hooks]
    if not layers or any(layer is None for layer in layers):
        return None
    return max(layers) + 1  # type: ignore[type-var]  # hook_embed alone: 0, the embedding only
