"""The embedded SAE: it loads offline, matches the embedded model, reconstructs held-out text, dreams."""

from __future__ import annotations

import pytest
import torch

import dreamlens as dl
from dreamlens.errors import SAELoadError
from dreamlens.models import encode
from dreamlens.sae import EMBEDDED_SAE_LATENTS, HELDOUT_DOCUMENTS, embedded_sae_documents, load_sae


@pytest.fixture(scope="module")
def sae():
    return load_sae()


def test_embedded_sae_loads_offline(sae):
    from sae_lens import SAE

    assert isinstance(sae, SAE)
    assert sae.cfg.d_in == 576 and sae.cfg.d_sae >= 4096
    assert sae.W_enc.dtype == torch.float32  # stored as fp16, computed in fp32
    assert sae.cfg.normalize_activations == "none"  # the scale is folded into the weights
    assert sae.cfg.metadata.hook_name.startswith("blocks.")
    assert sae.cfg.metadata.dreamlens_bos_token_id == 0
    assert sae.cfg.metadata.dreamlens_training_tokens >= 2_000_000
    assert load_sae("embedded").cfg.metadata.hook_name == sae.cfg.metadata.hook_name


def test_sae_lens_reads_the_shipped_folder_itself():
    from sae_lens import SAE

    from dreamlens.sae import embedded_sae_dir

    other = SAE.load_from_disk(embedded_sae_dir(), dtype="float32")
    assert torch.equal(other.W_dec, load_sae().W_dec)


def test_shipped_figures_and_latents():
    import json

    from dreamlens.sae import embedded_sae_dir

    figures = json.loads((embedded_sae_dir() / "eval.json").read_text())
    for key in ("explained_variance", "loss_recovered", "l0", "dead_fraction", "training_tokens"):
        assert key in figures
    assert 5 <= len(EMBEDDED_SAE_LATENTS) <= 8
    text = (embedded_sae_dir() / "latents.md").read_text()
    for idx in EMBEDDED_SAE_LATENTS:
        assert f"{idx}" in text


def test_heldout_split_is_disjoint():
    heldout = list(embedded_sae_documents("heldout"))
    assert len(heldout) == sum(HELDOUT_DOCUMENTS.values())
    train = set(embedded_sae_documents("train"))
    assert not train.intersection(heldout)
    with pytest.raises(ValueError, match="'train' or 'heldout'"):
        list(embedded_sae_documents("test"))


def test_local_folder_round_trip(tmp_path):
    from sae_lens import TopKSAE, TopKSAEConfig

    torch.manual_seed(0)
    small = TopKSAE(TopKSAEConfig(d_in=64, d_sae=128, k=4))
    small.cfg.metadata.hook_name = "blocks.1.hook_resid_post"
    small.save_model(tmp_path / "mine")
    back = load_sae(tmp_path / "mine")
    assert torch.equal(back.W_enc, small.W_enc)
    assert back.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    assert load_sae(str(tmp_path / "mine")).cfg.d_sae == 128


def test_bad_folder_and_file(tmp_path):
    with pytest.raises(SAELoadError, match="not a sae-lens SAE: cfg.json, sae_weights.safetensors missing"):
        load_sae(tmp_path)
    (tmp_path / "w.safetensors").write_bytes(b"")
    with pytest.raises(SAELoadError, match="is a file"):
        load_sae(tmp_path / "w.safetensors")
    with pytest.raises(SAELoadError, match="no such SAE folder"):
        load_sae(tmp_path / "missing")


def test_unknown_names_say_what_works():
    with pytest.raises(SAELoadError, match=r"unknown SAE 'embeded'.*load_sae\(\)"):
        load_sae("embeded")
    with pytest.raises(SAELoadError, match=r"Did you mean the release 'gpt2-small-res-jb'"):
        load_sae("gpt2-small-res-j/blocks.8.hook_resid_pre")
    with pytest.raises(SAELoadError, match=r"has no SAE 'blocks.8.hook_resid_pos'.*Did you mean"):
        load_sae("gpt2-small-res-jb/blocks.8.hook_resid_pos")
    with pytest.raises(TypeError, match="name_or_path"):
        load_sae(42)


def test_release_offline_says_it_needs_internet(monkeypatch):
    import sae_lens

    def offline(*args, **kwargs):
        raise ConnectionError("no route to huggingface.co")

    monkeypatch.setattr(sae_lens.SAE, "from_pretrained", offline)
    with pytest.raises(SAELoadError, match="need internet access.*load_sae\\(\\) for the embedded SAE"):
        load_sae("gpt2-small-res-jb/blocks.8.hook_resid_pre")


# ---------------------------------------------------------------------------------------------
# Against the embedded model


def _activations(model, sae, text: str, n_tokens: int = 63) -> torch.Tensor:
    """Raw activations at the SAE's hook for token 0 then `text` (positions after the BOS)."""
    hook = sae.cfg.metadata.hook_name
    toks = torch.tensor([[0] + encode(model, text)[:n_tokens]])
    with torch.no_grad():
        _, cache = model.run_with_cache(toks, names_filter=hook, stop_at_layer=int(hook.split(".")[1]) + 1)
    return cache[hook][0, 1:]


@pytest.mark.integration
def test_sae_matches_the_embedded_model(embedded_model, sae):
    assert sae.cfg.metadata.hook_name in embedded_model.hook_dict
    assert sae.cfg.d_in == embedded_model.cfg.d_model
    assert dl.bos_token_id(embedded_model) == sae.cfg.metadata.dreamlens_bos_token_id


@pytest.mark.integration
def test_reconstructs_a_heldout_passage(embedded_model, sae):
    # Held out: never trained on. Explained variance about the mean of a broad sample of held-out
    # text (one passage's own mean would leave too little variance to explain).
    heldout = list(embedded_sae_documents("heldout"))
    passage = heldout[-1]
    x = _activations(embedded_model, sae, passage)
    assert x.shape[0] >= 40
    ref = torch.cat([_activations(embedded_model, sae, d) for d in heldout[-9:-1]])
    with torch.no_grad():
        f = sae.encode(x)
        x_hat = sae.decode(f)
    ev = 1 - (x - x_hat).pow(2).sum() / (x - ref.mean(0)).pow(2).sum()
    assert ev > 0.7, f"explained variance {ev:.3f} on a held-out passage"
    # raw activations in, raw activations out: the normalization is folded in
    assert (x_hat.norm(dim=-1) / x.norm(dim=-1)).mean() == pytest.approx(1.0, abs=0.15)
    assert ((f > 0).sum(-1) <= sae.cfg.k).all()


@pytest.mark.integration
def test_listed_latents_fire_on_heldout_text(embedded_model, sae):
    # each listed latent fires somewhere in a broad sample of held-out text
    texts = list(embedded_sae_documents("heldout"))[::25]
    with torch.no_grad():
        fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
        for t in texts:
            fired |= (sae.encode(_activations(embedded_model, sae, t)) > 0).any(0)
    silent = [i for i in EMBEDDED_SAE_LATENTS if not fired[i]]
    assert not silent, f"listed latents {silent} never fire on held-out text"


@pytest.mark.integration
def test_dream_one_latent_rises(embedded_model, sae):
    idx = next(iter(EMBEDDED_SAE_LATENTS))
    obj = dl.SAELatent(sae, idx, pre_activation=True)
    cfg = dl.EPOConfig(length=6, population=4, children=8, topk=64, iters=4, restart_every=0, seed=0)
    dream = dl.epo(embedded_model, obj, cfg, progress=False)
    initial = dream.activation[dream.iteration == 0].max()
    assert dream.activation.max() > initial
