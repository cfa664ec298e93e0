"""Sparse autoencoders for dreaming: the embedded SAE of SmolLM2-135M, local folders, sae-lens releases.

`load_sae()` returns a sae-lens `SAE` whose `encode`/`decode` work on raw model activations at
`sae.cfg.metadata.hook_name`.
"""

from __future__ import annotations

import difflib
import json
import os
import warnings
from collections.abc import Iterator
from itertools import zip_longest
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .corpus import documents
from .devices import dtype_name, resolve_device, resolve_dtype
from .errors import SAELoadError, SAEUsageError
from .install import DISTRIBUTION

if TYPE_CHECKING:
    from sae_lens import SAE

EMBEDDED_SAE = "embedded"

# The shipped weights and config (sae-lens's own file names, so `SAE.load_from_disk` reads the folder).
_CFG_FILE = "cfg.json"
_WEIGHTS_FILE = "sae_weights.safetensors"

# Documents the embedded SAE never saw in training: the last N of each embedded corpus. Its evaluation
# figures and the examples in latents.md come from these.
HELDOUT_DOCUMENTS: dict[str, int] = {"sotu": 4, "wiki": 1000}

# Latents of the embedded SAE that read clearly on held-out text, chosen by reading the top contexts
# of `scripts/embedded_sae_latents.py --explore` (examples: data/sae/latents.md).
EMBEDDED_SAE_LATENTS: dict[int, str] = {
    2261: "passing legislation: ' pass' / ' passing' after 'Congress to', 'urge the Senate to'",
    2448: "compass directions in geography: ' northwestern', ' western', ' northeastern' coast, edge, area",
    221: "ordinal numbers: ' sixth' planet from the Sun, the 8'th' century",
    4004: "contrast: ' instead' (of), ' rather' (than)",
    1387: "economic surplus or deficit: a ' surplus' of grain, the trade ' deficit'",
    3272: "digits inside long numeric constants: 2.718'2'8, 3.1'4'159, 29'9'792",
}


def embedded_sae_dir() -> Path:
    """The folder of the embedded SAE inside the installed package."""
    return Path(__file__).resolve().parent / "data" / "sae"


def embedded_sae_documents(split: Literal["train", "heldout"]) -> Iterator[str]:
    """The embedded corpora split as the embedded SAE was trained ("train") and evaluated ("heldout").

    Per corpus, the last `HELDOUT_DOCUMENTS[name]` documents are held out; both splits interleave
    State of the Union and Wikipedia documents like `corpus.embedded_documents`.
    """
    if split not in ("train", "heldout"):
        raise SAEUsageError(f"split must be 'train' or 'heldout', got {split!r}")
    parts = []
    for name, n_heldout in HELDOUT_DOCUMENTS.items():
        docs = list(documents(name))
        parts.append(docs[:-n_heldout] if split == "train" else docs[-n_heldout:])
    for group in zip_longest(*parts):
        yield from (d for d in group if d is not None)


def load_sae(
    name_or_path: str | os.PathLike | None = None, *, device: str | Any = None, dtype: str | Any = None
) -> SAE:
    """Load an SAE as a sae-lens `SAE`.

    `name_or_path`: None or "embedded" for the SAE shipped with dreamlens (SmolLM2-135M,
    `blocks.10.hook_resid_post`, offline); a local folder written by sae-lens
    (`sae.save_model(folder)`: cfg.json and sae_weights.safetensors); or "RELEASE/SAE_ID" for a
    pretrained sae-lens release such as "gpt2-small-res-jb/blocks.8.hook_resid_pre" (downloads from the
    Hugging Face hub). The SAE's hook is `sae.cfg.metadata.hook_name`; how its model must be loaded,
    `dl.sae_model_settings(sae)` (e.g. {"center_writing_weights": True}): `dl.load_model(sae=sae)` loads
    it so, and an objective of the SAE on a model loaded otherwise is refused.

    `device` (default $DREAMLENS_DEVICE, else "cuda" when there is a GPU, else "cpu") and `dtype` (default
    $DREAMLENS_DTYPE, else float32) are where it is loaded; an objective reads it on its model's device and
    in its model's dtype in any case (a copy, when they differ).
    """
    where = (str(resolve_device(device)), dtype_name(resolve_dtype(dtype)))
    with warnings.catch_warnings():
        # sae-lens warns about declared model settings on every load; dreamlens applies and checks them
        warnings.filterwarnings("ignore", message=r"\s*This SAE has non-empty model_from_pretrained_kwargs")
        if name_or_path is None or str(name_or_path) == EMBEDDED_SAE:
            return _load_embedded(*where)
        if isinstance(name_or_path, os.PathLike) or Path(str(name_or_path)).exists():
            return _load_folder(Path(name_or_path), *where)
        if not isinstance(name_or_path, str):
            raise TypeError(
                f"name_or_path must be None, a string or a path, got {type(name_or_path).__name__}"
            )
        return _load_release(name_or_path, *where)


