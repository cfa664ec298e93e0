"""The scan: every objective at every position of a corpus in one forward pass per batch, giving each
objective's top examples (scored like dreams) and activation statistics, as a `ScanResult`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from .. import corpus as corpus_mod
from ..corpus import DocumentWindow
from ..errors import DreamError
from ..io import atomic_write_text, digest_file, write_parquet
from ..models import bos_token_id, decode
from ..objectives import Capture, Combination, Max, Neuron, NonFiniteError, Objective, objective, run_objectives
from ..objectives.forward import forward_capture, leaves, stop_at_layer, unembed
from ..objectives.logit import token_id
from ..scoring import make_layout, score
from .errors import ScanCacheError, ScanError, ScanLookupError
from .parts import part_settings
from .scan_cache import FORMAT, cache_folder
from .scan_config import ScanConfig, scan_config
from .sketch import QuantileSketch

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

STAT_QUANTILES = {"q50": 0.5, "q90": 0.9, "q99": 0.99, "q999": 0.999}


# ---------------------------------------------------------------------------------------------
# Per-position values of objectives


def per_position(o: Objective) -> Objective:
    """The objective read at one position: the scan treats every position as its own prompt, so a
    reduction over positions (`@max`, `@mean`, `@POS`) does not apply and becomes `last`."""
    if isinstance(o, Combination):
        return Combination([(c, per_position(t)) for c, t in o.terms])
    if isinstance(o, Max):
        return Max(*(per_position(p) for p in o.parts))
    if dataclasses.is_dataclass(o) and getattr(o, "reduce", "last") != "last":
        return dataclasses.replace(o, reduce="last")
    return o


def position_values(
    model: HookedTransformer,
    objectives: Sequence[Objective],
    tokens: Int[Tensor, "batch seq"],
    *,
    skip: int = 0,
    stop: int | None = None,
) -> Float[Tensor, "n_obj batch pos"]:
    """Every objective at every position (after the first `skip`, e.g. the start token), from one
    forward pass stopped at the deepest hook needed.

    A dream's objective reduces over positions; here positions are turned into batch rows of length-1
    captures, so each objective's own `value` computes it (one SAE encoding shared by all its latents)."""
    objs = [per_position(o) for o in objectives]
    parts = leaves(objs)
    needs_logits = any(t.needs_logits for t in parts)
    capture, normed = forward_capture(model, objs, tokens, stop=stop, final=needs_logits)
    B, S = tokens.shape
    P = S - skip
    for h, a in capture.acts.items():
        if a.ndim < 2 or a.shape[1] != S or (a.ndim == 4 and a.shape[2] == a.shape[3] == S):
            raise ScanError(
                f"{h} has shape {list(a.shape)} for {S}-token inputs, not one activation per position "
                "(attention patterns relate two positions): it cannot be scanned position by position"
            )
    flat = {h: a[:, skip:].reshape(B * P, 1, *a.shape[2:]) for h, a in capture.acts.items()}
    memo: dict[Any, int] = {}
    if needs_logits:  # the final normed residual as rows; each logit token looked up once per batch
        normed = normed[:, skip:].reshape(B * P, 1, -1)  # type: ignore[index]  # final=True: never None
        for t in parts:
            for a in ("token", "token_a", "token_b"):
                if hasattr(t, a):
                    memo[("token", getattr(t, a))] = token_id(model, getattr(t, a))
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
            acts = {h: a[lo : lo + step] for h, a in flat.items()}
            logits = unembed(model, normed[lo : lo + step]) if needs_logits else None  # type: ignore[index]
            cap = Capture(acts=acts, logits=logits, start=0, memo=dict(memo), model=model)
            out[rest, lo : lo + step] = torch.stack([objs[j].value(cap).float() for j in rest])
    return out.view(len(objs), B, P)


# ---------------------------------------------------------------------------------------------
# Windows in batches; top examples: one candidate per window (its max position), at most
# `per_document` per document


def _batched(it: Iterator[DocumentWindow], n: int) -> Iterator[list[DocumentWindow]]:
    while batch := list(islice(it, n)):
        yield batch


