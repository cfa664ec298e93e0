"""Objectives: what a dream maximizes, one protocol for neurons, SAE latents, directions and logits;
this package re-exports every public name of the former module dreamlens/objectives.py."""

from .base import Combination, Objective, Reduce
from .direction import Direction
from .errors import NonFiniteError, ObjectiveError
from .forward import Capture, default_start, run_objectives, stop_at_layer, unembed
from .hooks import hook_shape
from .logit import Logit, LogitDiff
from .maximum import Max
from .neuron import Neuron
from .parse import load_vector, objective
from .sae_latent import SAELatent

__all__ = [
    "Capture",
    "Combination",
    "Direction",
    "Logit",
    "LogitDiff",
    "Max",
    "Neuron",
    "NonFiniteError",
    "Objective",
    "ObjectiveError",
    "Reduce",
    "SAELatent",
    "default_start",
    "hook_shape",
    "load_vector",
    "objective",
    "run_objectives",
    "stop_at_layer",
    "unembed",
]
