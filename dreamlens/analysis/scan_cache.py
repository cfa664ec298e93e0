"""Where a scan is cached: fingerprints of the model weights, the corpus and the objectives, and the
cache key and folder built from them (a scan of the same inputs is loaded instead of run again).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from .. import corpus as corpus_mod
from ..models import bos_token_id, cache_root
from ..objectives import Objective
from ..objectives.forward import leaves

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

FORMAT = 1  # bump when the saved layout or the scan's definition changes: old caches are rebuilt


def _hash_tensor(h: Any, t: Tensor, samples: int = 2048) -> None:
    flat = t.detach().reshape(-1)
    step = max(1, flat.numel() // samples)
    h.update(str(tuple(t.shape)).encode())
    h.update(flat[::step].float().cpu().numpy().tobytes())


def model_fingerprint(model: HookedTransformer) -> str:
    """Name, shape and a strided sample of every parameter, plus the tokenizer and start token."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{model.cfg.model_name}|{bos_token_id(model)}".encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        _hash_tensor(h, t)
    tok = getattr(model, "tokenizer", None)
    if tok is not None:
        h.update(f"{type(tok).__name__}|{len(tok)}|{tok('The quick brown fox, 1776.')['input_ids']}".encode())
    return h.hexdigest()


def objective_fingerprint(o: Objective) -> str:
    """The string form, plus the weights behind in-memory SAEs and directions (whose string form is
    `<in-memory>`)."""
    h = hashlib.blake2b(str(o).encode(), digest_size=16)
    for leaf in leaves([o]):
        sae = getattr(leaf, "sae", None)
        if sae is not None:
            for name, t in sorted(sae.state_dict().items()):
                h.update(name.encode())
                _hash_tensor(h, t)
        vec = getattr(leaf, "vector", None)
        if isinstance(vec, Tensor):
            _hash_tensor(h, vec, samples=1 << 20)
    return h.hexdigest()


def corpus_fingerprint(source: Any) -> str | None:
    """A key for the corpus, or None when it cannot be read twice (a generator): then no caching."""
    if source is None or isinstance(source, (str, Path)):
        desc = corpus_mod.describe(source)
        p = Path(str(source)) if source is not None else None
        if p is not None and p.exists():  # local text: its files, sizes and times, so edits invalidate
            files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
            desc += "|" + "|".join(f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
        return desc
    if isinstance(source, (list, tuple)):
        h = hashlib.blake2b(digest_size=16)
        for d in source:
            h.update(str(d).encode())
            h.update(b"\x00")
        return f"texts:{len(source)}:{h.hexdigest()}"
    return None


def cache_key(model: HookedTransformer, objectives: Sequence[Objective], corpus_key: str, **params: Any) -> str:
    """The name of a scan's cache folder: a hash of the format, the model, the corpus key (from
    `corpus_fingerprint`), the objectives and the scan's parameters (budget, window, ...)."""
    body = json.dumps(
        {"format": FORMAT, "model": model_fingerprint(model), "corpus": corpus_key,
         "objectives": [objective_fingerprint(o) for o in objectives], **params},
        sort_keys=True,
    )
    return hashlib.sha256(body.encode()).hexdigest()[:24]


def cache_folder(
    model: HookedTransformer, objectives: Sequence[Objective], corpus: Any, cache: bool | str | os.PathLike, **params: Any
) -> Path | None:
    """The folder a scan of these inputs is cached in: under `cache` (True: `cache_root()/scans`).
    None when caching is off (`cache=False`) or the corpus cannot be read twice (a generator)."""
    if cache is False:
        return None
    corpus_key = corpus_fingerprint(corpus)
    if corpus_key is None:
        return None
    root = cache_root() / "scans" if cache is True else Path(cache)
    return root / cache_key(model, objectives, corpus_key, **params)
