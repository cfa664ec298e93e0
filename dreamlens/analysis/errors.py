"""The errors of scans and comparisons (each a `DreamlensError` that keeps its built-in base).
One module, so the sketch, the cache and the scan raise the same classes without importing each other.
"""

from __future__ import annotations

from ..errors import DreamlensError


class ScanError(DreamlensError, ValueError):
    """Bad scan input (empty corpus, zero budget, a window the model cannot hold); the message says the fix."""


class ScanLookupError(DreamlensError, IndexError, KeyError):
    """An objective asked of a scan that it does not hold (by index or by name)."""

    def __str__(self) -> str:  # LookupError would quote the message
        return str(self.args[0]) if self.args else ""


class CompareError(DreamlensError, TypeError):
    """`compare` was given something that is not a dream result."""


class ScanCacheError(ScanError):
    """A saved scan is missing, partial or corrupt."""


class AttributionError(DreamlensError, ValueError):
    """Bad attribution input (an empty prompt, ids outside the vocabulary, no alternatives asked for)."""
