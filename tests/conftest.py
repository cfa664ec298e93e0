"""Shared fixtures: a tiny random Llama-shaped model (fast unit tests) and the embedded model."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def tokenizer():
    from dreamlens.models import load_embedded_tokenizer

    return load_embedded_tokenizer()


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): the tiny
    model's ops are too small to split, and a second thread only spins on a busy CPU (5x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    """2 layers, d_model 64, the embedded tokenizer and SmolLM2's architecture (GQA, rotary, gated)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from dreamlens.models import set_bos_token_id

    cfg = HookedTransformerConfig(
        n_layers=2, d_model=64, n_heads=4, n_key_value_heads=2, d_head=16, d_mlp=128, d_vocab=49152,
        n_ctx=64, act_fn="silu", normalization_type="RMS", final_rms=True, positional_embedding_type="rotary",
        rotary_dim=16, rotary_adjacent_pairs=False, gated_mlp=True, original_architecture="LlamaForCausalLM",
        default_prepend_bos=False, tokenizer_prepends_bos=False, seed=0, model_name="tiny-llama",
    )
    model = HookedTransformer(cfg, tokenizer=tokenizer, default_padding_side="right")
    model.eval()
    set_bos_token_id(model, 0)
    return model


@pytest.fixture(scope="session")
def embedded_model():
    from dreamlens.models import load_model

    return load_model()


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0
