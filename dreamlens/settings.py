"""Model settings: the TransformerLens weight processing a model was loaded with (fold_ln,
center_writing_weights, ...), what an SAE declares it was trained on, and whether the two agree.

An SAE trained on a processed model (sae-lens's `model_from_pretrained_kwargs`, e.g. gpt2-small-res-jb's
`center_writing_weights=True`) reads other activations on an unprocessed one, and every dream of it is wrong.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from .errors import SettingsError

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

# TransformerLens's processing flags (`HookedTransformer.from_pretrained`): what changes the weights.
PROCESSING = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases", "refactor_factored_attn_matrices")
# Declared by some SAEs, but dreamlens decides where a model lives (device and dtype follow the user): never passed on.
PLACEMENT = ("device", "dtype", "torch_dtype", "n_devices", "device_map", "move_to_device")
_ATTR = "dreamlens_model_settings"
_NAME_ATTR = "dreamlens_model_name"
_LN = ("LN", "LNPre")


@dataclass(frozen=True)
class ModelSettings:
    """The weight processing a model was loaded with. All off is dreamlens's default, and what sae-lens trains
    SAEs on (`from_pretrained_no_processing`, plus the SAE's `model_from_pretrained_kwargs`)."""

    fold_ln: bool = False
    center_writing_weights: bool = False
    center_unembed: bool = False
    fold_value_biases: bool = False
    refactor_factored_attn_matrices: bool = False

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, bool):
                raise SettingsError(f"the model setting {f.name} must be True or False, got {value!r}")

    @classmethod
    def of(cls, kwargs: Mapping[str, Any]) -> ModelSettings:
        """The processing flags among `kwargs` (other keys are ignored; flags not named are off)."""
        return cls(**{k: kwargs[k] for k in PROCESSING if k in kwargs})

    def as_kwargs(self) -> dict[str, bool]:
        """All five flags, as `from_pretrained` / `load_and_process_state_dict` take them."""
        return {k: getattr(self, k) for k in PROCESSING}

    def describe(self) -> str:
        """The flags that are on, e.g. "center_writing_weights=True" ("no processing" when none)."""
        on = [f"{k}=True" for k in PROCESSING if getattr(self, k)]
        return ", ".join(on) or "no processing"


