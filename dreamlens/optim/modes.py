"""Modes: several distinct dreams of one objective, for features that respond to unrelated things.
Mode 1 is an ordinary dream; each later mode is dreamed without the tokens that carried the modes before
it and, given the objective's top dataset examples, starts from the one least like the modes before it.

Distinct, by definition: mode j's prompts contain none of the *key tokens* of modes 1..j-1, nor their
nearest neighbours in the embedding. A mode's key tokens are the `n_key` tokens of its best prompt at the
fluency limit whose swap costs the most activation (causal attribution: the prompt's activation minus
the median activation over the token's replacements, kept where that drop is positive); its neighbours
are the `neighbours` tokens whose embedding rows are closest to it in cosine (W_E), so that " North",
"north" and " northern" go together.

Where a later mode starts: with `examples` (the top examples' spans), the example whose
`pattern_similarity` to the earlier modes' best prompts is lowest (what the objective's hooks hold there,
and the direction the objective reads them in; for `max(A, B)`: A's where A is the larger term), among
those as fluent as the limit (xe <= `limit`) where there are any. Its banned tokens (the earlier modes'
key tokens are often common ones, such as digits) are replaced, left to right, by the model's most
likely allowed token there. So a later mode begins in a part of the dataset that the earlier modes do
not explain; without examples it starts at random, like mode 1.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor

from ..errors import DreamError, OutputError, ResultError
from ..io import atomic_write_text
from ..objectives import Objective
from ..objectives import objective as parse_objective
from ..results import DreamResult, check_output_folder
from .config import DreamConfig

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from ..analysis.attribution import Attribution
    from .loop import Callback

MODES_FORMAT = 2  # 2 added `starts`; format 1 still loads
DEFAULT_LIMIT = 6.0  # nats/token: modes are ranked by their best activation at xe <= this


@dataclass
class Modes:
    """K distinct dreams of one objective, best first by activation at xe <= `limit`.

    `dreams[i]` is a full DreamResult (history, frontier); `found[i]` the order it was dreamed in (1 is
    the ordinary dream); `key_tokens[i]` its key tokens (banned for every mode found after it);
    `banned[i]` the tokens it was dreamed without (from the modes found before it); `starts[i]` where
    it started: "random" (or "given": the config's init) or "example N" (the top example of rank N)."""

    objective: str
    dreams: list[DreamResult]
    found: list[int]
    key_tokens: list[list[int]]
    banned: list[list[int]]
    limit: float = DEFAULT_LIMIT
    attribution_token_forwards: int = 0  # spent separating modes: key tokens, starts (in the later modes' budgets)
    starts: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.starts:  # modes saved before starts were recorded started at random
            self.starts = ["random"] * len(self.dreams)

    def __len__(self) -> int:
        return len(self.dreams)

    def __getitem__(self, i: int) -> DreamResult:
        return self.dreams[i]

    def __iter__(self) -> Iterator[DreamResult]:
        return iter(self.dreams)

    def best(self, i: int) -> pd.Series | None:
        """Mode i's best prompt at xe <= limit (None when it has none that fluent)."""
        r = self.dreams[i]
        return None if r.best_index(self.limit) is None else r.best(self.limit)

    def to_frame(self) -> pd.DataFrame:
        """One row per mode, best first: its best prompt at the fluency limit (text, activation, xe),
        its unconstrained best, the order it was found in, its key tokens, how many tokens it was
        dreamed without and where it started."""
        rows = []
        for i, r in enumerate(self.dreams):
            b = self.best(i)
            rows.append({
                "mode": i + 1, "found": self.found[i],
                "text": None if b is None else b["text"],
                "activation": float("nan") if b is None else float(b["activation"]),
                "xe": float("nan") if b is None else float(b["xe"]),
                "best_activation": float(np.max(r.activation)) if len(r) else float("nan"),
                "key_tokens": list(self.key_tokens[i]), "n_banned": len(self.banned[i]), "start": self.starts[i],
            })
        return pd.DataFrame(rows)

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """A folder: mode_1/ .. mode_K/ (each a DreamResult folder) and modes.json, written last."""
        path = Path(path)
        check_modes_folder(path, overwrite=overwrite)
        if (path / "modes.json").exists():
            (path / "modes.json").unlink()  # written again last: a crash leaves no modes.json over mixed folders
            for old in path.glob("mode_*"):  # an earlier save may have had more modes
                if old.is_dir() and (old / "result.json").exists():
                    shutil.rmtree(old)
        path.mkdir(parents=True, exist_ok=True)
        for i, r in enumerate(self.dreams):
            r.save(path / f"mode_{i + 1}", overwrite=True)
        meta = {"format": "dreamlens.Modes", "version": MODES_FORMAT, "objective": self.objective, "limit": self.limit,
                "found": self.found, "key_tokens": self.key_tokens, "banned": self.banned,
                "attribution_token_forwards": self.attribution_token_forwards, "starts": self.starts}
        atomic_write_text(path / "modes.json", json.dumps(meta, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Modes:
        path = Path(path)
        f = path / "modes.json"
        if not f.is_file():
            raise ResultError(f"{str(path)!r} holds no modes (no modes.json); pass the folder Modes.save wrote")
        meta = json.loads(f.read_text())
        if meta.get("format") != "dreamlens.Modes" or meta.get("version") not in (1, MODES_FORMAT):
            got = f"{meta.get('format')!r} {meta.get('version')!r}"
            raise ResultError(f"{f} is not a modes file of format {MODES_FORMAT} (got {got})")
        dreams = [DreamResult.load(path / f"mode_{i + 1}") for i in range(len(meta["found"]))]
        return cls(meta["objective"], dreams, meta["found"], meta["key_tokens"], meta["banned"], meta["limit"],
                   meta.get("attribution_token_forwards", 0), meta.get("starts", []))

    def __repr__(self) -> str:
        parts = []
        for i in range(len(self)):
            b = self.best(i)
            parts.append(f"{i + 1}: " + ("none at this fluency" if b is None else f"{float(b['activation']):.3f} {b['text']!r}"))
        return f"Modes({self.objective!r}, xe <= {self.limit:g}; " + "; ".join(parts) + ")"


def check_modes_folder(path: Path, *, overwrite: bool = False) -> None:
    """Refuse (`OutputError`) to save modes to `path` where that would destroy something: modes already
    there unless `overwrite`, and never a dream result, a file or a folder holding other things."""
    if (path / "modes.json").exists():
        if not overwrite:
            raise OutputError(f"{str(path)!r} already holds modes; pass overwrite=True to replace them, or choose another folder")
        return
    if (path / "result.json").exists():
        raise OutputError(f"{str(path)!r} holds a dream result; modes go to a folder of their own: choose another folder")
    check_output_folder(path)


@dataclass(frozen=True)
class ModeSettings:
    """How later modes are kept away from earlier ones (see the module docstring)."""

    n_key: int = 3  # key tokens per mode
    neighbours: int = 8  # embedding neighbours banned with each key token (itself included)
    n_alternatives: int = 8  # replacements per position in the attribution (half gradient, half random)
    limit: float = DEFAULT_LIMIT
    exclude: tuple[int, ...] = ()  # never banned (the start token never is)

    def validate(self) -> None:
        for name in ("n_key", "neighbours", "n_alternatives"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise DreamError(f"{name} must be a positive integer, got {v!r}")
        if not self.limit > 0:
            raise DreamError(f"the fluency limit must be positive (nats per token), got {self.limit!r}")


def key_tokens(att: Attribution, n_key: int) -> list[int]:
    """The tokens of an attributed prompt whose swap costs the most activation: the prompt's value
    minus the median over each position's replacements, the `n_key` largest positive drops."""
    drop = att.value - np.median(att.alt_values, axis=1)
    order = [int(i) for i in np.argsort(-drop, kind="stable") if drop[i] > 0][:n_key]
    return list(dict.fromkeys(int(att.ids[i]) for i in order))


def embedding_neighbours(model: HookedTransformer, tokens: list[int], k: int) -> list[int]:
    """Each token and its `k - 1` nearest tokens by cosine of the embedding rows (W_E)."""
    if not tokens:
        return []
    w = model.W_E.detach().float()
    w = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sims = w[torch.tensor(tokens, device=w.device)] @ w.T  # [n, vocab]
    near = sims.topk(min(k, w.shape[0]), dim=-1).indices.cpu()
    return sorted({int(t) for t in tokens} | {int(t) for t in near.flatten()})


def attribution_cost(seq_len: int, length: int, n_alternatives: int) -> int:
    """Token-forwards of one attribution: a gradient pass (3 per token) and every swapped prompt."""
    return seq_len * (3 + length * n_alternatives)


def dream_modes(
    model: HookedTransformer,
    objective: Objective | str,
    run: Any,
    cfg: DreamConfig,
    modes: int,
    *,
    settings: ModeSettings | None = None,
    examples: Sequence[tuple[int, Sequence[int]]] | None = None,
    callback: Callback | None = None,
    progress: bool = True,
) -> Modes:
    """`modes` dreams of `objective` with the optimizer `run` (e.g. `adapt`) and its config `cfg`, each
    later one without the key tokens (and their neighbours) of those before it; ranked by activation at
    xe <= `settings.limit`. `examples`: the objective's top dataset examples as (rank, span of
    `cfg.length` ids), e.g. `analysis.example_spans(scan, objective, length)`; a later mode starts from
    the one least like the modes before it (see the module docstring), at random without them. With a
    token budget, a later mode's budget leaves room for what separated it (the attribution, the
    examples' patterns), so no mode costs more than one ordinary dream."""
    from ..analysis.attribution import attribute
    from ..models import bos_token_id
    from ..scoring import make_layout

    settings = settings or ModeSettings()
    settings.validate()
    if not isinstance(modes, int) or isinstance(modes, bool) or modes < 1:
        raise DreamError(f"modes must be a positive integer, got {modes!r}")
    obj = parse_objective(objective)
    layout = make_layout(model, cfg.length, cfg.prefix, cfg.suffix)
    n_grad = settings.n_alternatives // 2
    cost = attribution_cost(layout.seq_len, cfg.length, settings.n_alternatives)
    starts = Starts(model, obj, cfg, examples, settings.limit) if examples is not None and modes > 1 else None
    if cfg.max_token_forwards is not None and modes > 1:
        need = cost + (starts.cost(1) if starts else 0)
        if cfg.max_token_forwards <= need:
            raise DreamError(
                f"a budget of {cfg.max_token_forwards} token-forwards leaves nothing for a mode after what separates it "
                f"({need} token-forwards); raise max_token_forwards, lower ModeSettings.n_alternatives or pass fewer examples"
            )
    keep = set(settings.exclude) | ({b} if (b := bos_token_id(model)) is not None else set())
    first = "given" if cfg.init_text is not None or cfg.init_ids is not None else "random"
    dreams: list[DreamResult] = []
    keys: list[list[int]] = []
    banned: list[list[int]] = []
    how: list[str] = []
    extra: set[int] = set()
    spent = 0
    for k in range(modes):
        cfg_k, start = cfg, first
        if k:
            cfg_k = dataclasses.replace(cfg, banned_tokens=tuple(sorted(set(cfg.banned_tokens) | extra)))
            budget_k = cost
            if starts is not None:
                picked = starts.pick([_best_ids(r, settings.limit) for r in dreams], cfg_k)
                budget_k += starts.cost(k)
                spent += starts.cost(k)
                if picked is not None:
                    rank, span, replaced = picked
                    cfg_k = dataclasses.replace(cfg_k, init_ids=tuple(span), init_text=None)
                    start = f"example {rank}" + (f" ({replaced} banned token{'s' * (replaced > 1)} replaced)" if replaced else "")
            if cfg.max_token_forwards is not None:
                cfg_k = dataclasses.replace(cfg_k, max_token_forwards=cfg.max_token_forwards - budget_k)
        r = run(model, obj, cfg_k, callback=callback, progress=progress)
        dreams.append(r)
        banned.append(sorted(extra))
        how.append(start)
        if k == modes - 1:
            keys.append([])
            break
        ids = _best_ids(r, settings.limit)
        if ids is None:
            keys.append([])
            continue
        att = attribute(model, obj, ids, prefix=cfg.prefix, suffix=cfg.suffix, n_gradient=n_grad,
                        n_random=settings.n_alternatives - n_grad, seed=cfg.seed)
        spent += cost
        key = [t for t in key_tokens(att, settings.n_key) if t not in keep]
        keys.append(key)
        extra |= {t for t in embedding_neighbours(model, key, settings.neighbours) if t not in keep}
    order = sorted(range(len(dreams)), key=lambda i: -_rank_value(dreams[i], settings.limit))
    return Modes(str(obj), [dreams[i] for i in order], [i + 1 for i in order], [keys[i] for i in order],
                 [banned[i] for i in order], settings.limit, spent, [how[i] for i in order])


REPAIR_TRIES = 3  # examples tried, least alike first, until one is still a valid prompt once its banned tokens are replaced


def starts_cost(seq_len: int, n_examples: int, mode: int, length: int) -> int:
    """Token-forwards charged for choosing where later mode `mode` (1, 2, ...) starts: with the first, the
    examples' patterns and their xe (two passes each); with each, the best prompt of every earlier mode
    and, at most, one pass per replaced token of each example tried."""
    return seq_len * ((2 * n_examples if mode == 1 else 0) + mode + REPAIR_TRIES * length)


class Starts:
    """Where later modes start: the objective's top examples (their activation patterns, readouts and
    xe, computed once), and for each later mode the example least like the modes before it."""

    def __init__(self, model: HookedTransformer, obj: Objective, cfg: DreamConfig,
                 examples: Sequence[tuple[int, Sequence[int]]], limit: float = DEFAULT_LIMIT):
        from ..scoring import make_layout

        self.model, self.obj, self.limit = model, obj, limit
        self.layout = make_layout(model, cfg.length, cfg.prefix, cfg.suffix)
        self.ranks: list[int] = []
        spans: list[tuple[int, ...]] = []
        for rank, span in examples:
            span = tuple(int(t) for t in span)
            if len(span) != cfg.length:
                raise DreamError(
                    f"example {rank} has {len(span)} tokens but the dream has {cfg.length}; pass spans of the dream's "
                    "length (analysis.example_spans(scan, objective, length) cuts them)"
                )
            self.ranks.append(int(rank))
            spans.append(span)
        self.spans = torch.tensor(spans, dtype=torch.long).reshape(len(spans), cfg.length)
        self._patterns: tuple[Tensor, Tensor] | None = None
        self._xe: Tensor | None = None

    def cost(self, k: int) -> int:
        """Token-forwards charged for choosing where later mode `k` (1, 2, ...) starts (`starts_cost`)."""
        return starts_cost(self.layout.seq_len, len(self.spans), k, self.layout.length)

    def patterns(self, spans: Tensor) -> tuple[Tensor, Tensor]:
        from ..analysis.patterns import readouts

        return readouts(self.model, self.obj, self.layout.assemble(spans).tolist())

    def pick(self, earlier: list[Tensor | None], cfg: DreamConfig) -> tuple[int, list[int], int] | None:
        """The example least like the `earlier` modes' best prompts, among the fluent ones (xe <= limit) if
        there are any, with the tokens `cfg` bans replaced (`repair`): (rank, span, tokens replaced). The
        next least alike is tried (`REPAIR_TRIES` in all) when the replaced text does not tokenize back to
        itself; None if no example will do."""
        from ..analysis.patterns import pattern_similarity
        from ..scoring import banned_mask, retokenizes, score

        if not len(self.spans):
            return None
        if self._patterns is None:
            self._patterns = self.patterns(self.spans)
            self._xe = score(self.model, [self.obj], self.spans.to(self.model.cfg.device), self.layout)[1].cpu()
        ex, xe = self._patterns, self._xe
        assert xe is not None  # computed with the patterns
        mask = banned_mask(self.model, ascii_only=cfg.ascii_only, ban_whitespace_only=cfg.ban_whitespace_only,
                           extra=cfg.banned_tokens).cpu()
        ok = retokenizes(self.model, self.spans, self.layout, cfg.prefix, cfg.suffix)[0].cpu()
        if (ok & (xe <= self.limit)).any():
            ok &= xe <= self.limit
        prompts = [p for p in earlier if p is not None]
        worst = torch.zeros(len(self.spans))  # nothing to be unlike: the best-ranked first
        if prompts:
            mine = self.patterns(torch.stack(prompts))
            worst = pattern_similarity(ex, mine, ex[0].mean(dim=0)).max(dim=1).values  # vs the closest earlier mode
        worst[~ok] = float("inf")
        for j in torch.argsort(worst, stable=True)[:REPAIR_TRIES].tolist():  # ties: the better-ranked example
            if not ok[j]:
                break
            span, n = self.repair(self.spans[j], mask)
            if retokenizes(self.model, span[None], self.layout, cfg.prefix, cfg.suffix)[0].all():
                return self.ranks[j], span.tolist(), n
        return None

    def repair(self, span: Int[Tensor, " length"], banned: Tensor) -> tuple[Int[Tensor, " length"], int]:
        """`span` with each banned token replaced, left to right, by the model's most likely allowed token
        after what precedes it; and how many were replaced."""
        span = span.clone()
        todo = torch.nonzero(banned[span]).flatten().tolist()
        for pos in todo:
            with torch.no_grad():
                logits = self.model(self.layout.assemble(span[None]).to(self.model.cfg.device))
            at = logits[0, self.layout.span.start + pos - 1].float().cpu()
            at[banned] = float("-inf")
            span[pos] = int(at.argmax())
        return span, len(todo)


def _best_ids(r: DreamResult, limit: float) -> Int[Tensor, " length"] | None:
    """The span of the result's best prompt at xe <= limit (its most fluent prompt if none is)."""
    if not len(r):
        return None
    i = r.best_index(limit)
    i = int(np.argmin(r.xe)) if i is None else i
    return torch.as_tensor(np.asarray(r.ids[i]), dtype=torch.long)


def _rank_value(r: DreamResult, limit: float) -> float:
    i = r.best_index(limit)
    return float("-inf") if i is None else float(r.activation[i])
