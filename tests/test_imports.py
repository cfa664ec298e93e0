"""The package's import structure, read from the AST of every module under dreamlens/ (and, for the lazy
packages' name tables, from importlib): no import circle, no import up the floors, and few imports hidden
inside functions. A module that imports a sibling's sibling, a package's `__init__` that loads its
modules, a lazy `exports` table that loads one on first use: each is an edge of the graph."""

from __future__ import annotations

import ast
import importlib
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

import dreamlens

PACKAGE = "dreamlens"
ROOT = Path(dreamlens.__file__).resolve().parent

# The floors, lowest first: a module may import its own floor and the ones below, never one above. The
# most specific prefix of a module's name decides its floor (`dreamlens.neuronpedia.ids` before
# `dreamlens.neuronpedia`); `dreamlens` itself (the package's `__init__`, the public names) is above all.
FLOORS: tuple[tuple[str, ...], ...] = (
    # 0: no dreamlens dependency but each other: errors, files, the lazy tables, settings, devices
    ("errors", "io", "lazy", "install", "settings", "devices"),
    # 1: loading a model and its tokenizer
    ("models",),
    # 2: what sits beside a model: corpora, SAEs, a dream's result, the test helpers
    ("corpus", "sae", "results", "testing"),
    # 3: what a dream maximizes
    ("objectives",),
    # 4: how a candidate prompt is scored
    ("scoring",),
    # 5: leaves of analysis and viz: their errors, the HTML templates and the token-view renderer that
    # analysis' `Attribution` shows itself through (`attr.render()`), which reads only its numbers
    ("analysis.errors", "viz.errors", "viz.html", "viz.attribution"),
    # 6: scans, metrics, attribution, patterns (what the optimizers' starts and the reports read)
    ("analysis",),
    # 7: the optimizers, by name (`optim.methods`)
    ("optim",),
    # 8: a dream's modes (analysis and optimizers together)
    ("modes",),
    # 9: `dl.dream`, the one entry point: a method, its modes, its start from examples
    ("dreaming",),
    # 10: many dreams, stored
    ("sweeps",),
    # 11: Neuronpedia's ids and its export (the export reads sweeps)
    ("neuronpedia",),
    # 12: figures and pages of every result above
    ("viz",),
    # 13: the command line
    ("cli",),
)


# Imports of the package inside functions (each a dependency the module's header does not show): at most
# this many. Lower it when you remove some; an import belongs inside a function only when a heavy or
# optional dependency (torch, circuitsvis, ray) must not load with the module, and says so (`# lazy:`).
MAX_FUNCTION_IMPORTS = 3  # 146 before issue 25: the parser's two device checks (torch), attribution's renderer (circuitsvis)
LAZY = "# lazy:"  # the reason an import waits for its function, on its lines or on the line above its block of imports


@dataclass(frozen=True)
class Import:
    """One import statement's edge: `importer` (a module name) imports `target` at `line`."""

    importer: str
    target: str
    line: int
    in_function: bool  # inside a def (runs when the function does), not when the module loads
    type_checking: bool  # under `if TYPE_CHECKING:` (never runs)


def module_files(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """Every module of the package, by dotted name (a package by its own name, for its `__init__.py`)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def lazy_table(module: str, tree: ast.Module) -> dict[str, str]:
    """A lazy package's public names, each mapped to the module that defines it: the table its
    `__getattr__ = exports(__name__, names, ...)` reads, evaluated in the package's own namespace."""
    for node in tree.body:
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Name)
                and node.value.func.id == "exports" and len(node.value.args) >= 2):
            names = eval(compile(ast.Expression(node.value.args[1]), module, "eval"), vars(importlib.import_module(module)))
            return {name: f"{module}.{home}" for name, home in names.items()}
    return {}


