"""The errors of sweeps (each a `DreamlensError` that keeps its built-in base): one leaf module, so
the spec, the chunk, the store and the engines raise the same classes without importing each other."""

from __future__ import annotations

from ..errors import DreamlensError


class SweepError(DreamlensError, ValueError):
    """A sweep cannot run or be read: a bad setting, a folder that is not a sweep, a missing chunk."""


class SweepConfigError(SweepError):
    """The sweep folder holds a sweep with another config (or other objectives)."""


class SweepSpecError(DreamlensError, ValueError):
    """A sweep's SPEC cannot be read: a bad index range, no objective, a duplicate, a missing file."""


class RayEngineError(DreamlensError, RuntimeError):
    """The Ray engine cannot run: no cluster at the address, no CPU for a worker, or a chunk whose
    workers kept dying."""


class RayMissingError(DreamlensError, ImportError):
    """`engine="ray"` (or `--ray`) without ray installed."""