class _TopK:
    """Streaming top-k of chunk maxima under a per-document cap.

    The cap makes the kept set a basis of a (truncated partition) matroid, so greedy selection is
    exact and anything dropped once can never come back: streaming gives the brute-force answer."""

    def __init__(self, n_obj: int, k: int, per_document: int):
        self.k, self.cap = k, per_document
        # entries: (-value, seq, doc, pos, ids); (-value, seq) is unique, so ids are never compared
        self.pools: list[list[tuple]] = [[] for _ in range(n_obj)]
        self.thr = np.full(n_obj, -np.inf)

    def update(self, cmax: np.ndarray, carg: np.ndarray, chunks: list[DocumentWindow], seq0: int) -> None:
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
    model: HookedTransformer, objectives: Sequence[Objective], windows: Sequence[Sequence[int]], *, batch_size: int = 32
) -> tuple[Float[Tensor, "n_obj n"], Float[Tensor, " n"]]:
    """Each window scored as a dream of its length: the objectives (as dreams read them) and `xe`, the
    mean next-token cross-entropy of the window given the start token (`scoring.score`)."""
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

    def score(
        self, model: HookedTransformer, objectives: Sequence[Objective | str] | None = None, *, batch_size: int = 32,
        progress: bool = False,
    ) -> None:
        """Score the top examples as dreams (done by `scan` unless `score=False`)."""
        objs = [objective(o) for o in (objectives or self.objectives)]
        windows = self.examples["ids"].tolist()
        uniq = list(dict.fromkeys(tuple(w) for w in windows))
        if not uniq:
            return
        pos = {w: j for j, w in enumerate(uniq)}
        vals, xe = [], []
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
            digests[name] = write_parquet(frame, folder / f"{name}.parquet")
        meta = {"format": FORMAT, "objectives": self.objectives, "digests": digests,
                "sketch": self.sketch.meta(), "meta": self.meta}
        atomic_write_text(folder / "scan.json", json.dumps(meta, indent=1))
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> ScanResult:
        """A saved scan; `ScanCacheError` if it is missing, partial or corrupt."""
        folder = Path(folder)
        try:
            meta = json.loads((folder / "scan.json").read_text())
            if meta.get("format") != FORMAT:
                raise ScanCacheError(f"{folder} was written by another version of dreamlens (format {meta.get('format')})")
            frames = {}
            for name in ("stats", "examples", "sketch"):
                path = folder / f"{name}.parquet"
                if digest_file(path) != meta["digests"][name]:
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


# ---------------------------------------------------------------------------------------------
# The scan


def example_spans(scan: ScanResult, objective: int | str | Objective, length: int, k: int | None = None, *,
                  positive: bool = True) -> list[tuple[int, tuple[int, ...]]]:
    """Where a dream of `length` tokens may start from the dataset: the last `length` token ids of each
    top example of `objective` (only where it fires, activation > 0, unless `positive=False`), without
    repeats, best first, at most `k`; each with its rank among the top examples (0 is the best)."""
    top = scan.top(objective)
    out: list[tuple[int, tuple[int, ...]]] = []
    seen: set[tuple[int, ...]] = set()
    for rank, (ids, a) in enumerate(zip(top["ids"], top["activation"])):
        span = tuple(int(t) for t in list(ids)[-length:])
        if len(span) == length and (a > 0 or not positive) and span not in seen:
            seen.add(span)
            out.append((rank, span))
        if k is not None and len(out) == k:
            break
    return out


