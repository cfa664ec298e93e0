"""Models for tests and examples that a model spec string can name (`"dreamlens.testing:tiny_model"`),
so a sweep's workers, in other processes, build the same model the tests use."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


def tiny_model() -> HookedTransformer:
    """A tiny random Llama-shaped model: 2 layers, d_model 64, the embedded tokenizer and SmolLM2's
    architecture (GQA, rotary, gated MLP), start token 0. Its weights come from a fixed seed: every call
    builds the same model."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from .models import load_embedded_tokenizer, set_bos_token_id

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
