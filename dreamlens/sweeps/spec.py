"""A sweep's SPEC, expanded into the objectives it names: an objective with an index range
(`sae:embedded[0:256]`, `blocks.6.mlp.hook_post[0:1536:8]`), several separated by ';', or a file of them.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..objectives.parse import split_outside
from .errors import SweepSpecError

SPEC_HELP = (
    "SPEC is an objective with an index range, e.g. 'sae:embedded[0:256]' or 'blocks.6.mlp.hook_post[0:1536:8]' "
    "(START:STOP or START:STOP:STEP, STOP excluded), several objectives separated by ';', or a file with one "
    "objective per line ('#' starts a comment)"
)

_BRACKETS = re.compile(r"\[([^\[\]]*)\]")
_INT = re.compile(r"\s*(\d+)\s*")
_NEGATIVE = re.compile(r"\s*-\d+\s*")
_SLICE = re.compile(r"\s*(-?\d*)\s*:\s*(-?\d+)\s*(?::\s*(-?\d+)\s*)?")


def _axis(item: str, spec: str) -> range:
    """One comma-separated item of an index: an integer (a range of one) or START:STOP[:STEP]."""
    m = _INT.fullmatch(item)
    if m:
        return range(int(m.group(1)), int(m.group(1)) + 1)
    m = _SLICE.fullmatch(item)
    if not m:
        if _NEGATIVE.fullmatch(item):
            raise SweepSpecError(f"{spec!r}: a range counts units from 0; write {item.strip()!r} as its index from the start")
        raise SweepSpecError(f"{spec!r}: cannot read the index {item.strip()!r}; {SPEC_HELP}")
    start = int(m.group(1)) if m.group(1) else 0
    stop, step = int(m.group(2)), int(m.group(3)) if m.group(3) else 1
    if start < 0 or stop < 0:
        raise SweepSpecError(f"{spec!r}: a range counts units from 0 (no negative START or STOP), got {item.strip()!r}")
    if step <= 0:
        raise SweepSpecError(f"{spec!r}: the step of {item.strip()!r} must be a positive integer, got {step}")
    if stop <= start:
        raise SweepSpecError(f"{spec!r}: the range {item.strip()!r} is empty (STOP {stop} must be above START {start})")
    return range(start, stop, step)


def expand_one(spec: str) -> list[str]:
    """The objectives one objective spec names: itself, or one per index of its range. A range may take
    any axis of a multi-axis index (`blocks.3.attn.hook_z[4,0:16]`: head 4, dimensions 0..15); one
    spec holds at most one bracketed range (a combination of two ranges would be ambiguous)."""
    spec = spec.strip()
    ranged = [
        m for m in _BRACKETS.finditer(spec)
        if ":" in m.group(1) and not re.search(r"[\"']", m.group(1)) and not re.search(r"logit(?:diff)?$", spec[: m.start()])
    ]
    if not ranged:
        return [spec]
    if len(ranged) > 1:
        raise SweepSpecError(
            f"{spec!r} holds {len(ranged)} index ranges; a sweep objective takes one range (write the others out, "
            "one objective per line of a SPEC file)"
        )
    m = ranged[0]
    axes = [_axis(item, spec) for item in m.group(1).split(",")]
    head, tail = spec[: m.start()], spec[m.end() :]
    return [f"{head}[{','.join(map(str, idx))}]{tail}" for idx in itertools.product(*axes)]


def _is_file_spec(text: str) -> bool:
    """Whether a SPEC is meant as a file: an existing file, or (missing) something that cannot be an
    objective (no brackets, not a direction or max())."""
    if Path(text).is_file():
        return True
    return "[" not in text and ";" not in text and not text.startswith(("dir:", "max(", "max "))


def _file_lines(path: Path) -> Iterator[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SweepSpecError(f"no objectives file at {str(path)!r}; {SPEC_HELP}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SweepSpecError(f"cannot read the objectives file {str(path)!r} ({e}); give a UTF-8 text file") from None
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            yield line


def expand(spec: str | os.PathLike | Sequence[Any]) -> list[str]:
    """The objectives a SPEC names, in order: a string (ranges, ';'-separated objectives, or the path of a
    file with one per line), a path, or a list of such strings (or `Objective`s, by their string form).
    Raises `SweepSpecError` on a bad range, a duplicate objective, or no objective at all."""
    if isinstance(spec, os.PathLike):
        items = list(_file_lines(Path(spec)))
    elif isinstance(spec, str):
        text = spec.strip()
        items = list(_file_lines(Path(text))) if text and _is_file_spec(text) else [text]
    elif isinstance(spec, Sequence):
        items = [str(s) for s in spec]
    else:
        raise SweepSpecError(f"a SPEC is a string, a path or a list of objectives, got {type(spec).__name__}; {SPEC_HELP}")
    out: list[str] = []
    for item in items:
        for part in split_outside(item, ";"):
            if part.strip():
                out += expand_one(part)
    if not out:
        raise SweepSpecError(f"the SPEC {str(spec)!r} names no objective; {SPEC_HELP}")
    seen: dict[str, int] = {}
    for i, o in enumerate(out):
        if o in seen:
            raise SweepSpecError(
                f"the SPEC names {o!r} twice (objectives {seen[o]} and {i}); each objective is swept once: drop the repeat"
            )
        seen[o] = i
    return out
