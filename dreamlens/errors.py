"""The one base class of every error dreamlens raises on purpose.

Each subclass keeps the built-in exception it always derived from (`ValueError`, `OSError`, ...), so
`except ValueError` still works; `except DreamlensError` catches every error that is the user's to fix,
and the CLI prints such an error as one line, `error: <message>`, without a traceback.
"""

from __future__ import annotations


class DreamlensError(Exception):
    """An error dreamlens raises on purpose: the message names the bad value and the fix."""


class OutputError(DreamlensError, OSError):
    """An output path cannot be written, or already holds results that would be overwritten."""


class DreamError(DreamlensError, ValueError):
    """Bad optimizer input; the message names the value and the fix."""
