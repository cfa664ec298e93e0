"""Objectives: values against independent `run_with_cache` computations, one-hot gradients against
finite differences, early-stopped against full forwards, the string form, and every bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import dreamlens as dl
from dreamlens.objectives import (
    Combination,
    Direction,
    Logit,
    LogitDiff,
    Neuron,
    NonFiniteError,
    ObjectiveError,
    SAELatent,
    hook_shape,
    objective,
    run_objectives,
    stop_at_layer,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------------------------------------
# Helpers


def make_tokens(n_rows: int, length: int, seed: int, bos: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, 40_000, (n_rows, length), generator=g)
    return torch.cat([torch.zeros(n_rows, 1, dtype=torch.long), ids], dim=1) if bos else ids


def make_sae(arch: str, hook: str, d_in: int, *, d_sae: int = 128, seed: int = 0, reshape: str = "none"):
    """A small sae-lens SAE with random weights (and biases, and thresholds), built offline."""
    import sae_lens
    from sae_lens.saes.sae import SAEMetadata

    classes = {
        "standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig, {}),
        "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig, {"k": 8}),
        "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig, {}),
    }
    cls, cfg_cls, extra = classes[arch]
    meta = SAEMetadata(hook_name=hook, model_name="tiny-llama")
    sae = cls(cfg_cls(d_in=d_in, d_sae=d_sae, reshape_activations=reshape, metadata=meta, **extra))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name == "threshold":
                p.copy_(torch.rand(p.shape, generator=g) * 0.05)
            elif name.startswith("W_"):
                p.copy_(torch.randn(p.shape, generator=g) / d_in**0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return sae


def manual_sae(sae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-activation and latents computed by hand from the weights (no sae-lens forward)."""
    x = x.flatten(2).to(sae.W_enc.dtype)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    arch = sae.cfg.architecture()
    if arch == "standard":
        post = pre.relu()
    elif arch == "jumprelu":
        post = pre.relu() * (pre > sae.threshold)
    else:
        top = pre.topk(sae.cfg.k, dim=-1)
        post = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    return pre, post


