"""Max-activating dataset examples and activation statistics of many objectives from one corpus pass,
and dreams compared with them on the same axes (activation vs cross-entropy).

`scan` runs the model over a corpus, `ScanResult` holds what it found, `compare` draws the paper's figure.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from . import corpus as corpus_mod
from .errors import DreamlensError
from .models import bos_token_id, cache_root, decode
from .objectives import (
    Capture,
    Combination,
    Neuron,
    NonFiniteError,
    Objective,
    objective,
    stop_at_layer,
    unembed,
)

_FORMAT = 1  # bump when the saved layout or the scan's definition changes: old caches are rebuilt
STAT_QUANTILES = {"q50": 0.5, "q90": 0.9, "q99": 0.99, "q999": 0.999}


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


# ---------------------------------------------------------------------------------------------
# Quantiles: a mergeable log-bucket sketch


class QuantileSketch:
    """Streaming, mergeable quantiles of many objectives at once: every value is rounded to bfloat16
    (8 significant bits) and counted, one histogram row per objective.

    Accuracy: the q-quantile returned is the exact order statistic of rank floor(q * (n - 1)) (numpy's
    `method="lower"`) rounded to bfloat16, so within relative error 2^-8 (0.4%), for magnitudes in
    [2^-24, 2^24] (6e-8 .. 1.7e7); smaller non-zero magnitudes count as +-2^-24, larger as +-2^24, and
    answers are clamped to the exact min and max. Exact zeros are counted exactly. Memory: 12,289
    counters per objective, whatever the number of values; two sketches merge by adding counts.
    """

    EXP_RANGE = 24  # magnitudes 2^-24 .. 2^24 are resolved

    def __init__(self, n: int, *, device: Any = "cpu"):
        self.n = n
        self.u_lo = (127 - self.EXP_RANGE) << 7  # bfloat16 bits (sign cleared) of 2^-24
        self.u_hi = ((127 + self.EXP_RANGE) << 7) - 1  # ... of the largest bfloat16 below 2^24
        self.nb = self.u_hi - self.u_lo + 1  # magnitude buckets per sign
        # one row per objective, ascending by value: negatives (largest magnitude first), zero, positives
        self.counts = torch.zeros((n, 2 * self.nb + 1), dtype=torch.int64, device=device)
        self.lo = torch.full((n,), math.inf, dtype=torch.float64, device=device)
        self.hi = torch.full((n,), -math.inf, dtype=torch.float64, device=device)

    @property
    def n_buckets(self) -> int:
        return 2 * self.nb + 1

    def bucket(self, x: Tensor) -> Tensor:
        """Bucket index of each value within its objective's row (int64, same shape)."""
        sign = torch.sign(x).long()  # -0.0 gives 0: it counts as zero
        u = x.to(torch.bfloat16).view(torch.int16).long().bitwise_and_(0x7FFF)
        return u.clamp_(self.u_lo, self.u_hi).sub_(self.u_lo - 1).mul_(sign).add_(self.nb)

    def update(self, values: Float[Tensor, "n m"]) -> None:
        """Add `m` values for each of the `n` objectives."""
        values = values.reshape(self.n, -1)
        if values.shape[1] == 0:
            return
        idx = self.bucket(values) + torch.arange(self.n, device=values.device)[:, None] * self.n_buckets
        idx = idx.flatten().to(self.counts.device)
        self.counts.view(-1).scatter_add_(0, idx, torch.ones_like(idx))
        lo, hi = torch.aminmax(values, dim=1)
        self.lo = torch.minimum(self.lo, lo.double().to(self.lo.device))
        self.hi = torch.maximum(self.hi, hi.double().to(self.hi.device))

    def merge(self, other: QuantileSketch) -> None:
        if other.n != self.n or other.n_buckets != self.n_buckets:
            raise ScanError(f"cannot merge a sketch of {other.n} objectives into one of {self.n}")
        self.counts += other.counts.to(self.counts.device)
        self.lo = torch.minimum(self.lo, other.lo.to(self.lo.device))
        self.hi = torch.maximum(self.hi, other.hi.to(self.hi.device))

    def positive(self) -> np.ndarray:
        """How many values of each objective were above zero (exact)."""
        return self.counts[:, self.nb + 1 :].sum(dim=1).cpu().numpy()

    def values(self) -> np.ndarray:
        """The value each bucket stands for (a bfloat16 number), ascending."""
        m = np.arange(self.n_buckets) - self.nb
        bits = (np.abs(m) + self.u_lo - 1).astype(np.uint32) << 16
        mag = bits.view(np.float32).astype(np.float64)
        return np.where(m == 0, 0.0, np.sign(m) * mag)

    def quantile(self, q: float) -> np.ndarray:
        """The q-quantile of every objective (NaN where no value was seen)."""
        cum = self.counts.cpu().numpy().cumsum(axis=1)
        total = cum[:, -1]
        rank = np.floor(q * np.maximum(total - 1, 0)).astype(np.int64)
        j = np.argmax(cum > rank[:, None], axis=1)
        out = np.clip(self.values()[j], self.lo.cpu().numpy(), self.hi.cpu().numpy())
        return np.where(total > 0, out, np.nan)

    def percentile(self, i: int, value: float) -> float:
        """Percent of objective `i`'s values at or below `value`. Within the bucket holding `value`
        (the values that round to the same bfloat16) the count is interpolated linearly."""
        counts = self.counts[i].cpu().numpy()
        total = counts.sum()
        if total == 0 or math.isnan(value):
            return math.nan
        if value >= float(self.hi[i]):
            return 100.0
        if value < float(self.lo[i]):
            return 0.0
        j = int(self.bucket(torch.tensor([value], dtype=torch.float32))[0])
        if j == self.nb:  # exact zeros
            frac = 1.0 if value >= 0 else 0.0
        else:
            rep = self.values()
            lo = (rep[j - 1] + rep[j]) / 2 if j > 0 else rep[j]
            hi = (rep[j] + rep[j + 1]) / 2 if j + 1 < len(rep) else rep[j]
            frac = (value - lo) / (hi - lo) if hi > lo else 1.0
        return float(100.0 * (counts[:j].sum() + min(max(frac, 0.0), 1.0) * counts[j]) / total)

    # serialization: sparse (objective, bucket, count) rows
    def to_frame(self) -> pd.DataFrame:
        c = self.counts.cpu().numpy()
        obj, b = np.nonzero(c)
        return pd.DataFrame({"objective": obj.astype(np.int64), "bucket": b.astype(np.int64), "count": c[obj, b]})

    def meta(self) -> dict[str, Any]:
        return {"kind": "bfloat16", "exp_range": self.EXP_RANGE, "lo": self.lo.cpu().tolist(), "hi": self.hi.cpu().tolist()}

    @classmethod
    def from_frame(cls, n: int, frame: pd.DataFrame, meta: dict[str, Any]) -> QuantileSketch:
        if meta.get("kind") != "bfloat16" or meta.get("exp_range") != cls.EXP_RANGE:
            raise ScanCacheError(f"the saved sketch is of another kind ({meta.get('kind')!r})")
        s = cls(n)
        obj = torch.tensor(frame["objective"].to_numpy(), dtype=torch.long)
        b = torch.tensor(frame["bucket"].to_numpy(), dtype=torch.long)
        if len(obj) and (obj.max() >= n or b.max() >= s.n_buckets or obj.min() < 0 or b.min() < 0):
            raise ScanCacheError("the saved sketch does not fit its objectives")
        s.counts[obj, b] = torch.tensor(frame["count"].to_numpy(), dtype=torch.int64)
        s.lo = torch.tensor(meta["lo"], dtype=torch.float64)
        s.hi = torch.tensor(meta["hi"], dtype=torch.float64)
        return s


