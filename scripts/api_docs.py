"""Write docs/api.md, the API reference, from the docstrings and signatures of dreamlens's public names.

The public names are `dreamlens.__all__` and those of the subpackages the README uses (their `__all__`,
or a module's own public functions, classes and constants). Usage: `python scripts/api_docs.py` writes the
file; `--check` exits 1 when the file differs from what the code says (tests/test_api_docs.py runs that).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import enum
import importlib
import inspect
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "docs" / "api.md"

# (module, what it is for), in reading order; a name is documented under the first module that exports it
SECTIONS: tuple[tuple[str, str], ...] = (
    ("dreamlens", "the top level, `import dreamlens as dl`: models, objectives, optimizers, results, scans, plots, "
                  "reports, sweeps"),
    ("dreamlens.objectives", "what to maximize: the objective protocol, its kinds and the string form"),
    ("dreamlens.analysis", "reading a model against data: scans, comparisons, metrics, attribution, patterns"),
    ("dreamlens.viz", "figures and pages: plots, the HTML reports"),
    ("dreamlens.sweeps", "many objectives into one resumable table"),
    ("dreamlens.sae", "SAEs: the embedded one, local folders, sae-lens releases"),
    ("dreamlens.corpus", "text corpora: the embedded ones, local files, Hugging Face datasets, held-out splits"),
    ("dreamlens.install", "installing the embedded model and corpora"),
    ("dreamlens.scoring", "the machinery every optimizer shares: layout, xe, gradients, batching, the evaluator"),
    ("dreamlens.errors", "the errors of the top-level modules (models, corpora, SAEs, results, settings, devices, installs) "
                         "and the base class every error shares"),
)
MAX_VALUE = 160  # characters of a constant's repr shown


def public_names(module: Any) -> list[str]:
    """`__all__`, or the module's own public functions, classes and UPPER_CASE constants, in source order."""
    names = getattr(module, "__all__", None)
    if names is not None:
        return list(names)
    assigned = _assigned_here(module)
    out = []
    for name, value in vars(module).items():
        if name.startswith("_"):
            continue
        if inspect.isfunction(value) or inspect.isclass(value):
            if value.__module__ == module.__name__:
                out.append(name)
        elif name.isupper() and name in assigned:
            out.append(name)
    return out


def _assigned_here(module: Any) -> set[str]:
    """Names the module's own source assigns at top level (not those it imports)."""
    tree = ast.parse(inspect.getsource(module))
    names = set()
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def _annotation(value: Any) -> str:
    if value is inspect.Parameter.empty:
        return ""
    if isinstance(value, str):
        return value
    return inspect.formatannotation(value)


def _default(value: Any) -> str:
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    text = repr(value)
    return re.sub(r" at 0x[0-9a-f]+", "", text)  # a function's repr: no memory address


def signature(obj: Any, *, drop_first: bool = False, returns: bool = True) -> str | None:
    """`(model: HookedTransformer, objective: ..., *, config: ... = None) -> DreamResult`, or None.
    `drop_first`: without the first parameter (a method's `self`)."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    if drop_first and sig.parameters:
        sig = sig.replace(parameters=list(sig.parameters.values())[1:])
    parts = []
    star_done = False
    for i, p in enumerate(sig.parameters.values()):
        if p.kind is p.KEYWORD_ONLY and not star_done:
            parts.append("*")
            star_done = True
        if p.kind is p.VAR_POSITIONAL:
            star_done = True
        prefix = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "")
        text = prefix + p.name
        ann = _annotation(p.annotation)
        if ann:
            text += f": {ann}"
        if p.default is not inspect.Parameter.empty:
            text += f" = {_default(p.default)}" if ann else f"={_default(p.default)}"
        parts.append(text)
        if p.kind is p.POSITIONAL_ONLY and (i + 1 == len(sig.parameters) or list(sig.parameters.values())[i + 1].kind
                                            is not p.POSITIONAL_ONLY):
            parts.append("/")
    ret = _annotation(sig.return_annotation) if returns else ""
    return f"({', '.join(parts)})" + (f" -> {ret}" if ret else "")


def docstring(obj: Any) -> str:
    doc = inspect.getdoc(obj)
    return doc.strip() if doc else "*(no docstring)*"


def _own_doc(obj: Any) -> str | None:
    """The object's own docstring, not one inherited from a built-in base (e.g. `object.__init__`'s)."""
    doc = obj.__dict__.get("__doc__") if isinstance(obj, type) else getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if doc else None


def _members(cls: type) -> list[str]:
    """One line per public method and property the class itself defines, in source order; a method
    without a docstring of its own shows the one it overrides (inspect.getdoc looks it up)."""
    out = []
    for name, value in cls.__dict__.items():
        if name.startswith("_"):
            continue
        if isinstance(value, property):
            doc = inspect.getdoc(getattr(cls, name))
            head = f"**`.{name}`** (property)"
        elif isinstance(value, (staticmethod, classmethod)) or inspect.isfunction(value):
            bound = getattr(cls, name)  # a classmethod bound to the class: no `cls` in its signature
            sig = signature(bound, drop_first=inspect.isfunction(value))
            doc = inspect.getdoc(bound)
            kind = " (classmethod)" if isinstance(value, classmethod) else " (staticmethod)" if isinstance(
                value, staticmethod) else ""
            head = f"**`.{name}{sig or '(...)'}`**{kind}"
        else:
            continue
        out.append(f"- {head}" + (f": {_one_paragraph(doc)}" if doc else ""))
    return out


def _fields(cls: type) -> list[str]:
    """A dataclass's fields as table rows: name, type, default."""
    rows = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f"`{_default(f.default)}`"
        elif f.default_factory is not dataclasses.MISSING:
            default = f"`{_default(f.default_factory())}`"
        else:
            default = "required"
        ann = _annotation(f.type).replace("|", "\\|")
        rows.append(f"| `{f.name}` | `{ann}` | {default} |")
    return rows


