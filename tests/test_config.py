"""The optimizers' configs: one base (DreamConfig) with the shared fields and checks, each method's own knobs."""

import dataclasses
from types import SimpleNamespace

import pytest

import dreamlens as dl
from dreamlens.errors import DreamError
from dreamlens.optim.config import DreamConfig
from dreamlens.optim.loop import check_resume

CONFIGS = [dl.EPOConfig, dl.ADAPTConfig, dl.GCGConfig]
SHARED = [f.name for f in dataclasses.fields(DreamConfig)]


@pytest.mark.parametrize("cls", CONFIGS)
def test_every_config_has_the_shared_fields_with_the_same_defaults(cls):
    names = [f.name for f in dataclasses.fields(cls)]
    assert names[: len(SHARED)] == SHARED
    base, own = DreamConfig(), cls()
    for name in SHARED:
        if (cls, name) not in {(dl.GCGConfig, "children"), (dl.GCGConfig, "iters")}:  # GCG's paper sizes
            assert getattr(own, name) == getattr(base, name), name
    assert issubclass(cls, DreamConfig) and dataclasses.is_dataclass(cls)


def test_method_defaults_are_unchanged():
    assert (dl.GCGConfig().children, dl.GCGConfig().iters, dl.GCGConfig().topk, dl.GCGConfig().lam) == (512, 500, 256, 1.0)
    e = dl.EPOConfig()
    assert (e.population, e.lam_min, e.lam_max, e.children, e.topk, e.iters, e.restart_every) == (8, 0.1, 10.0, 32, 512, 300, 50)
    a = dl.ADAPTConfig()
    assert (a.beams, a.lam_min, a.lam_max, a.children, a.iters, a.topk_min, a.topk_max) == (4, 0.03, 1.0, 32, 300, 128, 512)
    assert a.max_batch_tokens is None and a.reuse_prefix is True  # ADAPT gained these with the base class


@pytest.mark.parametrize("cls", CONFIGS)
@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(length=0), "length must be at least 1 token, got 0"),
        (dict(length=2.5), "length must be at least 1 token, got 2.5"),
        (dict(children=0), "children must be at least 1 per member, got 0"),
        (dict(iters=-1), "iters must be >= 0, got -1"),
        (dict(batch_size=0), "batch_size must be at least 1, got 0"),
        (dict(max_batch_tokens=0), "max_batch_tokens must be None (estimated from free memory) or at least 1, got 0"),
        (dict(checkpoint_every=0, checkpoint_dir="x"), "checkpoint_every must be None or >= 1"),
        (dict(checkpoint_every=2), "checkpoint_every needs checkpoint_dir: where to write the checkpoints"),
        (dict(init_text="a", init_ids=(1,)), "give init_text or init_ids, not both"),
        (dict(seed=1.5), "seed must be an integer, got 1.5"),
        (dict(seed="a"), "seed must be an integer, got 'a'"),
        (dict(seed=True), "seed must be an integer, got True"),
    ],
)
def test_shared_checks_are_the_same_for_every_method(cls, kw, msg):
    with pytest.raises(DreamError) as caught:
        cls(**kw).validate()
    assert str(caught.value) == msg


@pytest.mark.parametrize(
    "cfg, msg",
    [
        (dl.EPOConfig(population=0), "population must be at least 1 member, got 0"),
        (dl.EPOConfig(topk=0), "topk must be at least 1, got 0"),
        (dl.EPOConfig(lam_min=-1.0), "penalties must be positive"),
        (dl.EPOConfig(lam_min=5.0, lam_max=1.0), "lam_max (1.0) must be >= lam_min (5.0)"),
        (dl.EPOConfig(init="greedy"), "init must be 'random' or 'sample', got 'greedy'"),
        (dl.EPOConfig(lm_share=2.0), "lm_share must be between 0 and 1, got 2.0"),
        (dl.ADAPTConfig(beams=0), "beams must be at least 1, got 0"),
        (dl.ADAPTConfig(lam_min=2.0), "need 0 < lam_min <= lam_max, got lam_min=2.0, lam_max=1.0"),
        (dl.ADAPTConfig(topk_min=600), "need 1 <= topk_min <= topk_max, got 600, 512"),
        (dl.ADAPTConfig(step=0.0), "step must be in (0, 1], got 0.0"),
        (dl.GCGConfig(lam=0.0), "lam must be positive, got 0.0; for GCG without fluency use a tiny lam such as 1e-6"),
        (dl.GCGConfig(topk=0), "topk must be at least 1, got 0"),
    ],
)
def test_each_methods_own_checks(cfg, msg):
    with pytest.raises(DreamError) as caught:
        cfg.validate()
    assert str(caught.value).startswith(msg)


@pytest.mark.parametrize("cls", CONFIGS)
def test_the_config_dict_is_every_field_json_ready(cls):
    cfg = cls(banned_tokens=(5, 6), init_ids=(1, 2, 3), length=3)
    d = cfg.to_dict()
    assert list(d) == [f.name for f in dataclasses.fields(cls)]
    assert d["banned_tokens"] == [5, 6] and d["init_ids"] == [1, 2, 3]
    back = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
    assert back == cfg


def test_adapt_config_dict_has_its_new_fields_and_old_results_still_resume():
    d = dl.ADAPTConfig(max_batch_tokens=4096, reuse_prefix=False).to_dict()
    assert d["max_batch_tokens"] == 4096 and d["reuse_prefix"] is False

    # a result saved before ADAPTConfig had them: its config lacks both keys
    old = {k: v for k, v in dl.ADAPTConfig().to_dict().items() if k not in ("max_batch_tokens", "reuse_prefix")}
    saved = SimpleNamespace(method="adapt", objective="obj", state={"population": [[1]]}, config=old)
    check_resume([saved], ["obj"], dl.ADAPTConfig(max_batch_tokens=4096, reuse_prefix=False), "adapt")
    saved.config = {**old, "children": 7}
    with pytest.raises(DreamError, match="children changed"):
        check_resume([saved], ["obj"], dl.ADAPTConfig(), "adapt")


def test_adapt_passes_batching_and_reuse_to_its_evaluator(tiny_model):
    from dreamlens.optim.adapt import ADAPT
    from dreamlens.scoring import banned_mask, make_layout

    layout = make_layout(tiny_model, 4)
    cfg = dl.ADAPTConfig(length=4, reuse_prefix=False, max_batch_tokens=123)
    ev = ADAPT(tiny_model, dl.objective("blocks.1.mlp.hook_post[3]"), cfg, layout, banned_mask(tiny_model)).ev
    assert ev.reuse is False and ev.reuse_obstacle == "reuse=False"
    assert ev.batcher.max_tokens == 123 and ev.grad_batcher.max_tokens == 123


def test_gcg_is_epo_with_one_member_and_reads_old_gcg_configs():
    g = dl.GCGConfig(lam=0.5, children=9, topk=7, max_batch_tokens=100)
    e = g.to_epo()
    got = (e.population, e.lam_min, e.lam_max, e.restart_every, e.children, e.topk, e.max_batch_tokens)
    assert got == (1, 0.5, 0.5, 0, 9, 7, 100)
    old = {k: v for k, v in g.to_dict().items() if k not in ("max_batch_tokens", "reuse_prefix")}
    d = dl.GCGConfig.epo_dict(old)
    assert d == {**dl.EPOConfig().to_dict(), **e.to_dict(), "max_batch_tokens": None}


def test_configs_are_frozen_and_keyword_only():
    with pytest.raises(TypeError):
        dl.EPOConfig(12)  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        dl.ADAPTConfig().beams = 2  # type: ignore[misc]
