"""Which Neuronpedia feature an objective is: its model id, source id (the `layer` field of Neuronpedia's
rows, e.g. "8-res-jb") and index, from the SAE's `neuronpedia_id`, else made up from the hook name."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..objectives.parse import parse_unit
from ..sae import EMBEDDED_SAE, embedded_sae_dir, sae_neuronpedia_id
from .errors import NeuronpediaError

NEURONPEDIA = "https://www.neuronpedia.org"


@dataclass(frozen=True)
class Feature:
    """One feature as Neuronpedia names it: `model_id`/`source`/`index` (its page is `url`)."""

    model_id: str
    source: str
    index: int

    @property
    def url(self) -> str:
        return f"{NEURONPEDIA}/{self.model_id}/{self.source}/{self.index}"


def _slug(text: str) -> str:
    """Lower-case letters, digits and dashes (what Neuronpedia's ids are made of)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def hook_source(hook: str) -> str:
    """A source id for a hook with no Neuronpedia source of its own: LAYER-REST, e.g. 'blocks.6.mlp.hook_post'
    -> '6-mlp-hook-post' (Neuronpedia's ids begin with the layer); hooks outside the blocks keep their name."""
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", hook)
    return f"{m.group(1)}-{_slug(m.group(2))}" if m else _slug(hook)


def neuronpedia_page(objective: str) -> Feature | None:
    """The Neuronpedia page of an SAE latent whose SAE has a `neuronpedia_id` (looked up without loading
    the SAE), else None: what the HTML report links to."""
    unit = parse_unit(objective)
    if unit is None or unit.kind == "neuron":
        return None
    try:
        found = sae_neuronpedia_id(unit.where)
    except Exception:  # an SAE that cannot even be looked up has no page to link to
        return None
    if not found or "/" not in found:
        return None
    model_id, source = found.split("/", 1)
    return Feature(model_id, source, unit.index[0])


def export_feature(objective: str, model_name: str, *, model_id: str | None = None, source: str | None = None) -> Feature:
    """The feature an objective's rows are exported as: an SAE latent's Neuronpedia id where it has one,
    else `model_id` (default: the dream's `model_name`) and `source` (default: `hook_source` of a neuron's
    hook); `model_id` and `source`, when given, always win. `NeuronpediaError` for an objective that is
    not one neuron or SAE latent read at the last position (Neuronpedia's rows are per token; dreamlens
    keeps the value at the token it reads)."""
    unit = parse_unit(objective)
    if unit is None:
        raise NeuronpediaError(f"{objective!r} is not one neuron or SAE latent: a Neuronpedia feature is one unit "
                               "with an index, e.g. 'blocks.6.mlp.hook_post[123]' or 'sae:RELEASE/SAE_ID[42]'")
    if unit.reduce != "last":
        raise NeuronpediaError(f"{objective!r} is read at '@{unit.reduce}'; dreamlens keeps only the value it reads, "
                               "so only objectives read at the last token (no '@' suffix) can be per-token rows")
    if len(unit.index) != 1:
        raise NeuronpediaError(f"{objective!r} has {len(unit.index)} indices; a Neuronpedia feature has one: export "
                               "neurons of hooks with one unit axis (e.g. blocks.N.mlp.hook_post[I])")
    found = sae_neuronpedia_id(unit.where) if unit.kind != "neuron" else None
    np_model, np_source = found.split("/", 1) if found and "/" in found else (None, None)
    model_id = model_id or np_model or _slug(model_name)
    if not model_id:
        raise NeuronpediaError(f"the dream of {objective!r} does not name its model; pass model_id= (--model-id)")
    if source is None:
        if np_source is not None:
            source = np_source
        elif unit.kind == "neuron":
            source = hook_source(unit.where)
        else:
            source = _local_sae_source(unit.where)
        if source is None:
            raise NeuronpediaError(f"the SAE {unit.where!r} has no Neuronpedia id (sae-lens's directory lists none); "
                                   "pass source_id= (--source-id), e.g. '10-my-sae'")
    return Feature(model_id, source, unit.index[0])


def _local_sae_source(where: str) -> str | None:
    """LAYER-NAME for the embedded SAE or an SAE folder (its hook from its cfg.json, its name from the
    folder), e.g. '10-embedded'; None for anything else."""
    folder = embedded_sae_dir() if where == EMBEDDED_SAE else Path(where)
    try:
        cfg = json.loads((folder / "cfg.json").read_text())
    except (OSError, ValueError):
        return None
    hook = (cfg.get("metadata") or {}).get("hook_name") or cfg.get("hook_name") or ""
    m = re.match(r"blocks\.(\d+)\.", hook)
    name = _slug(EMBEDDED_SAE if where == EMBEDDED_SAE else folder.resolve().name) or "sae"
    return f"{m.group(1)}-{name}" if m else name