def document(qualname: str, obj: Any) -> list[str]:
    """The Markdown of one public name."""
    lines = [f"### `{qualname}`", ""]
    if inspect.isclass(obj):
        kind = "exception" if issubclass(obj, BaseException) else "dataclass" if dataclasses.is_dataclass(obj) else "class"
        bases = [b.__name__ for b in obj.__bases__ if b is not object]
        sig = None if issubclass(obj, BaseException) else signature(obj, returns=False)
        head = f"{kind} `{obj.__name__}{sig or ''}`" if sig else f"{kind} `{obj.__name__}`"
        if bases:
            head += f", a subclass of {', '.join(f'`{b}`' for b in bases)}"
        lines += [head, "", _own_doc(obj) or "*(no docstring)*", ""]
        if dataclasses.is_dataclass(obj):
            lines += ["| field | type | default |", "|---|---|---|", *_fields(obj), ""]
        members = _members(obj)
        lines += [*members, ""] if members else []
    elif callable(obj):
        lines += [f"`{obj.__name__}{signature(obj) or '(...)'}`", "", docstring(obj), ""]
    else:
        text = _default(obj)
        if len(text) > MAX_VALUE:
            text = text[: MAX_VALUE - 3] + "..."
        lines += [f"constant, a `{type(obj).__name__}`: `{text}`", ""]
    return lines


def _one_paragraph(doc: str) -> str:
    """A member's docstring on one line (its paragraphs joined), so the member list stays a list."""
    return " ".join(doc.split())


def _anchor(heading: str, taken: dict[str, int]) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, `-1`, `-2` on repeats
    (`dreamlens.objective` and `dreamlens.Objective`)."""
    base = re.sub(r"[^a-z0-9_ -]", "", heading.lower()).replace(" ", "-")
    n = taken.get(base, 0)
    taken[base] = n + 1
    return f"{base}-{n}" if n else base


def render() -> str:
    """The whole of docs/api.md."""
    seen: set[int] = set()
    anchors: dict[str, int] = {"dreamlens-api-reference": 1}
    body: list[str] = []
    toc: list[str] = []
    for module_name, purpose in SECTIONS:
        module = importlib.import_module(module_name)
        entries = []
        for name in public_names(module):
            obj = getattr(module, name)
            if not isinstance(obj, (int, float, str, tuple, dict, frozenset)) and id(obj) in seen:
                continue  # documented under an earlier module (e.g. `dl.scan`'s ScanResult)
            seen.add(id(obj))
            entries.append((f"{module_name}.{name}", obj))
        toc.append(f"- [`{module_name}`](#{_anchor(module_name, anchors)}): {purpose}")
        intro = (inspect.getdoc(module) or "").strip().split("\n\n")[0]  # what the module is for
        body += [f"## {module_name}", "", intro, ""]
        links = [f"[`{q.rsplit('.', 1)[1]}`](#{_anchor(q, anchors)})" for q, _ in entries]
        body.append("Names: " + ", ".join(links) + ".")
        body.append("")
        for qualname, obj in entries:
            body += document(qualname, obj)
    head = [
        "# dreamlens API reference",
        "",
        "Generated from the docstrings and signatures by `python scripts/api_docs.py` (do not edit by hand;",
        "`tests/test_api_docs.py` fails when this file is stale). A name exported by several modules is",
        "documented once, under the first of them here.",
        "",
        *toc,
        "",
    ]
    text = "\n".join(head + body)
    return re.sub(r"\n{3,}", "\n\n", text).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/api.md is stale, write nothing")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not TARGET.is_file() or TARGET.read_text() != text:
            print(f"{TARGET.relative_to(ROOT)} is stale: run `python scripts/api_docs.py`", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    print(f"wrote {TARGET.relative_to(ROOT)} ({len(text) / 1e3:.0f} kB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
