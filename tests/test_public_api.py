"""The public names: every name `dreamlens` exports resolves (lazily, without a warning), a type checker
sees the same names, the README's names exist, and `import dreamlens` stays cheap (no torch)."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import dreamlens as dl

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", dl.__all__)
def test_every_exported_name_resolves_without_a_warning(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a name exported from a deprecated shim would warn here
        value = getattr(dl, name)
    assert value is not None
    assert getattr(value, "__name__", name) == name  # the object itself, not a module of that name


@pytest.mark.parametrize("package", ["dreamlens.analysis", "dreamlens.viz", "dreamlens.objectives", "dreamlens.scoring"])
def test_every_name_a_subpackage_exports_resolves_without_a_warning(package):
    module = importlib.import_module(package)
    assert len(module.__all__) == len(set(module.__all__))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in module.__all__:
            getattr(module, name)


def test_all_exports_and_the_type_checking_imports_agree():
    """`__all__`, the lazy loader's `_EXPORTS` and the names imported under `if TYPE_CHECKING:` (what
    pyright reads) are the same set, and each TYPE_CHECKING import names the module `_EXPORTS` uses."""
    assert len(dl.__all__) == len(set(dl.__all__))
    assert set(dl.__all__) == set(dl._EXPORTS)
    tree = ast.parse(inspect.getsource(dl))
    blocks = [node for node in tree.body if isinstance(node, ast.If) and isinstance(node.test, ast.Name)]
    (block,) = [node for node in blocks if isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"]
    imported: dict[str, str] = {}
    for node in block.body:
        assert isinstance(node, ast.ImportFrom) and node.level == 1 and node.module
        for alias in node.names:
            imported[alias.asname or alias.name] = node.module
    assert set(imported) == set(dl.__all__)
    for name, module in imported.items():
        assert module == dl._EXPORTS[name] or dl._EXPORTS[name].startswith(module + "."), name
        assert getattr(dl, name) is getattr(__import__(f"dreamlens.{module}", fromlist=[name]), name)


def test_dir_lists_the_exports_and_submodules():
    names = dir(dl)
    assert set(dl.__all__) <= set(names)
    for sub in ("optim", "objectives", "analysis", "scoring", "viz", "results", "models", "sae", "corpus"):
        assert sub in names
        assert getattr(dl, sub).__name__ == f"dreamlens.{sub}"


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        dl.no_such_name  # noqa: B018


def test_the_tour_names_exist():
    """What the README's 5-minute tour and optimizer section call."""
    for name in ("load_model", "objective", "epo", "adapt", "gcg", "dream", "scan", "attribute", "compare"):
        assert callable(getattr(dl, name)), name
    for config in (dl.EPOConfig, dl.ADAPTConfig, dl.GCGConfig):
        assert isinstance(config, type) and config(length=4).length == 4
    assert isinstance(dl.DreamResult.load, type(dl.DreamResult.load))  # a classmethod, bound to the class
    for member in ("frontier", "best", "save", "history"):
        assert hasattr(dl.DreamResult, member), member


def test_every_dl_name_the_readme_uses_exists():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    used = set(re.findall(r"\bdl\.([A-Za-z_]\w*)", readme))
    assert {"epo", "adapt", "gcg", "dream", "EPOConfig", "ADAPTConfig", "GCGConfig", "DreamResult", "scan", "attribute"} <= used
    missing = sorted(name for name in used if not hasattr(dl, name))
    assert not missing, f"the README uses dl.{missing} which dreamlens does not have"


def test_import_dreamlens_does_not_import_torch():
    code = "import sys, dreamlens; print('torch' in sys.modules, 'transformer_lens' in sys.modules, 'pandas' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split() == ["False", "False", "False"], out.stdout + out.stderr