def sae_neuronpedia_id(sae: str | os.PathLike | Any | None) -> str | None:
    """The SAE's id on Neuronpedia ("MODEL/SOURCE", e.g. "gpt2-small/8-res-jb"), or None when it has none.

    `sae`: a loaded SAE (its `cfg.metadata.neuronpedia_id`, which sae-lens's `from_pretrained` sets from its
    directory of pretrained SAEs); or what `load_sae` takes, looked up without loading the SAE or any network:
    "RELEASE/SAE_ID" in sae-lens's directory, a folder or the embedded SAE in its cfg.json."""
    if sae is not None and not isinstance(sae, (str, os.PathLike)):
        meta = getattr(getattr(sae, "cfg", None), "metadata", None)
        found = getattr(meta, "neuronpedia_id", None) or getattr(getattr(sae, "cfg", None), "neuronpedia_id", None)
        return str(found) if found else None
    folder = embedded_sae_dir() if sae is None or str(sae) == EMBEDDED_SAE else Path(sae)
    if folder.is_dir():
        try:
            cfg = json.loads((folder / _CFG_FILE).read_text())
        except (OSError, ValueError):
            return None
        found = (cfg.get("metadata") or {}).get("neuronpedia_id") or cfg.get("neuronpedia_id")
        return str(found) if found else None
    # lazy: sae_lens takes seconds to load; only an SAE needs it
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()  # shipped inside sae-lens: no network
    try:
        release, sae_id = _split_release(str(sae), directory)
    except SAELoadError:
        return None
    info = directory.get(release)
    found = (getattr(info, "neuronpedia_id", None) or {}).get(sae_id) if info is not None else None
    return str(found) if found else None


def _load_embedded(device: str, dtype: str) -> SAE:
    from sae_lens import SAE  # lazy: sae_lens takes seconds to load; only an SAE needs it

    folder = embedded_sae_dir()
    missing = [f for f in (_CFG_FILE, _WEIGHTS_FILE) if not (folder / f).is_file()]
    if missing:
        raise SAELoadError(
            f"the embedded SAE is incomplete: {', '.join(missing)} missing from {folder}. Reinstall "
            f"dreamlens (pip install --force-reinstall {DISTRIBUTION}), or retrain it with "
            "`python scripts/train_embedded_sae.py`."
        )
    # Stored in fp16 to keep the package small; computed in fp32 by default (fp16 matmuls are slow on CPUs).
    return SAE.load_from_disk(folder, device=device, dtype=dtype)


def _load_folder(path: Path, device: str, dtype: str) -> SAE:
    from sae_lens import SAE  # lazy: sae_lens takes seconds to load; only an SAE needs it

    if not path.exists():
        raise SAELoadError(f"no such SAE folder: {str(path)!r}")
    if not path.is_dir():
        raise SAELoadError(
            f"{str(path)!r} is a file; an SAE is a folder holding {_CFG_FILE} and {_WEIGHTS_FILE} "
            "(as written by sae-lens's `sae.save_model(folder)`)"
        )
    missing = [f for f in (_CFG_FILE, _WEIGHTS_FILE) if not (path / f).is_file()]
    if missing:
        raise SAELoadError(
            f"the folder {str(path)!r} is not a sae-lens SAE: {', '.join(missing)} missing. Write one with "
            "`sae.save_model(folder)`, or pass 'RELEASE/SAE_ID' for a pretrained sae-lens release."
        )
    try:
        return SAE.load_from_disk(path, device=device, dtype=dtype)
    except Exception as e:
        raise SAELoadError(
            f"could not load the SAE in {str(path)!r} ({type(e).__name__}: {str(e)[:300]})"
        ) from e


def _load_release(name: str, device: str, dtype: str) -> SAE:
    # lazy: sae_lens takes seconds to load; only an SAE needs it
    from sae_lens import SAE
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()  # the list shipped inside sae-lens: no network
    release, sae_id = _split_release(name, directory)
    if release in directory:
        ids = list(directory[release].saes_map)
        if sae_id not in directory[release].saes_map:
            close = difflib.get_close_matches(sae_id, ids, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(repr(f'{release}/{c}') for c in close)}?" if close else ""
            raise SAELoadError(
                f"release {release!r} has no SAE {sae_id!r}.{hint} Its {len(ids)} SAEs include "
                f"{', '.join(repr(i) for i in ids[:4])}."
            )
    try:
        return SAE.from_pretrained(release, sae_id, device=device, dtype=dtype)
    except Exception as e:
        raise SAELoadError(
            f"could not download the SAE {release!r}/{sae_id!r} from the Hugging Face hub "
            f"({type(e).__name__}: {str(e)[:300]}). Pretrained releases need internet access; offline, "
            "use load_sae() for the embedded SAE, or a local folder written by `sae.save_model(folder)`."
        ) from e


def _split_release(name: str, directory: dict[str, Any]) -> tuple[str, str]:
    """Split "RELEASE/SAE_ID" (sae ids and Hugging Face repo ids may themselves contain slashes)."""
    known = sorted((r for r in directory if name.startswith(r + "/")), key=len, reverse=True)
    if known and len(name) > len(known[0]) + 1:
        return known[0], name[len(known[0]) + 1 :]
    parts = name.split("/")
    if len(parts) >= 3 and all(parts):
        # not a listed release: a Hugging Face repo id "org/repo" then the SAE's path in it
        return "/".join(parts[:2]), "/".join(parts[2:])
    head = parts[0]
    close = difflib.get_close_matches(head, list(directory), n=3, cutoff=0.6)
    hint = f" Did you mean the release {', '.join(repr(c) for c in close)}?" if close else ""
    raise SAELoadError(
        f"unknown SAE {name!r}: not {EMBEDDED_SAE!r} (the embedded SAE, also None), not an existing "
        f"folder, and not 'RELEASE/SAE_ID' with a release listed by sae-lens.{hint} Examples: "
        "load_sae(), load_sae('path/to/folder'), load_sae('gpt2-small-res-jb/blocks.8.hook_resid_pre')."
    )