def _absolute(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module name a `from X import ...` names (X resolved against the importer)."""
    if node.level == 0:
        return node.module or ""
    parts = importer.split(".")
    if not is_package:
        parts.pop()
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join([*parts, *([node.module] if node.module else [])])


def _known(name: str, modules: Mapping[str, Path]) -> str:
    """The innermost module of the package that `name` (a module, or a module's attribute) lies in."""
    while name not in modules and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def imports_of(module: str, path: Path, modules: Mapping[str, Path], lazy: Mapping[str, Mapping[str, str]],
               package: str = PACKAGE) -> list[Import]:
    """Every import of a module of the package that `module` makes, each resolved to the module that runs:
    `from pkg import sub` is pkg.sub, `from lazy_pkg import name` the module its table names for `name`."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool, type_checking: bool) -> None:
        for child in ast.iter_child_nodes(node):
            fn = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            tc = type_checking or (isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test))
            targets: list[str] = []
            if isinstance(child, ast.Import):
                targets = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = _absolute(module, is_package, child)
                for alias in child.names:
                    if f"{base}.{alias.name}" in modules:
                        targets.append(f"{base}.{alias.name}")
                    elif alias.name in lazy.get(base, {}):
                        targets.append(lazy[base][alias.name])
                    else:
                        targets.append(base)
            for target in dict.fromkeys(targets):
                if target == package or target.startswith(package + "."):
                    found.append(Import(module, _known(target, modules), child.lineno, fn, tc))
            visit(child, fn, tc)

    visit(tree, False, False)
    return found


def package_imports(root: Path = ROOT, package: str = PACKAGE) -> list[Import]:
    """Every import of the package by the package, module by module."""
    modules = module_files(root, package)
    lazy = {}
    for name, path in modules.items():
        if path.name == "__init__.py":
            lazy[name] = lazy_table(name, ast.parse(path.read_text()))
    return [imp for name, path in modules.items() for imp in imports_of(name, path, modules, lazy, package)]


def graph_of(imports: Iterable[Import], allowed: frozenset[tuple[str, str]] = frozenset()) -> dict[str, set[str]]:
    """The import graph: each module to the modules it imports when it or its functions run (the imports
    under `if TYPE_CHECKING:` never run and are left out, as are the `allowed` edges)."""
    graph: dict[str, set[str]] = {}
    for imp in imports:
        graph.setdefault(imp.importer, set())
        if not imp.type_checking and imp.importer != imp.target and (imp.importer, imp.target) not in allowed:
            graph[imp.importer].add(imp.target)
    return graph


def cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The graph's circles: every strongly connected component of more than one node (Tarjan's algorithm,
    without recursion), each sorted, the list sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    nodes = sorted({*graph, *(w for ws in graph.values() for w in ws)})
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, edges = work[-1]
            w = next(edges, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found)


def a_circle(graph: Mapping[str, Iterable[str]], component: list[str]) -> list[str]:
    """One circle through the component's first module (a -> b -> ... -> a), to name in a message."""
    inside = set(component)
    start = component[0]
    paths = {start: [start]}
    frontier = [start]
    while frontier:  # breadth first: the shortest way back to the start
        nxt = []
        for v in frontier:
            for w in sorted(graph.get(v, ())):
                if w == start:
                    return [*paths[v], start]
                if w in inside and w not in paths:
                    paths[w] = [*paths[v], w]
                    nxt.append(w)
        frontier = nxt
    return component


def floor_of(module: str, floors: tuple[tuple[str, ...], ...] = FLOORS, package: str = PACKAGE) -> int:
    """The floor of a module: that of the longest prefix in the table (`dreamlens` itself above all)."""
    if module == package:
        return len(floors)
    best, best_len = None, -1
    for level, names in enumerate(floors):
        for name in names:
            prefix = f"{package}.{name}"
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = level, len(prefix)
    if best is None:
        raise AssertionError(f"{module} is on no floor: add it (or its package) to FLOORS in tests/test_imports.py")
    return best


def upward(imports: Iterable[Import], allowed: frozenset[tuple[str, str]] = frozenset(),
           floors: tuple[tuple[str, ...], ...] = FLOORS, package: str = PACKAGE) -> list[Import]:
    """The imports (at module level or inside a function) of a module on a floor above the importer's. A name
    that a package's own `__init__` defines (`from .. import __version__`) is no such import for the package's
    modules: Python runs a package's `__init__` before any of its modules."""
    return [imp for imp in imports if not imp.type_checking and (imp.importer, imp.target) not in allowed
            and not imp.importer.startswith(imp.target + ".")
            and floor_of(imp.target, floors, package) > floor_of(imp.importer, floors, package)]


def where(imp: Import) -> str:
    return f"{module_files()[imp.importer].relative_to(ROOT.parent)}:{imp.line}"


IMPORTS = package_imports()


def test_no_import_circle():
    graph = graph_of(IMPORTS)
    found = cycles(graph)
    lines = []
    for component in found:
        circle = a_circle(graph, component)
        steps = []
        for a, b in itertools.pairwise(circle):
            imp = next(i for i in IMPORTS if i.importer == a and i.target == b and not i.type_checking)
            steps.append(f"{a} -> {b} ({where(imp)}{', in a function' if imp.in_function else ''})")
        lines.append(f"circle of {len(component)} modules {component}:\n    " + "\n    ".join(steps))
    assert not found, (
        "import circles in the package (break each by moving what both sides need into a module below them both, "
        "e.g. an error class into errors.py, or a protocol into the package's base module):\n" + "\n".join(lines)
    )


def test_no_import_up_the_floors():
    bad = upward(IMPORTS)
    lines = [
        f"{where(imp)}: {imp.importer} (floor {floor_of(imp.importer)}) imports {imp.target} (floor {floor_of(imp.target)}); "
        f"move what it needs down to {imp.importer}'s floor or below, or take it as an argument"
        for imp in bad
    ]
    assert not bad, "imports up the floors of FLOORS in tests/test_imports.py:\n" + "\n".join(lines)


def test_every_module_has_a_floor():
    for module in module_files():
        floor_of(module)


def test_few_imports_inside_functions():
    inside = sorted({(imp.importer, imp.line) for imp in IMPORTS if imp.in_function and not imp.type_checking})
    assert len(inside) <= MAX_FUNCTION_IMPORTS, (
        f"{len(inside)} imports of the package inside functions, more than MAX_FUNCTION_IMPORTS = {MAX_FUNCTION_IMPORTS}: "
        "import at the top of the module unless a heavy or optional dependency must wait for the call:\n"
        + "\n".join(f"{module_files()[m].relative_to(ROOT.parent)}:{line}" for m, line in inside)
    )


def unexplained_lazy_imports(path: Path) -> list[int]:
    """The lines of the imports inside functions of the file at `path` (of any module: the package's, another
    package's, Python's) without a `# lazy: <reason>` comment: on one of the statement's lines, or on the line
    above the run of import statements it belongs to (one reason for a block of imports, as isort keeps it)."""
    text = path.read_text()
    lines = text.splitlines()
    missing = []

    def explained(block: list[ast.stmt], k: int) -> bool:
        node = block[k]
        if any(LAZY in lines[i - 1] for i in range(node.lineno, (node.end_lineno or node.lineno) + 1)):
            return True
        first = k  # the run of imports, one right under the other, that this one ends
        while first > 0 and isinstance(block[first - 1], ast.Import | ast.ImportFrom) and \
                (block[first - 1].end_lineno or 0) == block[first].lineno - 1:
            first -= 1
        above = block[first].lineno - 2
        return above >= 0 and lines[above].strip().startswith(LAZY)

    def visit(node: ast.AST, in_function: bool) -> None:
        for field in ("body", "orelse", "finalbody", "handlers"):
            block = getattr(node, field, None)
            if not isinstance(block, list):
                continue
            for k, child in enumerate(block):
                if in_function and isinstance(child, ast.Import | ast.ImportFrom) and not explained(block, k):
                    missing.append(child.lineno)
        for child in ast.iter_child_nodes(node):
            type_checking = isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test)
            if not type_checking:
                visit(child, in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda))

    visit(ast.parse(text, str(path)), False)
    return sorted(missing)