# ---------------------------------------------------------------------------------------------
# Per-position values of objectives


def per_position(o: Objective) -> Objective:
    """The objective read at one position: the scan treats every position as its own prompt, so a
    reduction over positions (`@max`, `@mean`, `@POS`) does not apply and becomes `last`."""
    if isinstance(o, Combination):
        return Combination([(c, per_position(t)) for c, t in o.terms])
    if dataclasses.is_dataclass(o) and getattr(o, "reduce", "last") != "last":
        return dataclasses.replace(o, reduce="last")
    return o


def _leaves(o: Objective) -> list[Objective]:
    return [t for _, t in o._terms()] if isinstance(o, Combination) else [o]


def position_values(
    model: Any,
    objectives: Sequence[Objective],
    tokens: Int[Tensor, "batch seq"],
    *,
    skip: int = 0,
    stop: int | None = None,
) -> Float[Tensor, "n_obj batch pos"]:
    """Every objective at every position (after the first `skip`, e.g. the start token), from one
    forward pass stopped at the deepest hook needed.

    `objectives.py` reduces over positions; here positions are turned into batch rows of length-1
    captures, so each objective's own `value` computes it (one SAE encoding shared by all its latents)."""
    objs = [per_position(o) for o in objectives]
    leaves = [t for o in objs for t in _leaves(o)]
    hooks = list(dict.fromkeys(h for t in leaves for h in t.hooks))
    needs_logits = any(t.needs_logits for t in leaves)
    if needs_logits:
        stop = model.cfg.n_layers
    elif stop is None:
        stop = stop_at_layer(model, objs)
    acts: dict[str, Tensor] = {}

    def save(act: Tensor, hook: Any) -> None:
        acts[hook.name] = act

    with model.hooks(fwd_hooks=[(h, save) for h in hooks]):
        resid = model(tokens, stop_at_layer=stop)
    B, S = tokens.shape
    P = S - skip
    for h, a in acts.items():
        if a.ndim < 2 or a.shape[1] != S or (a.ndim == 4 and a.shape[2] == a.shape[3] == S):
            raise ScanError(
                f"{h} has shape {list(a.shape)} for {S}-token inputs, not one activation per position "
                "(attention patterns relate two positions): it cannot be scanned position by position"
            )
    flat = {h: a[:, skip:].reshape(B * P, 1, *a.shape[2:]) for h, a in acts.items()}
    normed, memo = None, {}
    if needs_logits:
        from .objectives import (
            _token_id,  # the protocol's own token lookup, so logit objectives agree
        )

        normed = resid[:, skip:]
        if model.cfg.normalization_type is not None:
            normed = model.ln_final(normed)
        normed = normed.reshape(B * P, 1, -1)
        for t in leaves:
            for a in ("token", "token_a", "token_b"):
                if hasattr(t, a):
                    memo[("token", getattr(t, a))] = _token_id(model, getattr(t, a))
    rows = B * P
    out = torch.empty((len(objs), rows), dtype=torch.float32, device=tokens.device)
    # Plain neurons, the common case of scanning hundreds at once: one gather per hook.
    by_hook: dict[str, list[tuple[int, int]]] = {}
    for j, o in enumerate(objs):
        if type(o) is Neuron:
            shape = flat[o.hook].shape[2:]
            idx = o.index if isinstance(o.index, tuple) else (o.index,)
            if len(idx) == len(shape):
                by_hook.setdefault(o.hook, []).append((j, int(np.ravel_multi_index(idx, shape))))
    for h, pairs in by_hook.items():
        js, cols = zip(*pairs)
        sel = torch.tensor(cols, device=tokens.device)
        out[list(js)] = flat[h].flatten(1).index_select(1, sel).T.float()
    done = {j for pairs in by_hook.values() for j, _ in pairs}
    rest = [j for j in range(len(objs)) if j not in done]
    if rest:
        step = max(1, (1 << 24) // model.cfg.d_vocab) if needs_logits else max(rows, 1)
        for lo in range(0, rows, step):
            cap = Capture(acts={h: a[lo : lo + step] for h, a in flat.items()}, logits=None, start=0, memo=dict(memo))
            cap.model = model  # newer Capture carries the model (for token lookups); harmless otherwise
            if normed is not None:
                cap.logits = unembed(model, normed[lo : lo + step])
            out[rest, lo : lo + step] = torch.stack([objs[j].value(cap).float() for j in rest])
    return out.view(len(objs), B, P)


# ---------------------------------------------------------------------------------------------
# The corpus, chopped into windows


@dataclass
class _Chunk:
    doc: int  # document index in the corpus order
    start: int  # token offset of ids[0] in the document
    ids: list[int]  # `window` tokens
    pre: list[int]  # up to window-1 tokens before ids in the same document (for examples that span chunks)


def _chunks(model: Any, docs: Iterable[str], window: int, budget: int) -> Iterator[_Chunk]:
    from .models import encode

    produced = 0
    for d, text in enumerate(docs):
        if produced >= budget:
            return
        ids = encode(model, text)
        for i in range(0, len(ids) - window + 1, window):
            if produced >= budget:
                return
            produced += window
            yield _Chunk(d, i, ids[i : i + window], ids[max(0, i - window + 1) : i])


def _batched(it: Iterator[_Chunk], n: int) -> Iterator[list[_Chunk]]:
    batch: list[_Chunk] = []
    for c in it:
        batch.append(c)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


# ---------------------------------------------------------------------------------------------
# Top examples: one candidate per chunk (its max position), at most `per_document` per document


class _TopK:
    """Streaming top-k of chunk maxima under a per-document cap.

    The cap makes the kept set a basis of a (truncated partition) matroid, so greedy selection is
    exact and anything dropped once can never come back: streaming gives the brute-force answer."""

    def __init__(self, n_obj: int, k: int, per_document: int):
        self.k, self.cap = k, per_document
        # entries: (-value, seq, doc, pos, ids); (-value, seq) is unique, so ids are never compared
        self.pools: list[list[tuple]] = [[] for _ in range(n_obj)]
        self.thr = np.full(n_obj, -np.inf)

    def update(self, cmax: np.ndarray, carg: np.ndarray, chunks: list[_Chunk], seq0: int) -> None:
        """Offer each chunk's max (`cmax[i, b]` at position `carg[i, b]`) to every objective `i`."""
        window = len(chunks[0].ids)
        docs = [c.doc for c in chunks]
        hot = cmax > self.thr[:, None]  # only a value above the current k-th can enter
        for i in np.nonzero(hot.any(axis=1))[0]:
            new = [(-float(cmax[i, b]), seq0 + int(b), docs[b], None, int(b)) for b in np.nonzero(hot[i])[0]]
            per_doc: Counter = Counter()
            kept = []
            for e in sorted(self.pools[i] + new):
                if per_doc[e[2]] < self.cap:
                    per_doc[e[2]] += 1
                    if e[3] is None:  # a newcomer: now worth its window of tokens
                        c, p = chunks[e[4]], int(carg[i, e[4]])
                        end = len(c.pre) + p + 1
                        e = (e[0], e[1], e[2], c.start + p, (c.pre + c.ids)[max(0, end - window) : end])
                    kept.append(e)
                    if len(kept) == self.k:
                        break
            self.pools[i] = kept
            if len(kept) == self.k:
                self.thr[i] = -kept[-1][0]


# ---------------------------------------------------------------------------------------------
# Scoring examples exactly as dreams are scored


@torch.no_grad()
def score_windows(
    model: Any, objectives: Sequence[Objective], windows: Sequence[Sequence[int]], *, batch_size: int = 32
) -> tuple[Float[Tensor, "n_obj n"], Float[Tensor, " n"]]:
    """Each window scored as a dream of its length: the objectives (as dreams read them) and `xe`, the
    mean next-token cross-entropy of the window given the start token (`optim.core.score`)."""
    from .optim.core import DreamError, make_layout, score

    values = torch.full((len(objectives), len(windows)), math.nan)
    xe = torch.full((len(windows),), math.nan)
    by_len: dict[int, list[int]] = {}
    for j, w in enumerate(windows):
        by_len.setdefault(len(w), []).append(j)
    for length, rows in sorted(by_len.items()):
        ids = torch.tensor([list(windows[j]) for j in rows], dtype=torch.long, device=model.cfg.device)
        try:
            layout = make_layout(model, length)
        except DreamError:  # one token and no start token: no fluency to score, the objective still is
            from .objectives import run_objectives

            v, _ = run_objectives(model, objectives, ids, start=0)
            values[:, rows] = v.float().cpu()
            continue
        v, x = score(model, objectives, ids, layout, batch_size=batch_size)
        values[:, rows] = v.float().cpu()
        xe[rows] = x.float().cpu()
    return values, xe


# ---------------------------------------------------------------------------------------------
# The result


@dataclass
class ScanResult:
    """What a scan found: `top(i)` (the top examples of objective `i`), `stats` (one row per
    objective), the quantile `sketch` (for percentiles), and `meta` (model, corpus, budget, timing)."""

    objectives: list[str]
    stats: pd.DataFrame
    examples: pd.DataFrame  # every objective's top examples; column `objective` is its index
    sketch: QuantileSketch
    meta: dict[str, Any] = field(default_factory=dict)
    from_cache: bool = False

    def index(self, objective: int | str | Objective) -> int:
        """The position of an objective in this scan, from its index, string form or object."""
        if isinstance(objective, (int, np.integer)) and not isinstance(objective, bool):
            i = int(objective)
            if not -len(self.objectives) <= i < len(self.objectives):
                raise ScanLookupError(f"objective index {i} is out of range: this scan has {len(self.objectives)} objective(s)")
            return i % len(self.objectives)
        key = str(objective)
        if key in self.objectives:
            return self.objectives.index(key)
        import difflib

        close = difflib.get_close_matches(key, self.objectives, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ScanLookupError(f"{key!r} is not an objective of this scan{hint} (it has {self.objectives[:5]}...)")

    def top(self, objective: int | str | Objective = 0) -> pd.DataFrame:
        """Top examples of one objective, best first by the scan's activation. Columns: text, ids,
        activation and xe (the window scored as a dream: objective at its last token, mean
        cross-entropy given the start token), scan_activation (the value the scan saw there, with
        the context of its scan window), doc and pos (document index and token position)."""
        i = self.index(objective)
        df = self.examples[self.examples["objective"] == i].sort_values("rank")
        return df.drop(columns=["objective"]).reset_index(drop=True)

    @property
    def scored(self) -> bool:
        return bool(len(self.examples) == 0 or self.examples["xe"].notna().any())

    def percentile(self, objective: int | str | Objective, value: float) -> float:
        """Percent of the scanned positions where the objective was at or below `value` (from the sketch)."""
        return self.sketch.percentile(self.index(objective), float(value))

    def score(self, model: Any, objectives: Sequence[Objective] | None = None, *, batch_size: int = 32, progress: bool = False) -> None:
        """Score the top examples as dreams (done by `scan` unless `score=False`)."""
        objs = [objective(o) for o in (objectives or self.objectives)]
        windows = self.examples["ids"].tolist()
        uniq = list(dict.fromkeys(tuple(w) for w in windows))
        if not uniq:
            return
        pos = {w: j for j, w in enumerate(uniq)}
        vals, xe = [], []
        from tqdm.auto import tqdm

        step = max(batch_size, 256)
        for lo in tqdm(range(0, len(uniq), step), desc="score examples", disable=not progress, unit="batch"):
            v, x = score_windows(model, objs, uniq[lo : lo + step], batch_size=batch_size)
            vals.append(v)
            xe.append(x)
        v, x = torch.cat(vals, dim=1), torch.cat(xe)
        j = np.array([pos[tuple(w)] for w in windows])
        o = self.examples["objective"].to_numpy()
        self.examples["activation"] = v.numpy()[o, j].astype(np.float64)
        self.examples["xe"] = x.numpy()[j].astype(np.float64)

    # saving and loading ------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> Path:
        """Write stats, examples and the sketch as Parquet plus `scan.json` (with checksums, written last,
        so a partly written folder is detected as such)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        digests = {}
        for name, frame in (("stats", self.stats), ("examples", self.examples), ("sketch", self.sketch.to_frame())):
            digests[name] = _write_parquet(frame, folder / f"{name}.parquet")
        meta = {"format": _FORMAT, "objectives": self.objectives, "digests": digests,
                "sketch": self.sketch.meta(), "meta": self.meta}
        _atomic_write(folder / "scan.json", json.dumps(meta, indent=1).encode())
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> ScanResult:
        """A saved scan; `ScanCacheError` if it is missing, partial or corrupt."""
        folder = Path(folder)
        try:
            meta = json.loads((folder / "scan.json").read_text())
            if meta.get("format") != _FORMAT:
                raise ScanCacheError(f"{folder} was written by another version of dreamlens (format {meta.get('format')})")
            frames = {}
            for name in ("stats", "examples", "sketch"):
                path = folder / f"{name}.parquet"
                if _digest(path.read_bytes()) != meta["digests"][name]:
                    raise ScanCacheError(f"{path} does not match its checksum")
                frames[name] = pd.read_parquet(path)
            objectives = list(meta["objectives"])
            sketch = QuantileSketch.from_frame(len(objectives), frames["sketch"], meta["sketch"])
            ex = frames["examples"]
            ex["ids"] = [[int(t) for t in w] for w in ex["ids"]]
        except ScanCacheError:
            raise
        except FileNotFoundError as e:
            raise ScanCacheError(f"no saved scan at {folder} ({e.filename} is missing)") from e
        except Exception as e:
            raise ScanCacheError(f"the saved scan at {folder} is unreadable: {type(e).__name__}: {e}") from e
        return cls(objectives, frames["stats"], ex, sketch, meta.get("meta", {}))

    def __repr__(self) -> str:
        m = self.meta
        return (f"ScanResult({len(self.objectives)} objective(s), {m.get('n_tokens', '?')} tokens of "
                f"{m.get('corpus', '?')!r}, top {m.get('top_k', '?')}, window {m.get('window', '?')}"
                f"{', from cache' if self.from_cache else ''})")


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_parquet(frame: pd.DataFrame, path: Path) -> str:
    import io

    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    data = buf.getvalue()
    _atomic_write(path, data)
    return _digest(data)


# ---------------------------------------------------------------------------------------------
# Cache keys


def _hash_tensor(h: Any, t: Tensor, samples: int = 2048) -> None:
    flat = t.detach().reshape(-1)
    step = max(1, flat.numel() // samples)
    h.update(str(tuple(t.shape)).encode())
    h.update(flat[::step].float().cpu().numpy().tobytes())


def model_fingerprint(model: Any) -> str:
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
    for leaf in _leaves(o):
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


def _cache_key(model: Any, objectives: Sequence[Objective], corpus_key: str, **params: Any) -> str:
    body = json.dumps(
        {"format": _FORMAT, "model": model_fingerprint(model), "corpus": corpus_key,
         "objectives": [objective_fingerprint(o) for o in objectives], **params},
        sort_keys=True,
    )
    return hashlib.sha256(body.encode()).hexdigest()[:24]


# ---------------------------------------------------------------------------------------------
# The scan


def _check_int(name: str, value: Any, lo: int, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ScanError(f"{name} must be an integer >= {lo}, got {value!r}; {hint}")
    return int(value)


def scan(
    model: Any,
    objectives: Sequence[str | Objective] | str | Objective,
    corpus: str | Path | Iterable[str] | None = None,
    *,
    tokens: int = 200_000,
    window: int = 24,
    top_k: int = 32,
    per_document: int = 4,
    batch_size: int = 64,
    score: bool = True,
    cache: bool | str | Path = True,
    progress: bool = True,
) -> ScanResult:
    """Run `model` over `tokens` tokens of `corpus` and find, for every objective at once, its top
    examples and activation statistics. One forward pass per batch, stopped at the deepest hook needed.

    corpus: None for the embedded corpora, "sotu"/"wiki", a local file or folder, "hf:NAME", or a
    list of texts. Documents are cut into consecutive windows of `window` tokens, each fed to the model
    after the start token; every position is an activation (statistics: max, mean, frac_active,
    quantiles from a `QuantileSketch`). Each window offers its max position as a candidate, and at most
    `per_document` of the `top_k` examples come from one document. An example is the `window` tokens
    ending at its position (crossing into the previous window when needed), scored exactly as a dream
    (`score_windows`), so dreams and examples share axes. `tokens` is rounded up to whole windows.
    Objectives with a position reduction (`@max`) are read per position.

    cache: True for `~/.cache/dreamlens/scans` (see `models.cache_root`), a folder, or False. A scan of
    the same model weights, corpus, objectives, budget, window, top_k and per_document is loaded from
    there; a corrupt cache is rebuilt.
    """
    if isinstance(objectives, (str, Objective)):
        objectives = [objectives]
    objs = [objective(o) for o in objectives]
    if not objs:
        raise ScanError("no objectives given; pass e.g. ['blocks.6.mlp.hook_post[123]']")
    for o in objs:
        o.validate(model)
    tokens = _check_int("tokens", tokens, 1, "the token budget is the number of corpus tokens to scan, e.g. 200_000")
    window = _check_int("window", window, 1, "e.g. 24")
    top_k = _check_int("top_k", top_k, 1, "e.g. 32")
    per_document = _check_int("per_document", per_document, 1, "e.g. 2")
    batch_size = _check_int("batch_size", batch_size, 1, "e.g. 64")
    bos = bos_token_id(model)
    n_bos = int(bos is not None)
    if window + n_bos > model.cfg.n_ctx:
        raise ScanError(
            f"window {window} does not fit the model's context of {model.cfg.n_ctx} tokens"
            f"{' with the start token in front' if n_bos else ''}; use window <= {model.cfg.n_ctx - n_bos}"
        )
    names = [str(o) for o in objs]

    folder = None
    if cache is not False:
        corpus_key = corpus_fingerprint(corpus)
        if corpus_key is not None:
            root = cache_root() / "scans" if cache is True else Path(cache)
            key = _cache_key(model, objs, corpus_key, tokens=tokens, window=window, top_k=top_k, per_document=per_document)
            folder = root / key
            if (folder / "scan.json").exists():
                try:
                    found = ScanResult.load(folder)
                    if found.objectives != names:
                        raise ScanCacheError("its objectives differ")
                    found.from_cache = True
                    if score and not found.scored:
                        found.score(model, objs, progress=progress)
                        found.save(folder)
                    return found
                except ScanCacheError as e:
                    warnings.warn(f"ignoring the scan cache at {folder} and scanning again: {e}", stacklevel=2)

    result = _scan(model, objs, corpus, tokens, window, top_k, per_document, batch_size, progress)
    if score:
        result.score(model, objs, progress=progress)
    if folder is not None:
        try:
            result.save(folder)
        except OSError as e:
            warnings.warn(f"could not write the scan cache at {folder}: {e}", stacklevel=2)
    return result


def _scan(model, objs, source, budget, window, top_k, per_document, batch_size, progress) -> ScanResult:
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    n = len(objs)
    dev = model.cfg.device
    bos = bos_token_id(model)
    stop = stop_at_layer(model, [per_position(o) for o in objs])
    sketch = QuantileSketch(n, device=dev)
    total = torch.zeros(n, dtype=torch.float64, device=dev)
    top = _TopK(n, top_k, per_document)
    seq = n_pos = 0
    docs_seen = -1
    bar = tqdm(total=budget, desc="scan", unit="tok", unit_scale=True, disable=not progress)
    try:
        with torch.inference_mode():
            for batch in _batched(_chunks(model, corpus_mod.documents(source), window, budget), batch_size):
                ids = [([bos] if bos is not None else []) + c.ids for c in batch]
                toks = torch.tensor(ids, dtype=torch.long, device=dev)
                vals = position_values(model, objs, toks, skip=int(bos is not None), stop=stop)
                flat = vals.reshape(n, -1)
                batch_sum = flat.sum(dim=1, dtype=torch.float64)
                if not torch.isfinite(batch_sum).all():  # a NaN or an infinity anywhere shows in the sum
                    bad = [str(o) for o, v in zip(objs, batch_sum) if not torch.isfinite(v)]
                    raise NonFiniteError(f"the model produced NaN or infinite values for {bad}")
                total += batch_sum
                sketch.update(flat)
                cmax, carg = vals.max(dim=2)
                top.update(cmax.cpu().numpy(), carg.cpu().numpy(), batch, seq)
                seq += len(batch)
                n_pos += flat.shape[1]
                docs_seen = batch[-1].doc
                bar.update(len(batch) * window)
    finally:
        bar.close()
    if n_pos == 0:
        raise ScanError(
            f"the corpus {corpus_mod.describe(source)!r} gave no window of {window} tokens: it is empty or "
            f"every document is shorter than {window} tokens; use a smaller window or more text"
        )
    if n_pos < budget:
        warnings.warn(f"the corpus ran out after {n_pos} tokens (budget {budget})", stacklevel=3)
    elapsed = time.perf_counter() - t0

    q = {name: sketch.quantile(p) for name, p in STAT_QUANTILES.items()}
    stats = pd.DataFrame({
        "objective": [str(o) for o in objs],
        "max": sketch.hi.cpu().numpy(),
        "mean": (total / n_pos).cpu().numpy(),
        "frac_active": sketch.positive() / n_pos,
        **q,
        "min": sketch.lo.cpu().numpy(),
        "n": np.full(n, n_pos, dtype=np.int64),
    })
    rows = []
    for i, pool in enumerate(top.pools):
        for rank, (negv, _, doc, pos, w) in enumerate(pool):
            rows.append({"objective": i, "rank": rank, "text": decode(model, w), "ids": list(w),
                         "activation": math.nan, "xe": math.nan, "scan_activation": -negv, "doc": doc, "pos": pos})
    examples = pd.DataFrame(rows, columns=["objective", "rank", "text", "ids", "activation", "xe",
                                           "scan_activation", "doc", "pos"])
    meta = {
        "model": model.cfg.model_name, "corpus": corpus_mod.describe(source), "tokens": budget, "n_tokens": n_pos,
        "n_documents": docs_seen + 1, "window": window, "top_k": top_k, "per_document": per_document,
        "stop_at_layer": stop, "bos_token_id": bos, "seconds": round(elapsed, 3),
    }
    return ScanResult([str(o) for o in objs], stats, examples, sketch, meta)


# ---------------------------------------------------------------------------------------------
# Dreams vs dataset examples


@dataclass
class Comparison:
    """Dreams and top dataset examples of one objective on the same axes: `table` (one row per dream
    frontier point and per dataset example, with the dataset-grounded metrics), `summary` and `figure`."""

    table: pd.DataFrame
    summary: dict[str, Any]
    figure: Any  # matplotlib Figure

    def save(self, folder: str | os.PathLike, name: str = "comparison") -> Path:
        """Write `{name}.png`, `{name}.csv` and `{name}.json` (the summary) into `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        _atomic_write(folder / f"{name}.png", self._repr_png_())
        _atomic_write(folder / f"{name}.csv", self.table.drop(columns=["ids"], errors="ignore").to_csv(index=False).encode())
        _atomic_write(folder / f"{name}.json", json.dumps(self.summary, indent=1, default=float).encode())
        return folder / f"{name}.png"

    def _repr_png_(self) -> bytes:
        import io

        buf = io.BytesIO()
        self.figure.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        return buf.getvalue()


def _dream_parts(dream: Any) -> tuple[str, pd.DataFrame]:
    frontier = getattr(dream, "frontier", None)
    name = getattr(dream, "objective", None)
    if not isinstance(frontier, pd.DataFrame) or name is None:
        raise CompareError(
            f"compare needs a dream result with `.frontier` (a DataFrame: text, ids, activation, xe) and "
            f"`.objective`, got {type(dream).__name__}"
        )
    missing = {"activation", "xe"} - set(frontier.columns)
    if missing:
        raise ScanError(f"the dream's frontier lacks the column(s) {sorted(missing)}; it has {list(frontier.columns)}")
    return str(name), frontier


def compare(dream_result: Any, scan_result: ScanResult, objective_index: int | None = None) -> Comparison:
    """Dreams vs max-activating dataset examples: activation against cross-entropy (the paper's figure).

    `objective_index` picks the scan's objective; by default the one whose string form is the dream's
    objective (or the only one). Both sets are scored the same way: the objective at the last token
    and the mean next-token cross-entropy given the start token."""
    from . import metrics

    name, frontier = _dream_parts(dream_result)
    if objective_index is None:
        if name in scan_result.objectives:
            objective_index = scan_result.objectives.index(name)
        elif len(scan_result.objectives) == 1:
            objective_index = 0
        else:
            raise ScanError(
                f"the dream's objective {name!r} is not among the scan's {scan_result.objectives}; "
                "pass objective_index= to choose one"
            )
    i = scan_result.index(objective_index)
    if scan_result.objectives[i] != name:
        warnings.warn(f"comparing the dream of {name!r} with the scan of {scan_result.objectives[i]!r}", stacklevel=2)
    top = scan_result.top(i)
    if len(top) and top["xe"].isna().all():
        raise ScanError("the scan's examples were never scored; run scan(..., score=True) or scan_result.score(model)")

    d = frontier.copy()
    d.insert(0, "source", "dream")
    t = top.copy()
    t.insert(0, "source", "dataset")
    cols = ["source", "text", "ids", "activation", "xe"]
    table = pd.concat([d.reindex(columns=cols), t.reindex(columns=cols)], ignore_index=True)
    act = table["activation"].to_numpy(dtype=float)
    table["ratio"] = metrics.activation_ratio(act, scan_result, i)
    table["percentile"] = metrics.dataset_percentile(act, scan_result, i)
    table["beats_dataset"] = metrics.beats_dataset(act, table["xe"].to_numpy(dtype=float), scan_result, i)
    summary = metrics.dream_summary(dream_result, scan_result, i)
    fig = _figure(table, scan_result, i, summary)
    return Comparison(table, summary, fig)


def _figure(table: pd.DataFrame, scan_result: ScanResult, i: int, summary: dict[str, Any]) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    ds = table[table["source"] == "dataset"]
    dr = table[table["source"] == "dream"].sort_values("xe")
    ax.scatter(ds["xe"], ds["activation"], s=22, c="tab:blue", alpha=0.7, label=f"top {len(ds)} dataset examples")
    ax.plot(dr["xe"], dr["activation"], "-o", c="tab:orange", ms=4, lw=1.5, label="dreams (frontier)")
    ax.axhline(summary["dataset_max"], ls="--", c="gray", lw=1, label=f"dataset max ({summary['dataset_max']:.3g})")
    if not math.isnan(summary["median_top_xe"]):
        ax.axvline(summary["median_top_xe"], ls=":", c="gray", lw=1, label="median xe of top examples")
    ax.set_xlabel("cross-entropy of the prompt (nats/token)")
    ax.set_ylabel("activation")
    n_tok = scan_result.meta.get("n_tokens")
    ax.set_title(f"{scan_result.objectives[i]}" + (f"  ({n_tok:,} dataset tokens)" if n_tok else ""), fontsize=9)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