def split_settings(kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """`kwargs` parted into processing flags and everything else."""
    flags = {k: v for k, v in kwargs.items() if k in PROCESSING}
    return flags, {k: v for k, v in kwargs.items() if k not in PROCESSING}


# ---------------------------------------------------------------------------------------------
# What an SAE declares


def sae_model_settings(sae: Any) -> dict[str, Any]:
    """How the SAE's model must be loaded: its `cfg.metadata.model_from_pretrained_kwargs` (a copy; {} when it
    declares nothing), as sae-lens stores it for pretrained releases and local folders alike."""
    meta = getattr(getattr(sae, "cfg", None), "metadata", None)
    declared = getattr(meta, "model_from_pretrained_kwargs", None) if meta is not None else None
    if declared is None:
        declared = getattr(getattr(sae, "cfg", None), "model_from_pretrained_kwargs", None)
    if declared is not None and not isinstance(declared, Mapping):
        raise SettingsError(
            f"the SAE's model_from_pretrained_kwargs must be a dict of from_pretrained options, got {declared!r}"
        )
    return dict(declared or {})


def sae_settings(sae: Any) -> ModelSettings:
    """The weight processing the SAE was trained on (its declared flags; the rest off)."""
    return ModelSettings.of(sae_model_settings(sae))


def sae_model_name(sae: Any) -> str | None:
    """The model the SAE was trained on (`cfg.metadata.model_name`), if it says."""
    meta = getattr(getattr(sae, "cfg", None), "metadata", None)
    name = getattr(meta, "model_name", None) if meta is not None else None
    return str(name) if name else None


# ---------------------------------------------------------------------------------------------
# What a model was loaded with


def set_model_settings(model: HookedTransformer, settings: ModelSettings | None = None, *, name: str | None = None,
                       **flags: bool) -> None:
    """Record the processing `model` was loaded with (`load_model` does; call it for a model built elsewhere,
    so SAE objectives can be checked against it). `name`: how to load it again, for error messages."""
    unknown = sorted(set(flags) - set(PROCESSING))
    if unknown:
        raise SettingsError(f"unknown model setting(s) {unknown}; the settings are {', '.join(PROCESSING)}")
    settings = ModelSettings(**{**(settings or ModelSettings()).as_kwargs(), **flags})
    setattr(model, _ATTR, settings)
    if name is not None:
        setattr(model, _NAME_ATTR, str(name))


def model_settings(model: HookedTransformer) -> ModelSettings | None:
    """The processing `model` was loaded with, or None for a model dreamlens did not load (see `infer_settings`)."""
    return getattr(model, _ATTR, None)


def infer_settings(model: HookedTransformer) -> dict[str, bool]:
    """What a model's own config and weights tell of its processing (for a model dreamlens did not load): folded
    layer norms show in `normalization_type` ("LNPre", "RMSPre"); centered writing weights, before a LayerNorm,
    as token embeddings of mean zero. The other flags cannot be read back."""
    norm = model.cfg.normalization_type
    W_E = model.W_E.detach()
    # memoized on the model (objectives are validated before every forward pass), until its embedding changes
    key = (norm, W_E.data_ptr(), W_E._version)
    memo = model.__dict__.get("_dreamlens_inferred")
    if memo is not None and memo[0] == key:
        return dict(memo[1])
    out: dict[str, bool] = {}
    if norm in ("LN", "RMS"):
        out["fold_ln"] = False
    elif norm in ("LNPre", "RMSPre"):
        out["fold_ln"] = True
    if norm in _LN:
        out["center_writing_weights"] = bool(W_E.mean(-1).abs().max() <= 1e-4 * W_E.abs().mean().clamp(min=1e-12))
    model.__dict__["_dreamlens_inferred"] = (key, out)
    return dict(out)


def _matters(model: HookedTransformer, flag: str, hook: str) -> bool:
    """Whether `flag` changes the activations at `hook` of this model. Folding layer norms changes only
    their normalized outputs; centering writing weights, the residual stream of a LayerNorm model (TransformerLens
    skips it otherwise); centering the unembedding, only logits; folding value biases and refactoring the
    factored attention matrices, only values inside attention (its output is the same)."""
    norm = model.cfg.normalization_type
    if flag == "fold_ln":
        return norm is not None and hook.endswith("hook_normalized")
    if flag == "center_writing_weights":
        return norm in _LN
    if flag == "center_unembed":
        return False
    return ".attn." in hook


def _flags(pairs: Mapping[str, bool]) -> str:
    return ", ".join(f"{k}={v}" for k, v in pairs.items())


def settings_mismatch(model: HookedTransformer, sae: Any, hook: str, what: str) -> tuple[str | None, str | None]:
    """(error, warning) for running `sae`, which reads `hook` (and is named `what` in messages), on `model`: an
    error when the model was loaded (or, for a model loaded elsewhere, evidently processed) otherwise than the SAE
    was trained on, in a way that changes the activations at `hook`; a warning when the SAE needs processing
    that a model loaded elsewhere cannot show."""
    need = sae_settings(sae)
    have = model_settings(model)
    name = getattr(model, _NAME_ATTR, None) or model.cfg.model_name  # the latter: TransformerLens's name, a best guess
    how = f"dl.load_model({name!r}, sae=sae)"
    fix_kwargs = ", ".join(f"{k}={getattr(need, k)}" for k in PROCESSING if getattr(need, k))
    if have is not None:
        diff = [k for k in PROCESSING if _matters(model, k, hook) and getattr(need, k) != getattr(have, k)]
        if not diff:
            return None, None
        return (
            f"the SAE {what} was trained on a model loaded with {_flags({k: getattr(need, k) for k in diff})}, but this "
            f"model was loaded with {_flags({k: getattr(have, k) for k in diff})}: the SAE would read other "
            f"activations than it was trained on, and every dream of it would be wrong. Load the model the SAE's way: "
            f"{how}" + (f" (the same as passing {fix_kwargs})" if fix_kwargs else " (no weight processing)"),
            None,
        )
    seen = infer_settings(model)
    diff = [k for k, v in seen.items() if _matters(model, k, hook) and getattr(need, k) != v]
    if diff:
        return (
            f"the SAE {what} was trained on a model loaded with {_flags({k: getattr(need, k) for k in diff})}, but this "
            f"model's weights show {_flags({k: seen[k] for k in diff})} (HookedTransformer.from_pretrained processes "
            f"weights unless told not to): the SAE would read other activations than it was trained on. Load the "
            f"model with {how}; for a model built another way, declare what it was loaded with: "
            "dl.set_model_settings(model, ...)",
            None,
        )
    unseen = [k for k in PROCESSING if k not in seen and _matters(model, k, hook) and getattr(need, k)]
    if unseen:
        return None, (
            f"the SAE {what} needs a model loaded with {_flags(dict.fromkeys(unseen, True))}, which cannot be checked "
            f"on a model dreamlens did not load; load it with {how}, or declare its settings with "
            "dl.set_model_settings(model, ...) to silence this"
        )
    return None, None
