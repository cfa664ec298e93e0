"""dreamlens: dream fluent prompts that maximally activate a feature of a TransformerLens model.

Names are imported lazily, so `import dreamlens` does no work and loads no model (nor torch). A type
checker reads the same names from the `TYPE_CHECKING` imports below.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import exports

__version__ = "0.1.0"

# public name -> module that defines it (relative to dreamlens)
_EXPORTS: dict[str, str] = {
    "load_model": "models",
    "bos_token_id": "models",
    "set_bos_token_id": "models",
    "ModelLoadError": "errors",
    "encode": "models",
    "decode": "models",
    "load_sae": "sae",
    "ModelSettings": "settings",
    "model_settings": "settings",
    "set_model_settings": "settings",
    "sae_model_settings": "settings",
    "objective": "objectives.parse",
    "Objective": "objectives.base",
    "Neuron": "objectives.neuron",
    "SAELatent": "objectives.sae_latent",
    "Direction": "objectives.direction",
    "Logit": "objectives.logit",
    "LogitDiff": "objectives.logit",
    "Combination": "objectives.base",
    "Max": "objectives.maximum",
    "ObjectiveError": "objectives.errors",
    "run_objectives": "objectives.forward",
    "scan": "analysis.scan",
    "ScanResult": "analysis.scan",
    "ScanConfig": "analysis.scan_config",
    "compare": "analysis.compare",
    "epo": "optim.epo",
    "EPOConfig": "optim.config",
    "adapt": "optim.adapt",
    "ADAPTConfig": "optim.config",
    "gcg": "optim.gcg",
    "GCGConfig": "optim.config",
    "dream": "dreaming",
    "Modes": "modes.result",
    "ModeSettings": "modes.settings",
    "DreamResult": "results",
    "DreamError": "errors",
    "DreamlensError": "errors",
    "attribute": "analysis.attribution",
    "attribute_frontier": "analysis.attribution",
    "Attribution": "analysis.attribution",
    "plot_frontier": "viz.plots",
    "plot_evolution": "viz.plots",
    "plot_thresholds": "viz.plots",
    "build_report": "viz.report",
    "write_report": "viz.report",
    "build_modes_report": "viz.report",
    "write_modes_report": "viz.report",
    "export_neuronpedia": "neuronpedia.export",
    "sweep": "sweeps",
    "load_sweep": "sweeps.store",
    "Sweep": "sweeps.store",
}
# submodules reachable as attributes (`dl.viz`)
_SUBMODULES = {
    "errors",
    "io",
    "models",
    "corpus",
    "sae",
    "objectives",
    "results",
    "optim",
    "modes",
    "scoring",
    "analysis",
    "viz",
    "sweeps",
    "neuronpedia",
    "settings",
    "devices",
    "install",
}

__all__ = [
    "load_model",
    "bos_token_id",
    "set_bos_token_id",
    "ModelLoadError",
    "encode",
    "decode",
    "load_sae",
    "ModelSettings",
    "model_settings",
    "set_model_settings",
    "sae_model_settings",
    "objective",
    "Objective",
    "Neuron",
    "SAELatent",
    "Direction",
    "Logit",
    "LogitDiff",
    "Combination",
    "Max",
    "ObjectiveError",
    "run_objectives",
    "scan",
    "ScanResult",
    "ScanConfig",
    "compare",
    "epo",
    "EPOConfig",
    "adapt",
    "ADAPTConfig",
    "gcg",
    "GCGConfig",
    "dream",
    "Modes",
    "ModeSettings",
    "DreamResult",
    "DreamError",
    "DreamlensError",
    "attribute",
    "attribute_frontier",
    "Attribution",
    "plot_frontier",
    "plot_evolution",
    "plot_thresholds",
    "build_report",
    "write_report",
    "build_modes_report",
    "write_modes_report",
    "export_neuronpedia",
    "sweep",
    "load_sweep",
    "Sweep",
]

if TYPE_CHECKING:  # the same names for a type checker (tests/test_public_api.py keeps the three lists equal)
    from .analysis.attribution import Attribution, attribute, attribute_frontier
    from .analysis.compare import compare
    from .analysis.scan import ScanResult, scan
    from .analysis.scan_config import ScanConfig
    from .dreaming import dream
    from .errors import DreamError, DreamlensError, ModelLoadError
    from .models import bos_token_id, decode, encode, load_model, set_bos_token_id
    from .modes.result import Modes
    from .modes.settings import ModeSettings
    from .neuronpedia.export import export_neuronpedia
    from .objectives.base import Combination, Objective
    from .objectives.direction import Direction
    from .objectives.errors import ObjectiveError
    from .objectives.forward import run_objectives
    from .objectives.logit import Logit, LogitDiff
    from .objectives.maximum import Max
    from .objectives.neuron import Neuron
    from .objectives.parse import objective
    from .objectives.sae_latent import SAELatent
    from .optim.adapt import adapt
    from .optim.config import ADAPTConfig, EPOConfig, GCGConfig
    from .optim.epo import epo
    from .optim.gcg import gcg
    from .results import DreamResult
    from .sae import load_sae
    from .settings import ModelSettings, model_settings, sae_model_settings, set_model_settings
    from .sweeps import sweep
    from .sweeps.store import Sweep, load_sweep
    from .viz.plots import plot_evolution, plot_frontier, plot_thresholds
    from .viz.report import build_modes_report, build_report, write_modes_report, write_report


__getattr__ = exports(__name__, _EXPORTS, _SUBMODULES)


def __dir__() -> list[str]:
    return sorted([*_EXPORTS, *_SUBMODULES, "__version__"])