def test_every_import_inside_a_function_says_why():
    bad = [f"{path.relative_to(ROOT.parent)}:{line}" for path in module_files().values() for line in unexplained_lazy_imports(path)]
    assert not bad, (
        "imports inside functions without a reason: import at the top of the module, or, where a heavy or optional "
        f"dependency must wait for the call, say which and why with a trailing `{LAZY} <reason>` (or one on the line "
        "above a block of imports):\n" + "\n".join(bad)
    )


def test_relative_imports_go_at_most_one_package_up():
    deep = []
    for path in module_files().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level > 2:
                deep.append(f"{path.relative_to(ROOT.parent)}:{node.lineno}: {ast.unparse(node)}")
    assert not deep, "relative imports more than one package up (import by the package's name, or from ..x):\n" + "\n".join(deep)


# The checks themselves can fail: a synthetic package with a circle, an upward import and a lazy table.


def test_cycles_finds_a_circle_and_only_it():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": {"e"}, "e": set(), "f": {"f"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert a_circle(graph, ["a", "b", "c"]) == ["a", "b", "c", "a"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert cycles({"x": {"y"}, "y": {"x"}, "p": {"q"}, "q": {"p"}}) == [["p", "q"], ["x", "y"]]


def test_a_synthetic_package(tmp_path):
    pkg = tmp_path / "synth"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .low import thing\n")
    (pkg / "sub" / "low.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .high import Other\n"
                                        "thing = 1\ndef f():\n    from ..top import up\n")
    (pkg / "sub" / "high.py").write_text("from . import low\nfrom synth.sub import thing\n")
    (pkg / "top.py").write_text("from .sub.high import low\nup = 2\n")
    imports = package_imports(pkg, "synth")
    edges = {(i.importer, i.target, i.in_function, i.type_checking) for i in imports}
    assert edges == {
        ("synth.sub", "synth.sub.low", False, False),
        ("synth.sub.low", "synth.sub.high", False, True),
        ("synth.sub.low", "synth.top", True, False),
        ("synth.sub.high", "synth.sub.low", False, False),
        ("synth.sub.high", "synth.sub", False, False),
        ("synth.top", "synth.sub.high", False, False),
    }
    # low -> top (in a function) -> high -> low (and high -> sub's __init__ -> low): a circle; the TYPE_CHECKING edge low -> high does not count
    assert cycles(graph_of(imports)) == [["synth.sub", "synth.sub.high", "synth.sub.low", "synth.top"]]
    assert cycles(graph_of(imports, frozenset({("synth.sub.low", "synth.top")}))) == []
    floors = (("sub",), ("top",))
    assert [(i.importer, i.target) for i in upward(imports, floors=floors, package="synth")] == [("synth.sub.low", "synth.top")]
    with pytest.raises(AssertionError, match="synth.other is on no floor"):
        floor_of("synth.other", floors, "synth")