def scan(
    model: HookedTransformer,
    objectives: Sequence[str | Objective] | str | Objective,
    corpus: str | Path | Iterable[str] | None = None,
    *,
    config: ScanConfig | None = None,
    score: bool = True,
    cache: bool | str | Path = True,
    progress: bool = True,
    part: tuple[int, int] | None = None,
    **settings: Any,
) -> ScanResult:
    """Run `model` over `tokens` tokens of `corpus` and find, for every objective at once, its top
    examples and activation statistics. One forward pass per batch, stopped at the deepest hook needed.

    config: a `ScanConfig` (tokens, window, top_k, per_document, batch_size; default `ScanConfig()`), and
    `settings` any of its fields changed, e.g. `scan(model, objs, tokens=100_000, window=12)`.

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

    part: (i, n) scans part i of n (whole batches of the windows this scan reads, in order; it may be empty);
    `analysis.merge.merge_scans` merges the n parts into this scan's result.
    """
    if isinstance(objectives, (str, Objective)):
        objectives = [objectives]
    objs = [objective(o) for o in objectives]
    if not objs:
        raise ScanError("no objectives given; pass e.g. ['blocks.6.mlp.hook_post[123]']")
    for o in objs:
        o.validate(model)
    cfg = scan_config(config, **settings)
    window = cfg.window
    bos = bos_token_id(model)
    n_bos = int(bos is not None)
    if window + n_bos > model.cfg.n_ctx:
        raise ScanError(
            f"window {window} does not fit the model's context of {model.cfg.n_ctx} tokens"
            f"{' with the start token in front' if n_bos else ''}; use window <= {model.cfg.n_ctx - n_bos}"
        )
    names = [str(o) for o in objs]
    params = cfg.identity()
    extra = {} if part is None else part_settings(model, objs, corpus, part, batch_size=cfg.batch_size, **params)  # key, meta
    folder = cache_folder(model, objs, corpus, cache, **params, **extra)
    if folder is not None and (folder / "scan.json").exists():
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

    result = _scan(model, objs, corpus, cfg, progress, extra)
    if score:
        result.score(model, objs, progress=progress)
    if folder is not None:
        try:
            result.save(folder)
        except OSError as e:
            warnings.warn(f"could not write the scan cache at {folder}: {e}", stacklevel=2)
    return result


def _scan(
    model: HookedTransformer, objs: list[Objective], source: Any, cfg: ScanConfig, progress: bool, extra: dict[str, Any],
) -> ScanResult:
    budget, window, top_k, per_document, batch_size = cfg.tokens, cfg.window, cfg.top_k, cfg.per_document, cfg.batch_size

    t0 = time.perf_counter()
    n = len(objs)
    dev = model.cfg.device
    bos = bos_token_id(model)
    stop = stop_at_layer(model, [per_position(o) for o in objs])
    sketch = QuantileSketch(n, device=dev)
    total = torch.zeros(n, dtype=torch.float64, device=dev)
    top = _TopK(n, top_k, per_document)
    seq, end = extra.get("windows", (0, None))  # a part: windows [seq, end) of the whole scan's
    n_pos, docs_seen, limit = 0, -1, budget if end is None else end * window
    bar = tqdm(total=limit - seq * window, desc="scan", unit="tok", unit_scale=True, disable=not progress)
    try:
        with torch.inference_mode():
            windows = corpus_mod.document_windows(model, corpus_mod.documents(source), window, max_tokens=limit)
            for batch in _batched(islice(windows, seq, None), batch_size):
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
    if n_pos == 0 and not extra:
        raise ScanError(
            f"the corpus {corpus_mod.describe(source)!r} gave no window of {window} tokens: it is empty or "
            f"every document is shorter than {window} tokens; use a smaller window or more text"
        )
    if n_pos < budget and not extra:
        warnings.warn(f"the corpus ran out after {n_pos} tokens (budget {budget})", stacklevel=3)
    elapsed = time.perf_counter() - t0

    q = {name: sketch.quantile(p) for name, p in STAT_QUANTILES.items()}
    stats = pd.DataFrame({
        "objective": [str(o) for o in objs],
        "max": sketch.hi.cpu().numpy(),
        "mean": (total / (n_pos or math.nan)).cpu().numpy(),  # an empty part: NaN
        "frac_active": sketch.positive() / (n_pos or math.nan),
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
        "stop_at_layer": stop, "bos_token_id": bos, "seconds": round(elapsed, 3), **extra,
    }
    return ScanResult([str(o) for o in objs], stats, examples, sketch, meta)
