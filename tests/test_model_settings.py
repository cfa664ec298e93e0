"""SAEs read what they were trained on: an SAE's declared model settings (sae-lens's
`model_from_pretrained_kwargs`) travel with it from a local folder, `load_model(sae=)` applies them, and an
objective of the SAE on a model loaded otherwise is refused with the fix (local folders only, no hub)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import dreamlens as dl
from dreamlens.objectives import ObjectiveError
from dreamlens.sae import load_sae

HOOK = "blocks.1.hook_resid_post"
TOKENS = torch.tensor([[0, 504, 2644, 2643, 335, 260]])


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory, tokenizer):
    """A tiny random GPT-2 (LayerNorm: centering its writing weights shifts the residual stream), as a Hugging
    Face folder."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("tiny-gpt2")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=49152, n_positions=64, n_ctx=64, n_embd=64, n_layer=2, n_head=4)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def plain(gpt2_folder):
    return dl.load_model(gpt2_folder)


def _sae_folder(tmp_path, name: str, settings: dict | None, model_name: str | None = None, hook: str = HOOK):
    from sae_lens import StandardSAE, StandardSAEConfig

    torch.manual_seed(1)
    cfg = StandardSAEConfig(d_in=64, d_sae=32)
    cfg.metadata.hook_name = hook
    if settings is not None:
        cfg.metadata.model_from_pretrained_kwargs = settings
    if model_name is not None:
        cfg.metadata.model_name = model_name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sae-lens's own note about declared settings
        sae = StandardSAE(cfg)
    sae.save_model(tmp_path / name)
    return tmp_path / name


@pytest.fixture
def centered_sae(tmp_path, gpt2_folder):
    """Like gpt2-small-res-jb: trained on a model loaded with center_writing_weights=True."""
    return _sae_folder(tmp_path, "centered", {"center_writing_weights": True}, model_name=str(gpt2_folder))


def test_load_sae_reads_the_declared_settings_without_sae_lens_warning(centered_sae):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sae = load_sae(centered_sae)
    assert dl.sae_model_settings(sae) == {"center_writing_weights": True}
    assert dl.sae_model_settings(load_sae()) == {}  # the embedded SAE: its model unprocessed


def test_load_model_for_the_sae_applies_its_settings(centered_sae, gpt2_folder, plain):
    sae = load_sae(centered_sae)
    model = dl.load_model(gpt2_folder, sae=sae)
    assert dl.model_settings(model) == dl.ModelSettings(center_writing_weights=True)
    assert dl.model_settings(plain) == dl.ModelSettings()
    with torch.no_grad():
        _, got = model.run_with_cache(TOKENS, names_filter=HOOK)
        _, raw = plain.run_with_cache(TOKENS, names_filter=HOOK)
        # the same model's predictions ...
        torch.testing.assert_close(model(TOKENS).log_softmax(-1), plain(TOKENS).log_softmax(-1), atol=1e-4, rtol=1e-4)
    assert got[HOOK].mean(-1).abs().max() < 1e-5  # ... but the stream the SAE reads is centered
    assert raw[HOOK].mean(-1).abs().max() > 1e-3
    latent = dl.SAELatent(sae, 3, source=str(centered_sae))
    latent.validate(model)
    assert torch.isfinite(latent.evaluate(model, TOKENS)).all()


def test_the_sae_on_a_model_loaded_otherwise_is_refused_with_the_fix(centered_sae, gpt2_folder, plain):
    latent = dl.objective(f"sae:{centered_sae}[3]")  # the string form: loaded by load_sae, checked the same way
    with pytest.raises(ObjectiveError) as e:
        dl.run_objectives(plain, [latent], TOKENS)
    msg = str(e.value)
    for needle in ("center_writing_weights=True", "center_writing_weights=False", f"dl.load_model({str(gpt2_folder)!r}, sae=sae)",
                   "every dream of it would be wrong"):
        assert needle in msg, (needle, msg)


def test_load_model_with_only_the_sae_loads_its_model(centered_sae):
    model = dl.load_model(sae=load_sae(centered_sae))  # metadata.model_name: the folder
    assert model.cfg.original_architecture == "GPT2LMHeadModel"
    assert dl.model_settings(model).center_writing_weights


def test_a_flag_that_contradicts_the_sae_is_refused(centered_sae, gpt2_folder):
    with pytest.raises(dl.ModelLoadError, match=r"center_writing_weights=False contradicts the SAE.*drop center_writing_weights="):
        dl.load_model(gpt2_folder, sae=load_sae(centered_sae), center_writing_weights=False)


def test_processing_flags_as_keywords_are_applied_and_recorded(gpt2_folder):
    model = dl.load_model(gpt2_folder, fold_ln=True)
    assert model.cfg.normalization_type == "LNPre"
    assert dl.model_settings(model) == dl.ModelSettings(fold_ln=True)
    with pytest.raises(ValueError, match="fold_ln must be True or False, got 'yes'"):
        dl.ModelSettings(fold_ln="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"unknown model setting\(s\) \['fold_lm'\]"):
        dl.set_model_settings(model, fold_lm=True)


def test_only_settings_that_change_the_saes_hook_count(tmp_path, gpt2_folder):
    # folding layer norms leaves the residual stream alone: a residual SAE trained without it still fits
    model = dl.load_model(gpt2_folder, fold_ln=True, center_unembed=True)
    plain_sae = load_sae(_sae_folder(tmp_path, "plain", None))
    dl.SAELatent(plain_sae, 0).validate(model)
    ln_sae = load_sae(_sae_folder(tmp_path, "ln", None, hook="blocks.1.ln2.hook_normalized"))
    with pytest.raises(ObjectiveError, match="fold_ln=False, but this model was loaded with fold_ln=True"):
        dl.SAELatent(ln_sae, 0).validate(model)


def test_a_model_loaded_elsewhere_is_checked_by_what_its_weights_show(tmp_path, plain, centered_sae):
    processed = copy.deepcopy(plain)
    del processed.dreamlens_model_settings  # as if loaded by HookedTransformer.from_pretrained
    processed.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)
    assert dl.model_settings(processed) is None
    assert dl.settings.infer_settings(processed) == {"fold_ln": True, "center_writing_weights": True}
    dl.SAELatent(load_sae(centered_sae), 0).validate(processed)  # what gpt2-small-res-jb needs: it fits
    unprocessed_sae = load_sae(_sae_folder(tmp_path, "plain", None))
    with pytest.raises(ObjectiveError, match=r"model's weights show center_writing_weights=True.*set_model_settings"):
        dl.SAELatent(unprocessed_sae, 0).validate(processed)


def test_what_a_model_loaded_elsewhere_cannot_show_is_a_warning(tmp_path, tiny_model):
    model = copy.deepcopy(tiny_model)  # built by hand: no recorded settings
    hook_z = "blocks.1.attn.hook_z"
    sae = load_sae(_sae_folder(tmp_path, "z", {"fold_value_biases": True}, hook=hook_z))
    with pytest.warns(UserWarning, match="fold_value_biases=True, which cannot be checked"):
        dl.SAELatent(sae, 0).validate(model)
    dl.set_model_settings(model, fold_value_biases=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dl.SAELatent(sae, 0).validate(model)
    dl.SAELatent(load_sae(_sae_folder(tmp_path, "r", None, hook="blocks.1.hook_resid_post")), 0).validate(tiny_model)