def test_a_lazy_table_is_read():
    table = lazy_table(PACKAGE, ast.parse((ROOT / "__init__.py").read_text()))
    assert table["scan"] == "dreamlens.analysis.scan"
    assert table["DreamlensError"] == "dreamlens.errors"


def test_the_readme_draws_the_floors():
    """The README's diagram of the floors ("How the code is organized") is FLOORS: each numbered line names
    modules of that floor, and every floor has its line."""
    readme = (ROOT.parent / "README.md").read_text()
    section = readme[readme.index("## How the code is organized"):]
    block = section[section.index("```\n") + 4:section.index("\n```", section.index("```\n") + 4)]
    seen = set()
    for line in block.splitlines():
        parts = line.split()
        if not parts or not parts[0].isdigit():
            continue
        level = int(parts[0])
        names = [p for p in parts[1:] if p.endswith((".py", "/"))]
        assert names, f"README floor {level} names no module: {line!r}"
        for name in names:
            module = f"{PACKAGE}." + name.removesuffix("/").removesuffix(".py").replace("/", ".")
            assert floor_of(module) == level, f"the README puts {name} on floor {level}, FLOORS on {floor_of(module)}"
        seen.add(level)
    assert seen == set(range(len(FLOORS))), f"the README's diagram lacks floors {sorted(set(range(len(FLOORS))) - seen)}"


def test_an_import_inside_a_function_without_a_reason_is_found(tmp_path):
    path = tmp_path / "m.py"
    path.write_text(
        "import json\n"  # 1: the module's own: no reason needed
        "def f():\n"
        "    import torch  # lazy: heavy\n"  # 3
        "    import numpy\n"  # 4: no reason
        "    # lazy: optional, both\n"
        "    import ray\n"  # 6
        "    from ray import util\n"  # 7: in the block under the reason
        "\n"
        "    from pandas import (\n"  # 9: no reason
        "        DataFrame,\n"
        "    )\n"
        "    try:\n"
        "        from a import b  # lazy: optional\n"  # 13
        "    except ImportError:\n"
        "        from c import b\n"  # 15: no reason
        "    class C:\n"
        "        def g(self):\n"
        "            from .x import y\n"  # 18: no reason
        "if True:\n"
        "    import os\n"  # 20: at the module's level
    )
    assert unexplained_lazy_imports(path) == [4, 9, 15, 18]
