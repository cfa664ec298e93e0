"""Models for tests and examples that a model spec string can name (`"dreamlens.testing:tiny_model"`),
so a sweep's workers, in other processes, build the same model the tests use."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .models import load_embedded_tokenizer, set_bos_token_id

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


def tiny_model() -> HookedTransformer:
    """A tiny random Llama-shaped model: 2 layers, d_model 64, the embedded tokenizer and SmolLM2's
    architecture (GQA, rotary, gated MLP), start token 0. Its weights come from a fixed seed: every call
    builds the same model."""
    # lazy: transformer_lens takes seconds to load; no module imports it at its top
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=2, d_model=64, n_heads=4, n_key_value_heads=2, d_head=16, d_mlp=128, d_vocab=49152,
        n_ctx=64, act_fn="silu", normalization_type="RMS", final_rms=True, positional_embedding_type="rotary",
        rotary_dim=16, rotary_adjacent_pairs=False, gated_mlp=True, original_architecture="LlamaForCausalLM",
        default_prepend_bos=False, tokenizer_prepends_bos=False, seed=0, model_name="tiny-llama",
    )
    model = HookedTransformer(cfg, tokenizer=load_embedded_tokenizer(), default_padding_side="right")
    model.eval()
    set_bos_token_id(model, 0)
    return model


# where `tiny_model_oom`'s simulated out-of-memory strikes
OOM_HOOK = "blocks.0.mlp.hook_post"


def tiny_model_oom() -> HookedTransformer:
    """`tiny_model`, except that a gradient pass (a dream's; not a scan's, nor a check's) that an objective
    reads at `OOM_HOOK` raises torch's `OutOfMemoryError`, whatever its batch size: an objective that does
    not fit on its worker, for the tests of sweeps that go on without it."""
    model = tiny_model()

    def out_of_memory(tensor: torch.Tensor, *, hook: Any) -> None:
        read = any(not h.is_permanent for h in getattr(hook, "fwd_hooks", []))  # an objective's hook, not this one
        if read and tensor.requires_grad:
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated at {OOM_HOOK} by dreamlens.testing:tiny_model_oom)")

    model.add_perma_hook(OOM_HOOK, out_of_memory)
    return model
