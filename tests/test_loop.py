"""The run loop (dreamlens.optim.loop) with a toy method: iterations, budget, callback, checkpoints,
interrupts and failures, resume; and the methods' states keep the keys results have always stored."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
import pytest
import torch

import dreamlens as dl
from dreamlens.optim.config import DreamConfig
from dreamlens.optim.loop import IterationInfo, Method, run, sigterm_as_interrupt
from dreamlens.optim.members import MemberState
from dreamlens.results import DreamResult
from dreamlens.scoring import Evaluator, make_layout

pytestmark = pytest.mark.usefixtures("one_thread")

OBJ = "blocks.1.mlp.hook_post[3]"
LAMS = torch.tensor([0.1, 1.0], dtype=torch.float64)


@dataclass
class ToyState(MemberState):
    def to_dict(self) -> dict[str, Any]:
        return {**self.members_dict(), "generator": self.generator_text()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ToyState:
        return cls(**cls.members_from_dict(d))


class Toy(Method):
    """Random single-token swaps, 2 members, 4 children: a search small enough for unit tests."""

    name = "toy"

    def __init__(self, model, cfg, objectives=(OBJ,), stop_at=None, start_raises=None, start_spends=0):
        objs = [dl.objective(o) for o in objectives]
        layout = make_layout(model, cfg.length)
        super().__init__(model, objs, cfg, layout, Evaluator(model, objs, layout))
        self.stop_at, self.start_raises, self.start_spends = stop_at or {}, start_raises, start_spends

    def init(self) -> None:
        if self.start_raises is None:
            self._first_members()

    def start(self) -> None:  # with start_raises, the members would only be made here (as ADAPT's beam search)
        self.ev.compute.add_tokens(self.start_spends)
        if self.start_raises is not None:
            raise self.start_raises

    def _first_members(self) -> None:
        gens = [torch.Generator().manual_seed(self.cfg.seed) for _ in self.objectives]
        members = [torch.randint(300, 3000, (2, self.cfg.length), generator=g) for g in gens]
        f, xe = self._score(0, members)
        self.states = [ToyState(m, f[k], xe[k], g) for k, (m, g) in enumerate(zip(members, gens))]

    def restore(self, states: list[dict[str, Any]]) -> None:
        self.states = [ToyState.from_dict(d) for d in states]

    def _score(self, iteration, rows):
        K = len(rows)
        f, xe, _ = self.ev.evaluate(torch.cat(rows), torch.arange(K).repeat_interleave(len(rows[0])), iteration)
        return f.view(K, -1), xe.view(K, -1)

    def step(self, iteration: int) -> None:
        if iteration in self.stop_at:
            raise self.stop_at[iteration]
        kids = []
        for s in self.states:
            child = s.members.repeat(2, 1)
            pos = torch.randint(self.cfg.length, (4,), generator=s.generator)
            child[torch.arange(4), pos] = torch.randint(300, 3000, (4,), generator=s.generator)
            kids.append(child)
        f, xe = self._score(iteration, kids)
        for k, s in enumerate(self.states):
            s.select(kids[k], f[k], xe[k], LAMS)

    def extra(self, k: int) -> dict[str, Any]:
        return {"toy": k}


def _run(model, resume=None, callback=None, folder=None, per_objective=False, **kw):
    cfg = DreamConfig(**{"length": 3, "iters": 5, "seed": 1, **kw.pop("cfg", {})})
    return run(Toy(model, cfg, **kw), resume=resume, callback=callback, progress=False, folder=folder,
               per_objective=per_objective)


@pytest.fixture(scope="module")
def reference(tiny_model):
    return _run(tiny_model)[0]


def test_a_run_completes_every_iteration(reference):
    assert reference.stopped == "completed" and reference.iterations == 5 and reference.method == "toy"
    assert set(reference.state) == {"population", "pop_f", "pop_xe", "generator"}
    assert reference.config == DreamConfig(length=3, iters=5, seed=1).to_dict()
    assert reference.token_forwards > 0 and set(reference.iteration.tolist()) <= set(range(6))


def test_the_budget_stops_the_run(tiny_model, reference):
    budget = reference.token_forwards // 2
    r = _run(tiny_model, cfg={"max_token_forwards": budget})[0]
    assert r.stopped == "budget" and r.token_forwards >= budget and 0 < r.iterations < 5


def test_budget_first_stops_before_any_iteration(tiny_model):
    m = Toy(tiny_model, DreamConfig(length=3, iters=5, max_token_forwards=10), start_spends=10)
    m.budget_first = True
    r = run(m, progress=False)[0]
    assert r.stopped == "budget" and r.iterations == 0


def test_the_callback_sees_every_objective_and_can_stop(tiny_model):
    seen: list[IterationInfo] = []

    def callback(info: IterationInfo) -> bool:
        seen.append(info)
        return info.iteration == 2 and info.objective == 0

    rs = _run(tiny_model, callback=callback, objectives=(OBJ, "blocks.0.mlp.hook_post[5]"))
    assert [r.stopped for r in rs] == ["callback"] * 2 and [r.iterations for r in rs] == [2, 2]
    assert [(i.iteration, i.objective) for i in seen] == [(1, 0), (1, 1), (2, 0), (2, 1)]  # all called, then stop
    assert seen[-1].extra == {"toy": 1} and len(seen[-1].texts) == 2 and seen[-1].token_forwards > 0


def test_an_interrupt_returns_the_last_complete_iteration_and_resumes_exactly(tiny_model, reference):
    with pytest.warns(UserWarning, match="interrupted: returning the result of the 2 completed iterations"):
        part = _run(tiny_model, stop_at={3: KeyboardInterrupt()})[0]
    assert part.stopped == "interrupted" and part.iterations == 2
    done = _run(tiny_model, resume=[part])[0]
    assert done.stopped == "completed" and done.iterations == 5 and done.token_forwards == reference.token_forwards
    pd.testing.assert_frame_equal(done.history, reference.history, check_exact=True)
    assert done.state == reference.state


def test_sigterm_is_an_interrupt_inside_and_restored_after():
    import os
    import signal

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), sigterm_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_failure_saves_the_partial_result_then_raises(tiny_model, tmp_path):
    with pytest.raises(RuntimeError, match="boom") as caught:
        _run(tiny_model, stop_at={3: RuntimeError("boom")}, folder=str(tmp_path / "p"))
    saved = DreamResult.load(tmp_path / "p")
    assert (saved.stopped, saved.error, saved.iterations) == ("error", "RuntimeError: boom", 2)
    assert caught.value.dreamlens_result.iterations == 2
    assert any("resume= continues it" in n for n in caught.value.__notes__)


def test_checkpoints_per_objective(tiny_model, tmp_path):
    rs = _run(tiny_model, cfg={"checkpoint_every": 2, "checkpoint_dir": "unused"}, folder=str(tmp_path),
              objectives=(OBJ, "blocks.0.mlp.hook_post[5]"), per_objective=True)
    for k, r in enumerate(rs):
        saved = DreamResult.load(tmp_path / f"objective_{k}")
        assert saved.stopped == "checkpoint" and saved.iterations == 4 and saved.objective == r.objective


def test_a_stop_before_the_members_exist_returns_a_result_without_state(tiny_model):
    with pytest.warns(UserWarning, match="interrupted"):
        r = run(Toy(tiny_model, DreamConfig(length=3, iters=5), start_raises=KeyboardInterrupt()), progress=False)[0]
    assert r.stopped == "interrupted" and r.iterations == 0 and r.state == {}


# -- the methods' states: the keys results have always stored -------------------------------------


def test_epo_state_keys_and_round_trip(tiny_model):
    from dreamlens.optim.epo import EPOState

    r = dl.epo(tiny_model, OBJ, dl.EPOConfig(length=3, population=2, children=2, topk=8, iters=1), progress=False)
    assert list(r.state) == ["population", "pop_f", "pop_xe", "generator", "stall"]
    assert EPOState.from_dict(r.state).to_dict() == r.state
    old = {k: v for k, v in r.state.items() if k != "stall"}  # a checkpoint from before restart_patience
    assert EPOState.from_dict(old).stall == 0


def test_adapt_state_keys_and_round_trip(tiny_model):
    from dreamlens.optim.adapt import ADAPTState

    cfg = dl.ADAPTConfig(length=3, beams=2, beam_lm=2, beam_grad=1, children=2, iters=1)
    r = dl.adapt(tiny_model, OBJ, cfg, progress=False)
    assert list(r.state) == ["population", "pop_f", "pop_xe", "strength", "scale", "generator"]
    unit = torch.tensor(cfg.penalties(), dtype=torch.float64)
    assert ADAPTState.from_dict(r.state, unit).to_dict() == r.state
