"""Shared fixtures: a tiny random Llama-shaped model (fast unit tests), the embedded model, and the CLI
with the tiny model in place of any model it loads (`tiny_cli`); and `assert_one_error_line` and
`run_cli`, for checking the CLI (test modules import them)."""

from __future__ import annotations

import pytest
import torch


def assert_one_error_line(rc: int, err: str, *needles: str) -> None:
    """The CLI exited with status 2 and one line, `error: ...`, naming each of `needles` (no traceback)."""
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of the CLI; argparse's own errors exit through SystemExit."""
    from dreamlens import cli

    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture
def tiny_cli(tiny_model, monkeypatch):
    """The CLI with the tiny model in place of any model it would load; the names it was asked for."""
    from dreamlens import models

    loaded: list[str | None] = []
    monkeypatch.setattr(models, "load_model", lambda name=None, **k: loaded.append(name) or tiny_model)
    return loaded


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
def tiny_model():
    """2 layers, d_model 64, the embedded tokenizer and SmolLM2's architecture (GQA, rotary, gated): the
    model `dreamlens.testing.tiny_model` builds (a model spec string names it for a sweep's workers)."""
    from dreamlens.testing import tiny_model

    return tiny_model()


@pytest.fixture(scope="session")
def embedded_model():
    from dreamlens.models import load_model

    return load_model()


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0
