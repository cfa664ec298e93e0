"""Device and dtype end to end: a dream of a bfloat16 model (xe and activations summed in float32, matching a
float32 recomputation), SAEs and directions read on the model's device and in its dtype, the default device
and dtype (arguments, environment, CUDA when there is one), the CLI's --device/--dtype, and batch sizing with
an out-of-memory back-off in a whole dream."""

from __future__ import annotations

import copy
import re
import types
import warnings

import numpy as np
import pytest
import torch
from conftest import assert_one_error_line, run_cli

import dreamlens as dl
from dreamlens import scoring
from dreamlens.devices import resolve_device, resolve_dtype
from dreamlens.errors import DeviceError
from dreamlens.objectives.base import reduce_positions

pytestmark = pytest.mark.usefixtures("one_thread")

OBJ = "blocks.1.mlp.hook_post[3]"
HOOK = "blocks.1.hook_resid_post"
SMALL = dict(length=6, population=4, children=8, topk=64, iters=4, restart_every=3, seed=0)
# bfloat16 keeps 8 bits of mantissa: the tiny model's activations and xe move by about 1e-2 against float32
XE_TOL = 0.05  # nats
VALUE_TOL = 0.05  # relative to 1 + |value|


@pytest.fixture(scope="module")
def bf16_model(tiny_model):
    return copy.deepcopy(tiny_model).to(torch.bfloat16, print_details=False)


@pytest.fixture(scope="module")
def sae(tmp_path_factory):
    from sae_lens import StandardSAE, StandardSAEConfig

    torch.manual_seed(2)
    cfg = StandardSAEConfig(d_in=64, d_sae=32)
    cfg.metadata.hook_name = HOOK
    folder = tmp_path_factory.mktemp("sae") / "sae"
    StandardSAE(cfg).save_model(folder)
    return dl.load_sae(folder, device="cpu", dtype="float32")


def _close(got, want, tol):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert np.all(np.abs(got - want) <= tol * (1 + np.abs(want))), (got, want)


def test_a_bf16_dream_runs_and_its_xe_matches_a_float32_recomputation(bf16_model, tiny_model):
    assert bf16_model.cfg.dtype == torch.bfloat16
    result = dl.epo(bf16_model, OBJ, dl.EPOConfig(**SMALL), progress=False)
    assert isinstance(result, dl.DreamResult) and len(result) > 0
    assert result.xe.dtype == np.float64 and np.isfinite(result.xe).all()
    layout = scoring.make_layout(tiny_model, SMALL["length"])
    values, xe = scoring.score(tiny_model, [dl.objective(OBJ)], torch.as_tensor(result.ids), layout)
    assert np.abs(result.xe - xe.double().cpu().numpy()).max() <= XE_TOL
    _close(result.activation, values[0].double().cpu().numpy(), VALUE_TOL)


def test_scores_of_a_bf16_model_are_float32(bf16_model):
    layout = scoring.make_layout(bf16_model, 6)
    ids = torch.randint(300, 3000, (5, 6), generator=torch.Generator().manual_seed(0))
    values, xe = scoring.score(bf16_model, [dl.objective(OBJ), dl.objective(f"{HOOK}[2]@mean")], ids, layout)
    assert values.dtype == torch.float32 and xe.dtype == torch.float32
    x = torch.randn(3, 7).to(torch.bfloat16)
    for how in ("last", "max", "mean", 2):
        assert reduce_positions(x, how, 1).dtype == torch.float32


def test_the_sae_is_read_on_the_models_dtype_and_the_callers_sae_is_not_moved(sae, bf16_model, tiny_model):
    tokens = torch.tensor([[0, 504, 2644, 2643, 335, 260]])
    latent = dl.SAELatent(sae, 3, reduce="mean")
    other = dl.SAELatent(sae, 5)
    got = latent.evaluate(bf16_model, tokens)
    assert got.dtype == torch.float32
    assert sae.W_enc.dtype == torch.float32 and sae.W_enc.device.type == "cpu"  # untouched
    placed = sae.__dict__["_dreamlens_placed"]
    ((key, (_, twin)),) = placed.items()
    assert key == (bf16_model.W_E.device, torch.bfloat16) and twin.W_enc.dtype == torch.bfloat16
    other.evaluate(bf16_model, tokens)
    assert placed[key][1] is twin  # latents of one SAE share one copy
    _close(got.cpu().numpy(), latent.evaluate(tiny_model, tokens).cpu().numpy(), VALUE_TOL)
    with torch.no_grad():
        sae.W_enc.mul_(2.0)  # the caller edits the SAE: the copy is made again
    try:
        latent.evaluate(bf16_model, tokens)
        assert placed[key][1] is not twin
    finally:
        with torch.no_grad():
            sae.W_enc.div_(2.0)


def test_a_direction_is_summed_in_float32(bf16_model, tmp_path):
    vec = torch.randn(64, generator=torch.Generator().manual_seed(4))
    torch.save(vec, tmp_path / "v.pt")
    direction = dl.objective(f"dir:{HOOK}:{tmp_path / 'v.pt'}")
    tokens = torch.tensor([[0, 504, 2644, 2643]])
    got = direction.evaluate(bf16_model, tokens)
    with torch.no_grad():
        _, cache = bf16_model.run_with_cache(tokens, names_filter=HOOK)
    want = cache[HOOK][:, -1].float() @ vec.to(cache[HOOK].device)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Defaults and names