class Counter:
    """A forward hook that counts calls (to show which blocks a forward pass ran)."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, act, hook):
        self.n += 1


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def tokens():
    return make_tokens(3, 6, seed=1)


@pytest.fixture(scope="module")
def cache(model, tokens):
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    return cache, logits


@pytest.fixture(scope="module")
def model64(tiny_model):
    """A float64 copy of the tiny model (the session fixture is never mutated; the tokenizer is shared)."""
    m = copy.deepcopy(tiny_model, memo={id(tiny_model.tokenizer): tiny_model.tokenizer})
    return m.to(torch.float64, print_details=False)


# ---------------------------------------------------------------------------------------------
# Values against independent computations


NEURON_CASES = {
    "blocks.0.mlp.hook_post[5]": lambda c: c["blocks.0.mlp.hook_post"][:, -1, 5],
    "blocks.1.hook_resid_post[3]@max": lambda c: c["blocks.1.hook_resid_post"][:, 1:, 3].max(dim=1).values,
    "blocks.1.mlp.hook_pre[7]@mean": lambda c: c["blocks.1.mlp.hook_pre"][:, 1:, 7].mean(dim=1),
    "blocks.0.hook_resid_mid[2]@0": lambda c: c["blocks.0.hook_resid_mid"][:, 1, 2],
    "blocks.0.hook_resid_mid[2]@-2": lambda c: c["blocks.0.hook_resid_mid"][:, -2, 2],
    "blocks.1.attn.hook_z[3,10]": lambda c: c["blocks.1.attn.hook_z"][:, -1, 3, 10],
    "blocks.0.attn.hook_k[1,4]@2": lambda c: c["blocks.0.attn.hook_k"][:, 3, 1, 4],
    "hook_embed[9]@mean": lambda c: c["hook_embed"][:, 1:, 9].mean(dim=1),
    "blocks.0.ln1.hook_scale[0]": lambda c: c["blocks.0.ln1.hook_scale"][:, -1, 0],
    "blocks.0.attn.hook_pattern[2,-1,0]": lambda c: c["blocks.0.attn.hook_pattern"][:, 2, -1, 0],
    "blocks.1.attn.hook_attn_scores[1,4,2]": lambda c: c["blocks.1.attn.hook_attn_scores"][:, 1, 4, 2],
    "ln_final.hook_normalized[4]@max": lambda c: c["ln_final.hook_normalized"][:, 1:, 4].max(dim=1).values,
    "unembed.hook_out[1234]@mean": lambda c: c["unembed.hook_out"][:, 1:, 1234].mean(dim=1),
}


@pytest.mark.parametrize("spec", list(NEURON_CASES))
def test_neuron_matches_run_with_cache(model, tokens, cache, spec):
    obj = objective(spec)
    assert isinstance(obj, Neuron) and str(obj) == spec
    got = obj.evaluate(model, tokens)
    assert got.shape == (tokens.shape[0],) and got.dtype == torch.float32 and not got.requires_grad
    torch.testing.assert_close(got, NEURON_CASES[spec](cache[0]), rtol=1e-5, atol=1e-6)


def test_neuron_constructor_equals_string(model, tokens):
    a = dl.objective("blocks.1.attn.hook_z[3,10]@max")
    b = dl.Neuron("blocks.1.attn.hook_z", (3, 10), reduce="max")
    assert str(a) == str(b)
    torch.testing.assert_close(a.evaluate(model, tokens), b.evaluate(model, tokens))


def test_without_start_token_positions_count_from_zero(model, cache):
    toks = make_tokens(2, 5, seed=2, bos=False)
    _, c = model.run_with_cache(toks)
    got = objective("blocks.0.mlp.hook_post[3]@max").evaluate(model, toks)
    torch.testing.assert_close(got, c["blocks.0.mlp.hook_post"][:, :, 3].max(dim=1).values)
    got = objective("blocks.0.mlp.hook_post[3]@0").evaluate(model, toks)
    torch.testing.assert_close(got, c["blocks.0.mlp.hook_post"][:, 0, 3])
    # an explicit start overrides the default
    got = objective("blocks.0.mlp.hook_post[3]@mean").evaluate(model, toks, start=2)
    torch.testing.assert_close(got, c["blocks.0.mlp.hook_post"][:, 2:, 3].mean(dim=1))


def test_direction_matches_run_with_cache(model, tokens, cache):
    c = cache[0]
    g = torch.Generator().manual_seed(3)
    v = torch.randn(64, generator=g)
    got = Direction("blocks.1.hook_resid_post", v).evaluate(model, tokens)
    torch.testing.assert_close(got, c["blocks.1.hook_resid_post"][:, -1] @ v)
    got = Direction("blocks.0.hook_attn_out", v, reduce="max").evaluate(model, tokens)
    torch.testing.assert_close(got, (c["blocks.0.hook_attn_out"][:, 1:] @ v).max(dim=1).values)
    # a direction over all heads of hook_z: n_heads * d_head entries, heads flattened
    w = torch.randn(4 * 16, generator=g)
    got = Direction("blocks.0.attn.hook_z", w, reduce=1).evaluate(model, tokens)
    torch.testing.assert_close(got, c["blocks.0.attn.hook_z"][:, 2].flatten(1) @ w)


def test_logits_match_run_with_cache(model, tokens, cache):
    logits = cache[1][:, -1]
    paris, london = dl.encode(model, " Paris")[0], dl.encode(model, " London")[0]
    torch.testing.assert_close(objective('logit[" Paris"]').evaluate(model, tokens), logits[:, paris])
    torch.testing.assert_close(Logit(london).evaluate(model, tokens), logits[:, london])
    torch.testing.assert_close(
        LogitDiff(" Paris", " London").evaluate(model, tokens), logits[:, paris] - logits[:, london]
    )


SAE_CASES = [
    ("standard", "blocks.1.hook_resid_pre", "none"),
    ("topk", "blocks.0.mlp.hook_post", "none"),
    ("jumprelu", "blocks.1.hook_resid_post", "none"),
    ("standard", "blocks.1.attn.hook_z", "none"),  # d_in = n_heads * d_head, flattened by us
    ("jumprelu", "blocks.0.attn.hook_z", "hook_z"),  # the SAE flattens the heads itself
]


@pytest.mark.parametrize("arch,hook,reshape", SAE_CASES)
def test_sae_latents_match_manual_encoding(model, tokens, cache, arch, hook, reshape):
    c = cache[0]
    sae = make_sae(arch, hook, math.prod(hook_shape(model, hook)), reshape=reshape)
    pre, post = manual_sae(sae, c[hook])
    assert (post[:, -1] != 0).any(), "the random SAE should have active latents"
    # all latents at once, post and pre, last and max: one forward, one encoding
    objs = [SAELatent(sae, i) for i in range(sae.cfg.d_sae)]
    objs += [SAELatent(sae, i, pre_activation=True, reduce="max") for i in range(0, sae.cfg.d_sae, 7)]
    values, _ = run_objectives(model, objs, tokens)
    n = sae.cfg.d_sae
    torch.testing.assert_close(values[:n], post[:, -1].T, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(values[n:], pre[:, 1:, ::7].max(dim=1).values.T, rtol=1e-5, atol=1e-6)
    # stopped early, the same numbers as through the whole model
    full, _ = run_objectives(model, objs, tokens, final_from=0)
    torch.testing.assert_close(values, full)


def test_run_objectives_many_equals_one_by_one(model, tokens):
    sae = make_sae("standard", "blocks.0.hook_resid_post", 64)
    v = torch.randn(64, generator=torch.Generator().manual_seed(4))
    objs = [
        Neuron("blocks.0.mlp.hook_post", 1),
        Neuron("blocks.1.mlp.hook_post", 2, reduce="mean"),
        Neuron("blocks.0.attn.hook_pattern", (1, -1, 1)),
        SAELatent(sae, 5),
        SAELatent(sae, 6, pre_activation=True),
        Direction("blocks.1.hook_resid_mid", v, reduce="max"),
        Logit(" Paris"),
        LogitDiff(" the", " a"),
        Neuron("blocks.0.mlp.hook_post", 1) - 0.5 * Logit(" Paris"),
    ]
    together, final = run_objectives(model, objs, tokens)
    assert together.shape == (len(objs), tokens.shape[0]) and final is None
    one_by_one = torch.stack([o.evaluate(model, tokens) for o in objs])
    torch.testing.assert_close(together, one_by_one, rtol=1e-5, atol=1e-6)


def test_combination_is_the_weighted_sum(model, tokens):
    a = Neuron("blocks.0.mlp.hook_post", 1)
    b = Neuron("blocks.1.hook_resid_post", 3, reduce="max")
    c = Logit(" Paris")
    va, vb, vc = (o.evaluate(model, tokens) for o in (a, b, c))
    combo = a - 0.5 * b + 2 * c
    assert isinstance(combo, Combination)
    assert [coef for coef, _ in combo.terms] == [1.0, -0.5, 2.0]
    torch.testing.assert_close(combo.evaluate(model, tokens), va - 0.5 * vb + 2 * vc)
    torch.testing.assert_close((-a).evaluate(model, tokens), -va)
    torch.testing.assert_close((a / 4).evaluate(model, tokens), va / 4)
    torch.testing.assert_close(sum([a, b]).evaluate(model, tokens), va + vb)
    # nested combinations flatten into one weighted sum
    nested = Combination([(2.0, a - b), (-1.0, Combination([(3.0, c)]))])
    assert [(coef, str(o)) for coef, o in nested.terms] == [(2.0, str(a)), (-2.0, str(b)), (-3.0, str(c))]
    torch.testing.assert_close(nested.evaluate(model, tokens), 2 * va - 2 * vb - 3 * vc)
    # the string form round-trips, values included
    again = objective(str(combo))
    assert str(again) == str(combo) == 'blocks.0.mlp.hook_post[1] - 0.5*blocks.1.hook_resid_post[3]@max + 2*logit[" Paris"]'
    torch.testing.assert_close(again.evaluate(model, tokens), combo.evaluate(model, tokens))


# ---------------------------------------------------------------------------------------------
# Early stopping


def test_stop_at_layer_is_the_deepest_hook(model):
    assert stop_at_layer(model, [objective("hook_embed[0]")]) == 0
    assert objective("blocks.0.mlp.hook_post[0]").stop_at_layer(model) == 1
    assert objective("blocks.0.mlp.hook_post[0] + blocks.1.attn.hook_z[0,0]").stop_at_layer(model) == 2
    assert objective("ln_final.hook_normalized[0]").stop_at_layer(model) is None
    assert objective('blocks.0.mlp.hook_post[0] + logit[" Paris"]').stop_at_layer(model) is None
    sae = make_sae("standard", "blocks.0.hook_resid_post", 64)
    assert SAELatent(sae, 0).stop_at_layer(model) == 1


def test_early_stopped_forward_runs_fewer_blocks_with_the_same_targets(model, tokens):
    objs = [objective("blocks.0.mlp.hook_post[3]@max"), objective("blocks.0.attn.hook_z[1,2]"), objective("hook_embed[4]@1")]
    hook_shape(model, "blocks.0.mlp.hook_post")  # warm the shape probe, so only the real passes count
    hook_shape(model, "blocks.0.attn.hook_z")
    hook_shape(model, "hook_embed")
    later, final_norm = Counter(), Counter()
    with model.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", later), ("ln_final.hook_normalized", final_norm)]):
        stopped, _ = run_objectives(model, objs, tokens)
        assert later.n == 0 and final_norm.n == 0
        full, final = run_objectives(model, objs, tokens, final_from=2)
        assert later.n == 1 and final_norm.n == 1
    torch.testing.assert_close(stopped, full, rtol=0, atol=0)
    assert final.shape == (tokens.shape[0], tokens.shape[1] - 2, model.cfg.d_model)
    # and the final residual equals the model's own ln_final output
    _, c = model.run_with_cache(tokens, names_filter="ln_final.hook_normalized")
    torch.testing.assert_close(final, c["ln_final.hook_normalized"][:, 2:])


# ---------------------------------------------------------------------------------------------
# Gradients through one-hot inputs against finite differences (float64)


def onehot_gradient(model, obj, tokens, start=1):
    """d obj / d one-hot of tokens[:, start:], as the optimizers compute it (embeddings via hook_embed)."""
    W_E = model.embed.W_E
    onehot = F.one_hot(tokens[:, start:], W_E.shape[0]).to(W_E.dtype).requires_grad_(True)
    with torch.no_grad():
        base = model.embed(tokens)
    embeds = torch.cat([base[:, :start], onehot @ W_E], dim=1)
    values, _ = run_objectives(model, [obj], tokens, embeds=embeds)
    (grad,) = torch.autograd.grad(values[0].sum(), onehot)
    return grad, base


def _fd_objective(model, name: str, toks: torch.Tensor):
    g = torch.Generator().manual_seed(5)
    if name == "sae":  # a ReLU latent that is on at the last position (off, its gradient is just 0)
        sae = make_sae("standard", "blocks.1.hook_resid_pre", 64, seed=1).to(torch.float64)
        post = run_objectives(model, [SAELatent(sae, i) for i in range(sae.cfg.d_sae)], toks)[0][:, 0]
        assert post.max() > 0
        return SAELatent(sae, int(post.argmax()))
    if name == "sae_pre":
        jump = make_sae("jumprelu", "blocks.0.attn.hook_z", 64, seed=2, reshape="hook_z").to(torch.float64)
        return SAELatent(jump, 9, pre_activation=True)
    return {
        "neuron": lambda: Neuron("blocks.1.mlp.hook_post", 11),
        "neuron_mean": lambda: Neuron("blocks.0.hook_resid_post", 7, reduce="mean"),
        "neuron_max": lambda: Neuron("blocks.1.mlp.hook_pre", 3, reduce="max"),
        "hook_z": lambda: Neuron("blocks.1.attn.hook_z", (2, 5), reduce=2),
        "pattern": lambda: Neuron("blocks.1.attn.hook_pattern", (3, -1, 2)),
        "direction": lambda: Direction("blocks.1.hook_resid_post", torch.randn(64, generator=g, dtype=torch.float64)),
        "logit": lambda: Logit(" Paris"),
        "logitdiff": lambda: LogitDiff(" Paris", " London"),
        "combination": lambda: Neuron("blocks.0.mlp.hook_post", 4) - 0.5 * Logit(" the"),
    }[name]()


@pytest.mark.parametrize(
    "name", ["neuron", "neuron_mean", "neuron_max", "hook_z", "pattern", "direction", "logit", "logitdiff",
             "sae", "sae_pre", "combination"],
)
def test_onehot_gradient_matches_finite_differences(model64, name):
    toks = make_tokens(1, 6, seed=6)
    obj = _fd_objective(model64, name, toks)
    grad, base = onehot_gradient(model64, obj, toks)
    W_E = model64.embed.W_E.detach()
    g = torch.Generator().manual_seed(7)
    h = 1e-5
    for p in (0, 2, 5):  # span positions (sequence positions 1, 3, 6)
        old = int(toks[0, 1 + p])
        new = int(torch.randint(100, 40_000, (1,), generator=g))
        analytic = float(grad[0, p, new] - grad[0, p, old])  # the directional derivative e_new - e_old

        def along(t: float, p: int = p, new: int = new, old: int = old) -> float:
            e = base.clone()
            e[0, 1 + p] += t * (W_E[new] - W_E[old])
            with torch.no_grad():
                return float(run_objectives(model64, [obj], toks, embeds=e)[0][0, 0])

        numeric = (along(h) - along(-h)) / (2 * h)
        assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(analytic)), (p, numeric, analytic)
    assert grad.abs().sum() > 0


def test_values_keep_float64(model64):
    toks = make_tokens(2, 4, seed=8)
    got = objective("blocks.0.mlp.hook_post[1]").evaluate(model64, toks)
    assert got.dtype == torch.float64


# ---------------------------------------------------------------------------------------------
# The string form


ROUND_TRIP = [
    "blocks.6.mlp.hook_post[123]",
    "blocks.3.attn.hook_z[4,10]",
    "blocks.3.attn.hook_z[4,10]@max",
    "blocks.0.hook_resid_post[5]@mean",
    "blocks.0.hook_resid_post[5]@3",
    "blocks.0.hook_resid_post[5]@-2",
    "blocks.2.attn.hook_pattern[1,-1,0]",
    'logit[" Paris"]',
    "logit[42]",
    'logit["123"]',
    'logit["\\\\"]',
    'logit["\\""]',
    'logit[" +"]',
    'logit["a - b"]',
    'logit["\\u00e9t\\u00e9"]',
    'logitdiff[" Paris"," London"]',
    'logitdiff[","," ]"]',
    "blocks.0.mlp.hook_post[1] - 0.5*blocks.1.mlp.hook_post[2]",
    '-blocks.0.mlp.hook_post[1] + 2*logit[" Paris"] - 1e-05*blocks.1.hook_resid_post[0]@max',
    "0.1234567891*blocks.0.mlp.hook_post[1]",
]


@pytest.mark.parametrize("spec", ROUND_TRIP)
def test_string_form_round_trips(spec):
    obj = objective(spec)
    assert str(obj) == spec
    assert str(objective(str(obj))) == spec
    assert repr(obj) == f"objective({spec!r})"


def test_string_form_tokens_parse_to_the_right_text():
    assert objective('logit["\\\\"]').token == "\\"
    assert objective('logit["\\""]').token == '"'
    assert objective("logit[' Paris']").token == " Paris"
    assert objective('logit["\\u00e9t\\u00e9"]').token == "été"
    assert objective("logit[42]").token == 42
    assert objective('logit["42"]').token == "42"
    d = objective('logitdiff[","," ]"]')
    assert (d.token_a, d.token_b) == (",", " ]")
    # spellings that are not the canonical form still parse
    assert str(objective("blocks.0.mlp.hook_post[ 1 ]+blocks.0.mlp.hook_post[2]")) == (
        "blocks.0.mlp.hook_post[1] + blocks.0.mlp.hook_post[2]"
    )
    assert str(objective("blocks.0.attn.hook_z[1, 2]")) == "blocks.0.attn.hook_z[1,2]"
    assert str(objective("2 * blocks.0.mlp.hook_post[1]")) == "2*blocks.0.mlp.hook_post[1]"


def test_direction_string_round_trips(model, tokens, tmp_path):
    import numpy as np
    from safetensors.torch import save_file

    v = torch.randn(64, generator=torch.Generator().manual_seed(9))
    torch.save(v, tmp_path / "v.pt")
    np.save(tmp_path / "v.npy", v.numpy())
    save_file({"direction": v}, str(tmp_path / "v.safetensors"))
    want = Direction("blocks.1.hook_resid_post", v, reduce="max").evaluate(model, tokens)
    for name in ("v.pt", "v.npy", "v.safetensors"):
        spec = f"dir:blocks.1.hook_resid_post:{tmp_path / name}@max"
        obj = objective(spec)
        assert str(obj) == spec
        torch.testing.assert_close(obj.evaluate(model, tokens), want)


def test_sae_string_form_with_a_loader(model, tokens):
    sae = make_sae("topk", "blocks.0.hook_resid_post", 64)
    calls = []

    def loader(source):
        calls.append(source)
        return sae

    spec = "sae:my-sae[3] + 0.5*sae_pre:my-sae[4]@max"
    obj = objective(spec, sae_loader=loader)
    assert calls == ["my-sae"]  # loaded once, shared by both latents
    assert str(obj) == spec
    want = SAELatent(sae, 3).evaluate(model, tokens) + 0.5 * SAELatent(sae, 4, True, "max").evaluate(model, tokens)
    torch.testing.assert_close(obj.evaluate(model, tokens), want)


def test_sae_string_form_round_trips_through_a_folder(model, tokens, tmp_path):
    pytest.importorskip("dreamlens.sae")
    sae = make_sae("jumprelu", "blocks.1.hook_resid_post", 64)
    folder = tmp_path / "my sae-v2"
    sae.save_model(folder)
    spec = f"sae:{folder}[3] - sae_pre:{folder}[7]@mean"
    obj = objective(spec)
    assert str(obj) == spec
    want = SAELatent(sae, 3).evaluate(model, tokens) - SAELatent(sae, 7, True, "mean").evaluate(model, tokens)
    torch.testing.assert_close(obj.evaluate(model, tokens), want)


def test_in_memory_objectives_say_how_to_rebuild_them():
    sae = make_sae("standard", "blocks.0.hook_resid_post", 64)
    assert str(SAELatent(sae, 3)) == "sae:<in-memory>[3]"
    with pytest.raises(ObjectiveError, match="in-memory SAE.*SAELatent"):
        objective(str(SAELatent(sae, 3)))
    d = Direction("blocks.0.hook_resid_post", torch.ones(64))
    assert str(d) == "dir:blocks.0.hook_resid_post:<in-memory>"
    with pytest.raises(ObjectiveError, match="in-memory vector.*torch.save"):
        objective(str(d))


# ---------------------------------------------------------------------------------------------
# Bad inputs: clear errors, before any compute


@pytest.mark.parametrize(
    "spec,message",
    [
        ("blocks.0.mlp.hook_pots[1]", r"unknown hook 'blocks\.0\.mlp\.hook_pots'; did you mean 'blocks\.0\.mlp\.hook_post'\?"),
        ("blocks.9.mlp.hook_post[1]", r"unknown hook 'blocks\.9\.mlp\.hook_post': the model has 2 blocks \(0\.\.1\)"),
        ("blocks.0.mlp.hook_post[128]", r"index 128 is out of range for axis 0 of blocks\.0\.mlp\.hook_post \(size 128\): use 0\.\.127"),
        ("blocks.0.mlp.hook_post[-1]", r"index -1 .*use 0\.\.127"),
        ("blocks.0.attn.hook_z[3]", r"per-position shape \[4, 16\], so its index needs 2 number\(s\), got \[3\]; e\.g\. blocks\.0\.attn\.hook_z\[0,3\]"),
        ("blocks.0.attn.hook_z[4,0]", r"index 4 is out of range for axis 0 of blocks\.0\.attn\.hook_z \(size 4\): use 0\.\.3"),
        ("blocks.0.attn.hook_k[2,0]", r"index 2 .*\(size 2\): use 0\.\.1"),
        ("blocks.0.attn.hook_pattern[0,-1,0]@max", r"hook_pattern is \[batch, head, query, key\].*cannot be reduced with 'max'"),
        ("blocks.0.attn.hook_pattern[0,1]", r"three numbers, head, query position and key position"),
        ("blocks.0.attn.hook_pattern[4,1,0]", r"head 4 is out of range .*4 heads\): use 0\.\.3"),
        ("blocks.0.attn.hook_pattern[0,7,0]", r"query position 7 .*outside the sequence of 7 tokens: use 0\.\.6"),
        ("blocks.0.attn.hook_pattern[0,1,-8]", r"key position -8 .*outside the sequence of 7 tokens"),
        ("blocks.0.mlp.hook_post[1]@6", r"position 6 of blocks\.0\.mlp\.hook_post\[1\]@6 is outside the prompt of 6 token\(s\): use 0\.\.5"),
        ("blocks.0.mlp.hook_post[1]@-7", r"position -7 .*-6\.\.-1"),
        ('logit["hello world"]', r"'hello world' is 2 tokens \['hello', ' world'\], not one"),
        ("logit[49152]", r"token id 49152 is outside the vocabulary \(0\.\.49151\)"),
        ('logitdiff[" Paris",7042]', r"' Paris' and 7042 are the same token \(id 7042\)"),
        ('blocks.0.mlp.hook_post[1] - logit["hello world"]', r"'hello world' is 2 tokens"),
        ("blocks.0.attn.hook_result[0,0]", r"did not fire.*model\.set_use_attn_result\(True\)"),
    ],
)
def test_bad_objectives_fail_before_any_compute(model, tokens, spec, message):
    for warm in ("blocks.0.mlp.hook_post[0]", "blocks.0.attn.hook_z[0,0]", "blocks.0.attn.hook_k[0,0]",
                 "blocks.0.attn.hook_pattern[0,0,0]"):
        objective(warm).validate(model)  # the one-off shape probe, so that only real passes are counted
    obj = objective(spec)
    forward = Counter()
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", forward)]):
        with pytest.raises(ObjectiveError, match=message):
            obj.evaluate(model, tokens)
        with pytest.raises(ObjectiveError, match=message):
            run_objectives(model, [Neuron("blocks.0.mlp.hook_post", 0), obj], tokens)
    if "did not fire" not in message:  # that one is found by the shape probe itself
        assert forward.n == 0, "validation must come before the forward pass"


def test_bad_sae_errors(model, tokens):
    wide = make_sae("standard", "blocks.0.hook_resid_post", 128)
    with pytest.raises(ObjectiveError, match=r"SAE reads 128 values per position at blocks\.0\.hook_resid_post, but this model has 64"):
        SAELatent(wide, 0).evaluate(model, tokens)
    lost = make_sae("standard", "blocks.7.hook_resid_post", 64)
    with pytest.raises(ObjectiveError, match=r"unknown hook 'blocks\.7\.hook_resid_post' \(the SAE's cfg\.metadata\.hook_name\): the "
                       r"model has 2 blocks \(0\.\.1\)"):
        SAELatent(lost, 0).evaluate(model, tokens)
    nameless = make_sae("standard", "blocks.0.hook_resid_post", 64)
    nameless.cfg.metadata.hook_name = None
    with pytest.raises(ObjectiveError, match=r"hook_name is empty.*sae\.cfg\.metadata\.hook_name = "):
        SAELatent(nameless, 0).evaluate(model, tokens)
    ok = make_sae("standard", "blocks.0.hook_resid_post", 64)
    with pytest.raises(ObjectiveError, match=r"SAE latent 128 is out of range: this SAE has 128 latents \(0\.\.127\)"):
        SAELatent(ok, 128).evaluate(model, tokens)
    on_pattern = make_sae("standard", "blocks.0.attn.hook_pattern", 64)
    with pytest.raises(ObjectiveError, match=r"hook_pattern, which is \[batch, head, query, key\], not one vector per position"):
        SAELatent(on_pattern, 0).evaluate(model, tokens)
    with pytest.raises(ObjectiveError, match="expected a sae-lens SAE"):
        SAELatent(torch.nn.Linear(2, 2), 0)
    with pytest.raises(ObjectiveError, match=r"cannot load the SAE 'nowhere': boom"):
        objective("sae:nowhere[1]", sae_loader=lambda s: (_ for _ in ()).throw(OSError("boom")))


def test_bad_directions(model, tokens):
    with pytest.raises(ObjectiveError, match=r"the direction has 63 entries but blocks\.0\.hook_resid_post has 64 per position"):
        Direction("blocks.0.hook_resid_post", torch.ones(63)).evaluate(model, tokens)
    with pytest.raises(ObjectiveError, match=r"direction for blocks\.0\.hook_resid_post is all zeros"):
        Direction("blocks.0.hook_resid_post", torch.zeros(64))
    with pytest.raises(ObjectiveError, match=r"has 1 NaN or infinite entries"):
        Direction("blocks.0.hook_resid_post", torch.tensor([1.0, float("nan")]))
    with pytest.raises(ObjectiveError, match=r"must be a 1-D vector, got shape \[8, 8\]"):
        Direction("blocks.0.hook_resid_post", torch.ones(8, 8))
    with pytest.raises(ObjectiveError, match=r"hook_pattern is \[batch, head, query, key\], not one vector per position"):
        Direction("blocks.0.attn.hook_pattern", torch.ones(4)).evaluate(model, tokens)
    with pytest.raises(ObjectiveError, match=r"no direction file at"):
        objective("dir:blocks.0.hook_resid_post:/no/such/vector.pt")


@pytest.mark.parametrize(
    "build,message",
    [
        (lambda: objective("blocks.0.mlp.hook_post(3)"), r"cannot read the objective 'blocks\.0\.mlp\.hook_post\(3\)'\. Forms:"),
        (lambda: objective('logitdiff["a"]'), r"logitdiff needs two tokens"),
        (lambda: objective('logit[" Paris"]@max'), r"read at the final position; drop '@max'"),
        (lambda: objective(""), r"an objective \(or its string form\) is needed"),
        (lambda: objective(3), r"an objective \(or its string form\) is needed, got 3"),
        (lambda: Neuron("blocks.0.mlp.hook_post", 1, reduce="median"), r"reduce must be 'last', 'max', 'mean' or an integer position, got 'median'"),
        (lambda: Neuron("blocks.0.mlp.hook_post", 1.5), r"neuron index of blocks\.0\.mlp\.hook_post must be an integer, got 1\.5"),
        (lambda: float("nan") * Neuron("blocks.0.mlp.hook_post", 1), r"coefficient of .* must be a finite number"),
        (lambda: Combination([]), r"at least one objective"),
        (lambda: Neuron("blocks.0.mlp.hook_post", 1) / 0, r"cannot divide an objective by 0"),
        (lambda: Logit(1.5), r"a logit token \(a string or a token id\) must be an integer, got 1\.5"),
    ],
)
def test_malformed_objectives(build, message):
    with pytest.raises(ObjectiveError, match=message):
        build()


def test_bad_tokens_and_inputs(model, tokens):
    obj = Neuron("blocks.0.mlp.hook_post", 1)
    with pytest.raises(ObjectiveError, match=r"got \[7\]; for one prompt use tokens\[None\]"):
        obj.evaluate(model, tokens[0])
    with pytest.raises(ObjectiveError, match=r"integer token ids, got dtype torch\.float32"):
        obj.evaluate(model, tokens.float())
    with pytest.raises(ObjectiveError, match=r"token id 49152 is outside the vocabulary \(0\.\.49151\)"):
        obj.evaluate(model, torch.full((1, 3), 49152))
    with pytest.raises(ObjectiveError, match=r"prompts of 65 tokens exceed the model's context of 64 tokens"):
        obj.evaluate(model, torch.zeros((1, 65), dtype=torch.long))
    with pytest.raises(ObjectiveError, match=r"embeds must have shape \[batch, pos, d_model\] = \[3, 7, 64\], got \[3, 7, 32\]"):
        run_objectives(model, [obj], tokens, embeds=torch.zeros(3, 7, 32))
    with pytest.raises(ObjectiveError, match=r"final_from must be a position in 0\.\.6, got 7"):
        run_objectives(model, [obj], tokens, final_from=7)
    with pytest.raises(ObjectiveError, match=r"start must be a position in 0\.\.6, got -1"):
        run_objectives(model, [obj], tokens, start=-1)
    # strings become objectives where they enter (dl.objective), not in the forward pass
    with pytest.raises(ObjectiveError, match=r"not their string form: pass dl\.objective\('blocks\.0\.mlp\.hook_post\[1\]'\)"):
        run_objectives(model, ["blocks.0.mlp.hook_post[1]"], tokens)
    with pytest.raises(ObjectiveError, match=r"takes objectives \(dl\.Objective instances\), got 3"):
        run_objectives(model, [3], tokens)
    with pytest.raises(ObjectiveError, match="hook_pattern is \\[batch, head, query, key\\].*hook_pattern\\[head,query,key\\]"):
        hook_shape(model, "blocks.0.attn.hook_pattern")


def test_non_finite_values_are_reported_not_passed_on(model, tokens):
    def poison(act, hook):  # row 1 overflows, as a float16 model might
        act = act.clone()
        act[1] = float("inf")
        return act

    objs = [Neuron("blocks.1.mlp.hook_post", 1), Neuron("blocks.0.mlp.hook_post", 1)]
    hook_shape(model, "blocks.1.mlp.hook_post")
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", poison)]):
        with pytest.raises(NonFiniteError, match=r"NaN or infinite values for 'blocks\.1\.mlp\.hook_post\[1\]' in rows \[1\] of 3"):
            run_objectives(model, objs, tokens)
        values, _ = run_objectives(model, objs, tokens, check_finite=False)
        assert not torch.isfinite(values[0, 1]) and torch.isfinite(values[1]).all()
        with pytest.raises(NonFiniteError, match=r"final residual stream .* in rows \[1\] of 3"):
            run_objectives(model, [objs[1]], tokens, final_from=1)
    nan_embeds = model.embed(tokens).detach()
    nan_embeds[2, 3] = float("nan")
    with pytest.raises(NonFiniteError, match=r"rows \[2\] of 3"):
        run_objectives(model, [Logit(" Paris")], tokens, embeds=nan_embeds)


# ---------------------------------------------------------------------------------------------
# The package's modules and their public pieces

# Every public name the former module dreamlens/objectives.py defined.
OLD_PUBLIC_NAMES = [
    "Reduce", "ObjectiveError", "NonFiniteError", "Capture", "hook_shape", "Objective", "Neuron", "SAELatent",
    "Direction", "Logit", "LogitDiff", "Combination", "stop_at_layer", "default_start", "run_objectives", "unembed",
    "load_vector", "objective",
]


def test_the_package_still_exposes_every_old_public_name():
    import importlib

    pkg = importlib.import_module("dreamlens.objectives")
    homes = {}
    for name in OLD_PUBLIC_NAMES:
        assert hasattr(pkg, name), name
        assert name in pkg.__all__, name
        homes[name] = getattr(pkg, name)
    namespace: dict = {}
    exec("from dreamlens.objectives import *", namespace)
    assert all(namespace[name] is homes[name] for name in OLD_PUBLIC_NAMES)
    # the names the top-level package exports from here are the same objects
    for name in ("objective", "Objective", "Neuron", "SAELatent", "Direction", "Logit", "LogitDiff", "Combination",
                 "ObjectiveError", "run_objectives"):
        assert getattr(dl, name) is homes[name]


def test_terms_leaves_and_check_positions_are_public(model):
    from dreamlens.objectives.forward import leaves

    a = Neuron("blocks.0.mlp.hook_post", 1, reduce=5)
    b = Logit(7)
    assert a.terms == [(1.0, a)] and b.terms == [(1.0, b)]
    combo = a - 2 * b
    assert combo.terms == [(1.0, a), (-2.0, b)]
    assert leaves([combo, b]) == [a, b, b]
    assert leaves([]) == []
    a.check_positions(model, 7, 1)  # position 5 of a 6-token prompt
    with pytest.raises(ObjectiveError, match=r"position 5 of .* is outside the prompt of 5 token\(s\)"):
        a.check_positions(model, 6, 1)
    with pytest.raises(ObjectiveError, match=r"position 5 of "):
        combo.check_positions(model, 6, 1)


def test_token_id(model):
    from dreamlens.objectives.logit import token_id

    assert token_id(model, " Paris") == dl.encode(model, " Paris")[0]
    assert token_id(model, 5) == 5
    with pytest.raises(ObjectiveError, match=r"token id 49152 is outside the vocabulary"):
        token_id(model, 49152)
    with pytest.raises(ObjectiveError, match=r"not one; a logit objective needs a single token"):
        token_id(model, " Paris is a city")


def test_soft_cap_is_the_models_own():
    from types import SimpleNamespace

    from dreamlens.objectives.forward import soft_cap

    x = torch.linspace(-100, 100, 11)
    capped = SimpleNamespace(cfg=SimpleNamespace(output_logits_soft_cap=30.0))
    assert torch.equal(soft_cap(capped, x), 30.0 * torch.tanh(x / 30.0))
    for cfg in (SimpleNamespace(output_logits_soft_cap=-1.0), SimpleNamespace(output_logits_soft_cap=0.0), SimpleNamespace()):
        assert soft_cap(SimpleNamespace(cfg=cfg), x) is x


def test_forward_capture_is_what_run_objectives_reads(model, tokens):
    from dreamlens.objectives.forward import forward_capture, leaves

    objs = [objective(s) for s in ("blocks.0.mlp.hook_post[5]", "blocks.1.hook_resid_post[3]@max", 'logit[" Paris"]')]
    with torch.no_grad():
        values, final = run_objectives(model, objs, tokens, final_from=2)
        capture, normed = forward_capture(model, leaves(objs), tokens, final=True)
        assert normed is not None and normed.shape == (*tokens.shape, model.cfg.d_model)
        assert torch.equal(normed[:, 2:], final)
        assert torch.equal(torch.stack([o.value(capture) for o in objs]), values)
        assert capture.start == 1 and capture.logits.shape == (tokens.shape[0], 1, model.cfg.d_vocab)
        # no logits needed: the pass stops after block 0, hands no residual stream back
        counter = Counter()
        with model.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", counter)]):
            early, none = forward_capture(model, objs[:1], tokens)
        assert none is None and early.logits is None and counter.n == 0
        assert list(early.acts) == ["blocks.0.mlp.hook_post"] and early.acts["blocks.0.mlp.hook_post"].shape[:2] == tokens.shape


def test_each_form_of_the_registry_reads_its_own_examples_only():
    from dreamlens.objectives.parse import FORMS, FORMS_HELP

    for form in FORMS:
        for example in form.examples:
            body = example.split("@")[0]
            assert [f.name for f in FORMS if f.pattern.fullmatch(body)] == [form.name], example
    # a hook named like the logit forms is read as a logit (they win, as they always did)
    assert isinstance(objective("logit[5]"), Logit) and isinstance(objective("logitdiff[5,6]"), LogitDiff)
    assert FORMS_HELP == (
        "Forms: 'blocks.6.mlp.hook_post[123]', 'blocks.3.attn.hook_z[4,10]', 'blocks.0.attn.hook_pattern[2,-1,0]', "
        "'sae:embedded[42]', 'sae:PATH[42]', 'sae_pre:PATH[42]', 'logit[\" Paris\"]', "
        "'logitdiff[\" Paris\",\" London\"]', 'dir:HOOK:vector.pt'; optional '@max', '@mean' or '@POS' after "
        "the brackets; combine with ' + ', ' - ' and 'k*', or take the largest with 'max(A, B)'"
    )


# ---------------------------------------------------------------------------------------------
# The embedded model


@pytest.mark.integration
def test_embedded_model_objectives_match_run_with_cache(embedded_model):
    model = embedded_model
    rows = [dl.encode(model, t)[:6] for t in ("The capital of France is the city of", "Once upon a time there was a")]
    toks = torch.tensor([[0] + r for r in rows])
    g = torch.Generator().manual_seed(10)
    v = torch.randn(576, generator=g)
    sae = make_sae("topk", "blocks.5.hook_resid_post", 576, d_sae=64)
    objs = [
        objective("blocks.6.mlp.hook_post[123]"),
        objective("blocks.3.attn.hook_z[4,10]@max"),
        objective("blocks.2.attn.hook_pattern[1,-1,0]"),
        Direction("blocks.10.hook_resid_post", v, reduce="mean"),
        objective('logit[" Paris"]'),
        objective('logitdiff[" Paris"," London"]'),
        SAELatent(sae, 5, pre_activation=True),
        objective("blocks.6.mlp.hook_post[123] - 0.5*blocks.3.attn.hook_z[4,10]@max"),
    ]
    with torch.no_grad():
        values, _ = run_objectives(model, objs, toks)
        logits, c = model.run_with_cache(toks)
    paris, london = dl.encode(model, " Paris")[0], dl.encode(model, " London")[0]
    neuron = c["blocks.6.mlp.hook_post"][:, -1, 123]
    z = c["blocks.3.attn.hook_z"][:, 1:, 4, 10].max(dim=1).values
    want = torch.stack([
        neuron,
        z,
        c["blocks.2.attn.hook_pattern"][:, 1, -1, 0],
        (c["blocks.10.hook_resid_post"][:, 1:] @ v).mean(dim=1),
        logits[:, -1, paris],
        logits[:, -1, paris] - logits[:, -1, london],
        manual_sae(sae, c["blocks.5.hook_resid_post"])[0][:, -1, 5],
        neuron - 0.5 * z,
    ])
    torch.testing.assert_close(values, want, rtol=1e-4, atol=1e-4)
    # early stopped (layer 7 of 30) gives the same targets as the full pass above
    early = objs[:3]
    assert stop_at_layer(model, early) == 7
    with torch.no_grad():
        torch.testing.assert_close(run_objectives(model, early, toks)[0], values[:3], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# max(A, B): fires when either does


def test_max_values_and_gradients_match_an_independent_computation(tiny_model):
    from dreamlens.objectives import Max

    a, b = objective("blocks.1.mlp.hook_post[3]"), objective("0.5*blocks.0.mlp.hook_post[5] - blocks.1.hook_resid_post[2]")
    m = Max(a, b)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 1000, (6, 7), generator=g)
    tokens[:, 0] = 0
    got = m.evaluate(tiny_model, tokens)
    va, vb = a.evaluate(tiny_model, tokens), b.evaluate(tiny_model, tokens)
    torch.testing.assert_close(got, torch.maximum(va, vb), rtol=0, atol=0)
    assert (va > vb).any() and (vb > va).any()  # both parts win somewhere: the test means something
    assert torch.equal(m.larger_part(tiny_model, tokens), (vb > va).long())

    # the gradient through embeddings: that of the larger part, row by row
    from dreamlens.objectives import run_objectives

    emb = tiny_model.embed(tokens).detach().requires_grad_(True)
    run_objectives(tiny_model, [m], tokens, embeds=emb)[0][0].sum().backward()
    grads = []
    for o in (a, b):
        e = tiny_model.embed(tokens).detach().requires_grad_(True)
        run_objectives(tiny_model, [o], tokens, embeds=e)[0][0].sum().backward()
        grads.append(e.grad)
    want = torch.where((va >= vb).view(-1, 1, 1), grads[0], grads[1])
    torch.testing.assert_close(emb.grad, want)


def test_max_string_form_round_trips_and_nests():
    from dreamlens.objectives import Max

    spec = 'max(blocks.1.mlp.hook_post[3], 0.5*blocks.0.mlp.hook_post[2]@max, logit[" a, b"])'
    m = objective(spec)
    assert isinstance(m, Max) and len(m.parts) == 3 and str(m) == spec
    assert str(objective(str(m))) == spec
    combo = objective("2*max(blocks.1.mlp.hook_post[3], blocks.0.mlp.hook_post[2]) - blocks.1.mlp.hook_post[4]")
    assert str(combo) == "2*max(blocks.1.mlp.hook_post[3], blocks.0.mlp.hook_post[2]) - blocks.1.mlp.hook_post[4]"
    assert len(Max(m, objective("blocks.1.mlp.hook_post[9]")).parts) == 4  # max(max(a, b), c) flattens
    from dreamlens.objectives.forward import leaves

    assert [str(o) for o in leaves([combo])] == ["blocks.1.mlp.hook_post[3]", "blocks.0.mlp.hook_post[2]", "blocks.1.mlp.hook_post[4]"]


@pytest.mark.parametrize("spec", ["max(blocks.1.mlp.hook_post[3])", "max()", "max(blocks.1.mlp.hook_post[3], )"])
def test_max_needs_two_objectives(spec):
    with pytest.raises(ObjectiveError, match=r"max\(\) takes two or more objectives"):
        objective(spec)


def test_max_in_a_scan_is_the_max_of_its_parts_at_every_position(tiny_model):
    from dreamlens.analysis.scan import position_values

    a, b = objective("blocks.1.mlp.hook_post[3]"), objective("blocks.0.mlp.hook_post[5]@max")
    tokens = torch.randint(1, 1000, (3, 9), generator=torch.Generator().manual_seed(2))
    vals = position_values(tiny_model, [objective(f"max({a}, {b})"), a, b], tokens, skip=1)
    torch.testing.assert_close(vals[0], torch.maximum(vals[1], vals[2]), rtol=0, atol=0)
