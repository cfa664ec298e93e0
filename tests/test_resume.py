"""A run stopped at any point and resumed gives bitwise the same history and frontier as one never stopped.

Stops: Ctrl-C in the model's forward pass, in the callback, during a checkpoint write; SIGTERM; a
crashing callback (the partial result is saved, then the error re-raised); `kill -9` between checkpoints.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import warnings

import pandas as pd
import pytest

import dreamlens as dl
from dreamlens.results import DreamResult

pytestmark = pytest.mark.usefixtures("one_thread")

OBJ = "blocks.1.mlp.hook_post[3]"
CONFIGS = {  # small, with restarts (EPO) and mutation strengths (ADAPT) inside the stopped span
    "epo": dict(length=5, population=3, children=6, topk=32, iters=6, restart_every=3, seed=1),
    "adapt": dict(length=4, beams=2, beam_lm=2, beam_grad=2, children=4, iters=6, patience=1, seed=1),
}


def _dream(model, method, callback=None, resume=None, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "interrupted: ..."
        return dl.dream(model, OBJ, method, progress=False, callback=callback, resume=resume, **{**CONFIGS[method], **kw})


@pytest.fixture(scope="module")
def reference(tiny_model):
    return {m: _dream(tiny_model, m) for m in CONFIGS}


def assert_same_run(resumed: DreamResult, ref: DreamResult) -> None:
    assert resumed.stopped == "completed" and resumed.iterations == ref.iterations
    pd.testing.assert_frame_equal(resumed.history, ref.history, check_exact=True)
    pd.testing.assert_frame_equal(resumed.frontier, ref.frontier, check_exact=True)


def _interrupt_at(iteration: int):
    def callback(info):
        if info.iteration == iteration:
            raise KeyboardInterrupt

    return callback


@pytest.mark.parametrize("method", CONFIGS)
def test_ctrl_c_in_the_forward_pass(tiny_model, reference, method):
    calls = {"n": 0}

    def hook(module, args, output):
        calls["n"] += 1
        if calls["n"] == {"epo": 12, "adapt": 28}[method]:  # mid-run, after ADAPT's beam search
            raise KeyboardInterrupt

    handle = tiny_model.blocks[0].register_forward_hook(hook)
    try:
        part = _dream(tiny_model, method)
    finally:
        handle.remove()
    assert part.stopped == "interrupted" and part.iterations < CONFIGS[method]["iters"]
    assert_same_run(_dream(tiny_model, method, resume=part), reference[method])


@pytest.mark.parametrize("method", CONFIGS)
def test_ctrl_c_in_the_callback(tiny_model, reference, method):
    part = _dream(tiny_model, method, callback=_interrupt_at(3))
    assert part.stopped == "interrupted" and part.iterations == 3  # iteration 3 was complete
    assert_same_run(_dream(tiny_model, method, resume=part), reference[method])


@pytest.mark.parametrize("method", CONFIGS)
def test_ctrl_c_during_a_checkpoint_write(tiny_model, reference, method, tmp_path, monkeypatch):
    save = DreamResult.save

    def interrupted_save(self, path, overwrite=False):
        if self.iterations == 4:
            raise KeyboardInterrupt
        return save(self, path, overwrite=overwrite)

    monkeypatch.setattr(DreamResult, "save", interrupted_save)
    part = _dream(tiny_model, method, checkpoint_every=2, checkpoint_dir=str(tmp_path / "ckpt"))
    monkeypatch.undo()
    assert part.stopped == "interrupted" and part.iterations == 4
    assert DreamResult.load(tmp_path / "ckpt").iterations == 2  # the write was atomic: the last good one
    assert_same_run(_dream(tiny_model, method, resume=part), reference[method])
    assert_same_run(_dream(tiny_model, method, resume=tmp_path / "ckpt"), reference[method])


@pytest.mark.parametrize("method", CONFIGS)
def test_sigterm_is_ctrl_c(tiny_model, reference, method):
    def callback(info):
        if info.iteration == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    def unhandled(signum, frame):  # without this, a run that ignores SIGTERM would end pytest itself
        raise RuntimeError("SIGTERM reached the test: the run did not handle it")

    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        part = _dream(tiny_model, method, callback=callback)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert part.stopped == "interrupted" and part.iterations == 2
    assert_same_run(_dream(tiny_model, method, resume=part), reference[method])


@pytest.mark.parametrize("method", CONFIGS)
def test_a_crashing_callback_saves_the_partial_result_then_raises(tiny_model, reference, method, tmp_path):
    def callback(info):
        if info.iteration == 3:
            raise RuntimeError("boom")

    folder = tmp_path / "partial"
    with pytest.raises(RuntimeError, match="boom") as caught:
        _dream(tiny_model, method, callback=callback, checkpoint_dir=str(folder))
    part = DreamResult.load(folder)
    assert part.stopped == "error" and part.error == "RuntimeError: boom" and part.iterations == 3
    assert caught.value.dreamlens_result.iterations == 3
    assert_same_run(_dream(tiny_model, method, resume=folder), reference[method])


_KILLED_RUN = """
import os, signal, sys, torch
import dreamlens as dl
from dreamlens.testing import tiny_model
torch.set_num_threads(1)
model = tiny_model()

def kill(info):
    if info.iteration == 3:
        os.kill(os.getpid(), signal.SIGKILL)

dl.dream(model, {obj!r}, {method!r}, progress=False, callback=kill, checkpoint_every=2,
         checkpoint_dir=sys.argv[1], **{config!r})
"""


@pytest.mark.parametrize("method", CONFIGS)
def test_kill_9_between_checkpoints(tiny_model, reference, method, tmp_path):
    # the conftest's tiny model, rebuilt the same way (seeded) in a process that is then killed
    script = textwrap.dedent(_KILLED_RUN).format(obj=OBJ, method=method, config=CONFIGS[method])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "ckpt")], env=env, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    part = DreamResult.load(tmp_path / "ckpt")
    assert part.stopped == "checkpoint" and part.iterations == 2
    assert_same_run(_dream(tiny_model, method, resume=tmp_path / "ckpt"), reference[method])


def test_stop_reasons_are_a_fixed_set(reference, tmp_path):
    from dreamlens.results import STOP_REASONS

    assert STOP_REASONS == ("completed", "budget", "callback", "interrupted", "checkpoint", "error")
    r = reference["epo"]
    assert r.stopped in STOP_REASONS and r.error == ""
    failed = DreamResult(**{**r.__dict__, "stopped": "error", "error": "RuntimeError: boom"})
    back = DreamResult.load(failed.save(tmp_path / "failed"))
    assert (back.stopped, back.error) == ("error", "RuntimeError: boom")
