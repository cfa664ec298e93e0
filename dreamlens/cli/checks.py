"""Checks of the `dreamlens` command that run before any model loads: each --out can be written (and
replaces nothing it should not), and a result folder given on the command line loads."""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..errors import OutputError, ResultError
from ..modes.result import check_modes_folder
from ..results import check_output_folder
from ..viz.report import load_result as load


def _writable(path: Path, what: str) -> None:
    """Fail before any compute if nothing can be written at `path` (a folder, or a file's folder)."""
    parent = path
    while not parent.exists():
        parent = parent.parent
    try:
        if not parent.is_dir():
            raise NotADirectoryError(20, "not a directory")
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise OutputError(f"cannot write {what} {str(path)!r} ({e.strerror or e}); choose a writable folder") from None


def check_out_folder(out: str, marker: str, kind: str, *, force: bool, resume: bool = False) -> None:
    """Refuse an --out folder that already holds a `kind` (its `marker` file) unless --force (or
    --resume, where the command has it), and one that cannot be written."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise OutputError(f"--out {out!r} is a file; give a folder for the {kind}")
    if (path / marker).exists() and not force:
        how = "--resume FOLDER to continue it, --force to replace it" if resume else "--force to replace it"
        raise OutputError(f"--out {out!r} already holds a {kind}; pass {how}, or choose another folder")
    _writable(path, f"the {kind} to --out")


def check_dream_out(out: str, *, force: bool, resume: bool = True) -> None:
    """A dream's --out, refused before any compute wherever the result could not be saved after it: the
    CLI's own rule (an existing result needs --resume or --force), then `DreamResult.save`'s (never a
    folder that holds other files)."""
    check_out_folder(out, "result.json", "dream result", force=force, resume=resume)
    check_output_folder(Path(out), overwrite=True)


def check_modes_out(out: str, *, force: bool) -> None:
    """A --modes run's --out, refused before any compute wherever `Modes.save` would refuse it after:
    modes already there need --force; a dream result or other files are never replaced."""
    check_out_folder(out, "modes.json", "set of modes", force=force)
    check_modes_folder(Path(out), overwrite=True)


def check_out_file(out: str, kind: str, *, force: bool) -> None:
    path = Path(out)
    if path.is_dir():
        raise OutputError(f"--out {out!r} is a folder; give the path of the {kind} file to write")
    if path.exists() and not force:
        raise OutputError(f"--out {out!r} already exists; pass --force to replace it, or choose another file")
    _writable(path.parent if str(path.parent) else Path("."), f"the {kind} to --out")


def load_result(folder: str, what: str):
    """The dream result in `folder`; a `ResultError` names the argument (`what`) it came from."""
    try:
        return load(folder)
    except ResultError as e:
        raise ResultError(f"{what}: {e}") from e