def test_device_and_dtype_defaults_and_names(monkeypatch):
    monkeypatch.delenv("DREAMLENS_DEVICE", raising=False)
    monkeypatch.delenv("DREAMLENS_DTYPE", raising=False)
    assert resolve_device() == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype() == torch.float32
    assert resolve_dtype("bf16") == resolve_dtype("torch.bfloat16") == resolve_dtype(torch.bfloat16) == torch.bfloat16
    monkeypatch.setenv("DREAMLENS_DTYPE", "float16")
    monkeypatch.setenv("DREAMLENS_DEVICE", "cpu")
    assert resolve_dtype() == torch.float16 and resolve_device() == torch.device("cpu")
    assert resolve_dtype("float32") == torch.float32  # an argument wins over the environment
    monkeypatch.setenv("DREAMLENS_DTYPE", "bf17")
    with pytest.raises(DeviceError, match=r"unknown \$DREAMLENS_DTYPE 'bf17' \(did you mean 'bf16'\?\)"):
        resolve_dtype()
    with pytest.raises(DeviceError, match="not a floating-point dtype"):
        resolve_dtype(torch.int64)
    with pytest.raises(DeviceError, match=r"unknown device 'gpu0'; use 'cpu', 'cuda'"):
        resolve_device("gpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_cuda_without_a_gpu_is_refused_before_anything_loads(capsys, monkeypatch):
    with pytest.raises(DeviceError, match="CUDA is not available here.*use 'cpu'"):
        resolve_device("cuda")
    rc, _, err = run_cli(capsys, "info", "--device", "cuda")
    assert_one_error_line(rc, err, "--device", "CUDA is not available")


def test_cli_passes_device_and_dtype_to_load_model(capsys, monkeypatch, tiny_model):
    from dreamlens import models

    asked: list[dict] = []
    monkeypatch.setattr(models, "load_model", lambda name=None, **k: asked.append(k) or tiny_model)
    rc, _, err = run_cli(capsys, "info", "--tokens", "1", "--device", "cpu", "--dtype", "bf16")
    assert rc == 0, err
    assert asked == [{"device": "cpu", "dtype": "bfloat16"}]
    rc, _, err = run_cli(capsys, "info", "--dtype", "float8")
    assert_one_error_line(rc, err, "--dtype", "unknown dtype 'float8'")
    rc, _, _ = run_cli(capsys, "info", "--tokens", "1")
    assert asked[-1] == {}  # load_model's defaults


def test_load_model_follows_the_environment(monkeypatch, tmp_path, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    monkeypatch.setenv("DREAMLENS_DTYPE", "bfloat16")
    model = dl.load_model(tmp_path)
    assert model.cfg.dtype == torch.bfloat16 and model.W_E.dtype == torch.bfloat16
    assert dl.load_model(tmp_path, dtype="float32").W_E.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# Batch sizes and out-of-memory


def test_batch_sizes_follow_free_memory_and_dtype(monkeypatch, tiny_model):
    from dreamlens.scoring import batching

    def fake(device: str, dtype: torch.dtype):
        cfg = copy.copy(tiny_model.cfg)
        cfg.device, cfg.dtype = device, dtype
        return types.SimpleNamespace(cfg=cfg)

    monkeypatch.setattr(batching, "_free_memory", lambda device: 8 << 30)
    gpu32 = batching.estimate_batch_tokens(fake("cuda", torch.float32), 16)
    gpu16 = batching.estimate_batch_tokens(fake("cuda", torch.bfloat16), 16)
    cpu32 = batching.estimate_batch_tokens(fake("cpu", torch.float32), 16)
    assert gpu16 == pytest.approx(2 * gpu32, rel=0.01)  # half the bytes per activation: twice the tokens
    assert gpu32 > cpu32  # 40% of a GPU's free memory, at most 512 MiB on a CPU
    assert batching.estimate_batch_tokens(fake("cuda", torch.float32), 16, grad=True) < gpu32
    monkeypatch.setattr(batching, "_free_memory", lambda device: 1 << 30)
    assert batching.estimate_batch_tokens(fake("cuda", torch.float32), 16) < gpu32
    assert batching.call_cost_tokens(fake("cuda", torch.float32)) > batching.call_cost_tokens(fake("cpu", torch.float32))


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory (simulated)"),
                                   RuntimeError("CUDA error: out of memory (simulated)")])
def test_a_dream_on_a_device_that_runs_out_of_memory_backs_off_and_scores_right(tiny_model, error):
    assert scoring.is_oom(error) and not scoring.is_oom(RuntimeError("shape mismatch"))
    limit = 5  # prompts per pass this "device" holds

    def fail(act, hook):
        if act.shape[0] > limit:
            raise error

    config = dl.EPOConfig(**SMALL, batch_size=64)
    with tiny_model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", fail)]), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        result = dl.epo(tiny_model, OBJ, config, progress=False)
    (halved,) = [str(w.message) for w in seen if "out of memory" in str(w.message)]  # warned once
    before, after = (int(n) for n in re.findall(r"\d+", halved)[:2])
    assert before > limit and after == before // 2
    assert len(result) > SMALL["population"]
    # every prompt's recorded value and xe are what an unfailed pass gives it
    layout = scoring.make_layout(tiny_model, SMALL["length"])
    values, xe = scoring.score(tiny_model, [dl.objective(OBJ)], torch.as_tensor(result.ids), layout)
    np.testing.assert_allclose(result.activation, values[0].double().cpu().numpy(), atol=1e-4)
    np.testing.assert_allclose(result.xe, xe.double().cpu().numpy(), atol=1e-4)
    # and the run is the one an unfailed device gives: rows are independent, only the pass sizes differ (CPU
    # kernels round a row alike in any batch; GPU kernels may not, so there the check above is the one)
    if torch.device(tiny_model.cfg.device).type == "cpu":
        again = dl.epo(tiny_model, OBJ, config, progress=False)
        assert again.frontier["text"].tolist() == result.frontier["text"].tolist()
