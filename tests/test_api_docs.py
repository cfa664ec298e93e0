"""docs/api.md is the API reference generated from the docstrings (scripts/api_docs.py): it must say
what the code says now."""

from __future__ import annotations

import difflib
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def api_docs():
    spec = importlib.util.spec_from_file_location("api_docs", ROOT / "scripts" / "api_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_api_reference_is_current(api_docs):
    committed = (ROOT / "docs" / "api.md").read_text()
    fresh = api_docs.render()
    if committed != fresh:
        diff = "".join(list(difflib.unified_diff(committed.splitlines(True), fresh.splitlines(True),
                                                 "docs/api.md", "generated", n=1))[:40])
        pytest.fail(f"docs/api.md is stale: run `python scripts/api_docs.py`\n{diff}")


def test_every_public_name_is_documented(api_docs):
    import dreamlens

    text = (ROOT / "docs" / "api.md").read_text()
    missing = [n for n in dreamlens.__all__ if f"### `dreamlens.{n}`" not in text]
    assert not missing, f"not in docs/api.md: {missing}"


def test_a_changed_docstring_makes_it_stale(api_docs, monkeypatch):
    """The check can fail: the reference follows a docstring."""
    import dreamlens as dl

    before = api_docs.render()
    monkeypatch.setattr(dl.dream, "__doc__", "A docstring that is not in docs/api.md.")
    after = api_docs.render()
    assert after != before and "A docstring that is not in docs/api.md." in after
    assert api_docs.main(["--check"]) == 1


def test_signatures_and_config_fields_are_shown(api_docs):
    text = api_docs.render()
    assert "`dream(model: HookedTransformer, objective: Objective | str | Sequence[Objective | str], method: str = 'adapt'" in text
    assert "| `max_token_forwards` | `int \\| None` | `None` |" in text  # a config field, with its default
