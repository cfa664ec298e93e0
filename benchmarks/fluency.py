"""The paper's figure in numbers: do dreams reach the top dataset examples' region (activation vs
cross-entropy) and go past it? Every method of METHODS, at the same budget in token-forwards, against
the top 32 dataset examples of 8 fixed targets of the embedded model.

    python benchmarks/fluency.py --quick --threads 1                  # 2 targets, a tiny budget
    python benchmarks/fluency.py --scan-only --threads 2              # build and cache the scan first
    python benchmarks/fluency.py --shard 0/2 --out benchmarks/results/fluency/shard0
    python benchmarks/fluency.py --shard 1/2 --out benchmarks/results/fluency/shard1
    python benchmarks/fluency.py --merge benchmarks/results/fluency/shard0 benchmarks/results/fluency/shard1

Targets (fixed here, before any run): MLP neurons at four depths, three latents of the embedded SAE
(scored as the SAE computes them, the post-activation: 0 where a TopK latent does not fire), and one
residual direction (the SAE's decoder row of latent 4004, unit norm, at the SAE's hook).

Dataset side: one `dl.scan` of the embedded corpora (`--scan-tokens`, default 200,000) for all targets,
windows as long as the dreams; its top 32 examples per target are scored exactly like dreams (start
token + window). `dataset max` is `metrics.dataset_max` (the scan's max, or a re-scored top example's if
higher); `median xe` the median cross-entropy of the 32 top examples.

Dream side: every run is `dl.dream(model, target, method, length=L, seed=s, max_token_forwards=B, ...)`:
it stops after the first iteration whose cumulative token-forwards reach B (so it may overshoot by up to
one iteration; the spent compute is reported). For an SAE latent every method climbs the
pre-activation (a TopK latent has zero gradient where it does not fire); afterwards every prompt of the
run whose pre-activation is above 0 is re-scored with the post-activation (elsewhere the post-activation
is 0: sae-lens's TopK applies a ReLU after the top-k, and the decoder-norm rescaling is positive), and
the metrics use the post-activation. The pre-activation's best is reported beside it.

Per run (then the median over seeds per target and method):
  dominated_share   share of the 32 top examples that some prompt of the run dominates
                    (activation >= the example's and xe <= the example's)
  beats_dataset     whether some prompt has activation > dataset max at xe <= the median xe of the top
                    examples. Per target and method: the share of seeds whose run beats the dataset;
                    beats_dataset_rate (per method): the mean of that share over targets, i.e. the share
                    of all (target, seed) runs that beat the dataset.
  best xe<=T        the best activation of a prompt with xe <= T (T = 4, 5, 6, 8, median xe, none)
Budget curve of the default method: the same figures at 1/4, 1/2 and the full budget. For a method whose
trajectory does not depend on the budget the curve is the full run cut at the first iteration whose
token-forwards reach the smaller budget (exactly what a run with that budget would have done); a method
flagged `budget_dependent` (ADAPT sizes its beam search from the budget) gets real runs at 1/4 and 1/2
of the budget (`--curve`, on by default except with --quick).

Every run is written to OUT/runs/<job>/ as soon as it ends (its DreamResult in result/, the scored
history in scored.parquet, then run.json with the callback's (iteration, token-forwards) trace); a
restarted shard skips the runs already there with the same settings. A failing run is printed,
recorded (error.json) and skipped; it is tried again on a restart. Ctrl-C or SIGTERM stops the
script without recording the run in progress.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import math
import os
import platform
import re
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

import dreamlens as dl
from dreamlens.analysis import metrics
from dreamlens.analysis.scan import example_spans
from dreamlens.corpus import split_documents
from dreamlens.io import atomic_write_text
from dreamlens.optim.methods import DEFAULT_METHOD

# name -> (method of dl.dream, config options). The key "budget_dependent": True marks a method whose
# trajectory depends on max_token_forwards (its budget curve then needs real runs); "examples": True, a
# method that starts from part A's top examples (dl.dream's examples=). Neither is passed on as an option.
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "default": (DEFAULT_METHOD, {"examples": True}),  # dream()'s default, from the examples
    "epo_paper": ("epo", {}),  # EPOConfig's defaults: the paper's EPO
    # EPO beyond the paper: starts from text sampled from the model, and a quarter of each member's
    # children take a token sampled from the model's next-token distribution (EPOConfig's options).
    "epo": ("epo", {"init": "sample", "lm_share": 0.25}),
    "adapt": ("adapt", {"self_scan": 0, "budget_dependent": True}),  # from its beam search (a share of the budget)
    "gcg": ("gcg", {}),
    # A length range of 12..16 tokens (insertions grow the prompt, deletions stop at 12): from the examples,
    # and without them from the model's own text, scanned (ADAPTConfig.self_scan, optim.self_scan).
    "adapt_examples_range": ("adapt", {"examples": True, "max_length": 16}),
    "adapt_self_scan": ("adapt", {"self_scan": 0.35, "max_length": 16, "budget_dependent": True}),
    "adapt_range": ("adapt", {"self_scan": 0, "max_length": 16, "budget_dependent": True}),  # from its beam search
    # dl.dream's default without examples (ADAPTConfig.self_scan=None with a budget: SELF_SCAN_SHARE = 0.35)
    "adapt_self_scan_fixed": ("adapt", {"self_scan": 0.35, "budget_dependent": True}),
}

NEURONS = [
    "blocks.4.mlp.hook_post[842]",
    "blocks.12.mlp.hook_post[1256]",
    "blocks.20.mlp.hook_post[300]",
    "blocks.27.mlp.hook_post[1333]",
]
SAE_LATENTS = [2261, 2448, 221]  # of the embedded SAE (dreamlens.sae.EMBEDDED_SAE_LATENTS)
DIRECTION_LATENT = 4004  # the residual direction: this latent's decoder row, unit norm
XE_LIMITS = (4.0, 5.0, 6.0, 8.0)
TOP_K = 32
CURVE = (0.25, 0.5, 1.0)
ITERS = 100_000  # the budget ends every run
DEFAULT_OUT = "benchmarks/results/fluency"
QUICK_OUT = "benchmarks/results/fluency_quick"
DEFAULT_FIGURE = "docs/dataset_comparison.png"
EXAMPLES_ONLY = "examples_only"  # the seeded default's starts, scored, with no search
PARTS = ("A", "B")  # the held-out split: seeded methods start from A's examples; dreams are judged against A+B


# ---------------------------------------------------------------------------------------------
# Targets


@dataclass
class Target:
    name: str  # as in the tables
    dream: Any  # the objective the methods climb
    score: Any = None  # the objective the metrics use, when it differs (SAE latents: the post-activation)

    @property
    def scored(self) -> Any:
        return self.score if self.score is not None else self.dream


def build_targets(quick: bool) -> list[Target]:
    from dreamlens.sae import EMBEDDED_SAE_LATENTS, load_sae

    sae = load_sae()
    missing = [i for i in SAE_LATENTS + [DIRECTION_LATENT] if i not in EMBEDDED_SAE_LATENTS]
    if missing:
        print(f"(note: latents {missing} are not in EMBEDDED_SAE_LATENTS)")
    out = [Target(n, dl.objective(n)) for n in NEURONS]
    for i in SAE_LATENTS:
        post = dl.SAELatent(sae, i, source="embedded")
        out.append(Target(str(post), dl.SAELatent(sae, i, pre_activation=True, source="embedded"), post))
    hook = sae.cfg.metadata.hook_name
    v = sae.W_dec[DIRECTION_LATENT].detach().float()
    out.append(Target(f"dir:sae_dec[{DIRECTION_LATENT}]", dl.Direction(hook, v / v.norm())))
    if quick:
        out = [out[0], out[len(NEURONS)]]  # the first neuron and the first SAE latent
    return out


# ---------------------------------------------------------------------------------------------
# Jobs: one dream run each


@dataclass(frozen=True)
class Job:
    target: int
    method: str
    seed: int
    frac: float = 1.0  # share of the budget (below 1: a real budget-curve run)

    def key(self, names: list[str]) -> str:
        slug = re.sub(r"[^A-Za-z0-9]+", "_", names[self.target]).strip("_")
        tail = "" if self.frac == 1.0 else f"__b{self.frac:g}"
        return f"{self.target:02d}_{slug}__{self.method}__s{self.seed}{tail}"


def split_options(name: str, settings: dict[str, Any] | None = None) -> tuple[str, dict[str, Any], bool]:
    """(dreamlens method, config options, budget_dependent) of a METHODS entry (as the run's settings
    recorded it, when given)."""
    method, options = (settings or {}).get("method_configs", {}).get(name) or METHODS[name]
    options = dict(options)
    dependent = bool(options.pop("budget_dependent", False))
    options.pop("examples", None)
    return method, options, dependent


def seeded(name: str, settings: dict[str, Any] | None = None) -> bool:
    """Whether a METHODS entry starts from part A's top examples (`examples=` of dl.dream)."""
    _, options = (settings or {}).get("method_configs", {}).get(name) or METHODS[name]
    return bool(options.get("examples", False))


def default_name(names: list[str]) -> str:
    """The METHODS entry of dream()'s default ("default": DEFAULT_METHOD from the examples), or, when it
    is not among `names`, the first."""
    return "default" if "default" in names else names[0]


def inexact_fracs(settings: dict[str, Any]) -> list[float]:
    """The budget shares below 1 at which the default method's run would differ from its full run cut
    there (those need real runs). ADAPT's trajectory depends on the budget only through its beam
    search's sizes: a share whose beam sizes equal the full budget's is cut exactly."""
    method, options, dependent = split_options(settings["default"], settings)
    if not dependent:
        return []
    if method != "adapt":
        return list(CURVE[:-1])
    from dreamlens.optim.beam import beam_sizes
    from dreamlens.optim.config import ADAPTConfig
    from dreamlens.scoring import Layout

    layout = Layout((0,), (), settings["length"], 1)  # the start token, then the dream: every run here
    def sizes(budget: float) -> tuple[int, int]:
        return beam_sizes(ADAPTConfig(**options, length=settings["length"], max_token_forwards=round(budget)), layout)
    return [f for f in CURVE[:-1] if sizes(settings["budget"] * f) != sizes(settings["budget"])]


def make_jobs(settings: dict[str, Any], methods: list[str]) -> list[Job]:
    """The runs of `methods`, method-major, in the order of `--methods`, the default method's budget-curve
    runs right after its own: a run cut short by time loses the last methods, never targets."""
    T, S = range(len(settings["targets"])), range(settings["seeds"])
    d = settings["default"]
    jobs = []
    for m in methods:
        jobs += [Job(t, m, s) for t in T for s in S]
        if m == d and settings["curve"]:
            jobs += [Job(t, d, s, f) for f in inexact_fracs(settings) for t in T for s in S]
    return jobs


def with_earlier_methods(settings: dict[str, Any], path: Path) -> dict[str, Any]:
    """`settings` with the methods an earlier run of the same benchmark (every setting but the methods
    and the machine equal) recorded in `path`, so that a folder's settings name every method run there
    (those of this run first replace theirs)."""
    try:
        prev = json.loads(path.read_text())
    except (OSError, ValueError):
        return settings
    same = ("quick", "length", "budget", "seeds", "scan_tokens", "targets", "scan_n_tokens")
    if any(prev.get(k) != json.loads(json.dumps(settings[k])) for k in same):
        return settings
    methods = list(dict.fromkeys(prev.get("methods", []) + settings["methods"]))
    configs = {**prev.get("method_configs", {}), **settings["method_configs"]}
    return {**settings, "methods": methods, "method_configs": configs, "default": default_name(methods)}


def job_spec(job: Job, settings: dict[str, Any]) -> dict[str, Any]:
    """What a finished run must match to be reused."""
    return {"target": settings["targets"][job.target], "method": job.method,
            "config": list(settings["method_configs"][job.method]), "seed": job.seed, "length": settings["length"],
            "budget": round(settings["budget"] * job.frac)}


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, default=float))


def done(folder: Path, spec: dict[str, Any]) -> bool:
    try:
        return json.loads((folder / "run.json").read_text())["spec"] == json.loads(json.dumps(spec))
    except (OSError, ValueError, KeyError):
        return False


@torch.no_grad()
def rescore(model: Any, target: Target, r: Any, layout: Any, batch: int = 256) -> tuple[np.ndarray, float, int]:
    """The post-activation of every history prompt (0 where the pre-activation is not above 0, as a TopK
    or ReLU SAE gives), scored like the dream (start token + prompt); also the largest difference
    between the history's pre-activation and the one recomputed in the same pass (a consistency check)."""
    post = np.zeros(len(r), dtype=np.float64)
    pre = np.asarray(r.activation, dtype=np.float64)
    positive = np.flatnonzero(pre > -1e-6)  # a hair below 0: the history's floats may differ slightly
    by_length: dict[int, list[int]] = {}  # a run with a length range holds prompts of several lengths
    for i in positive:
        by_length.setdefault(len(r.ids[i]), []).append(int(i))
    diff, n_uniq = 0.0, 0
    for length, rows in sorted(by_length.items()):
        idx = np.asarray(rows)
        sub = layout.with_length(length)
        ids = np.stack([np.asarray(r.ids[i], dtype=np.int64) for i in rows])
        uniq, first, inverse = np.unique(ids, axis=0, return_index=True, return_inverse=True)
        values = np.zeros(len(uniq), dtype=np.float64)
        for lo in range(0, len(uniq), batch):
            span = torch.as_tensor(uniq[lo : lo + batch], dtype=torch.long, device=model.cfg.device)
            vals, _ = dl.run_objectives(model, [target.score, target.dream], sub.assemble(span), start=sub.start)
            values[lo : lo + batch] = vals[0].double().cpu().numpy()
            seen = pre[idx[first[lo : lo + batch]]]
            diff = max(diff, float(np.max(np.abs(vals[1].double().cpu().numpy() - seen))))
        post[idx] = values[inverse.reshape(-1)]
        n_uniq += len(uniq)
    return post, diff, n_uniq


def run_job(model: Any, target: Target, job: Job, settings: dict[str, Any], folder: Path,
            starts: list[tuple[int, tuple[int, ...]]]) -> dict[str, Any]:
    """One dream run (from `starts`, part A's top examples of the target, for a seeded method)."""
    from dreamlens.scoring import make_layout

    method, options, _ = split_options(job.method, settings)
    if seeded(job.method, settings):
        options["examples"] = starts
    budget = round(settings["budget"] * job.frac)
    trace: list[tuple[int, int]] = []

    def record(info: Any) -> None:
        trace.append((int(info.iteration), int(info.token_forwards)))

    t = time.perf_counter()
    r = dl.dream(model, target.dream, method, length=settings["length"], seed=job.seed, max_token_forwards=budget,
                 iters=ITERS, progress=False, callback=record, **options)
    seconds = time.perf_counter() - t
    if r.stopped == "interrupted":  # Ctrl-C or SIGTERM: a partial run is not a result; stop the shard
        raise KeyboardInterrupt("the run was interrupted")
    raw = np.asarray(r.activation, dtype=np.float64)
    act, check, n_rescored = raw, math.nan, 0
    t = time.perf_counter()
    if target.score is not None:
        act, check, n_rescored = rescore(model, target, r, make_layout(model, settings["length"]))
    rescore_seconds = time.perf_counter() - t
    folder.mkdir(parents=True, exist_ok=True)
    r.save(folder / "result")
    pd.DataFrame({"iteration": np.asarray(r.iteration, dtype=np.int64), "xe": np.asarray(r.xe, dtype=np.float64),
                  "activation": act, "raw": raw, "text": list(r.text)}).to_parquet(folder / "scored.parquet", index=False)
    info = {
        "spec": job_spec(job, settings), "target": settings["targets"][job.target], "method": job.method,
        "seed": job.seed, "frac": job.frac, "budget": budget, "seconds": seconds, "rescore_seconds": rescore_seconds,
        "token_forwards": int(r.token_forwards), "iterations": int(r.iterations), "stopped": r.stopped,
        "prompts": len(r), "rescored": n_rescored, "pre_check": check, "trace": trace,
    }
    _write_json(folder / "run.json", info)  # last: its presence marks the run as done
    (folder / "error.json").unlink(missing_ok=True)
    return info


# ---------------------------------------------------------------------------------------------
# Metrics


def cut(trace: list, budget: float) -> tuple[int | None, int | None]:
    """The last iteration and token-forwards of a run with `budget`, read from a longer run's trace: it
    stops after the first iteration whose token-forwards reach the budget (None: it never would)."""
    for it, tf in trace:
        if tf >= budget:
            return int(it), int(tf)
    return None, None


def best_at(act: np.ndarray, xe: np.ndarray, limit: float) -> float:
    ok = xe <= limit
    return float(act[ok].max()) if ok.any() else -math.inf


def run_metrics(act: np.ndarray, xe: np.ndarray, raw: np.ndarray, ex: tuple[np.ndarray, np.ndarray],
                d_max: float, x_med: float) -> dict[str, Any]:
    ok = np.isfinite(act) & np.isfinite(xe)
    act, xe, raw = act[ok], xe[ok], raw[ok]
    order = np.argsort(xe, kind="stable")
    best_upto = np.maximum.accumulate(act[order]) if len(act) else act
    ex_a, ex_x = ex
    n_le = np.searchsorted(xe[order], ex_x, side="right")
    dominated = [n > 0 and best_upto[n - 1] > a for n, a in zip(n_le, ex_a)]  # strict: a start never counts
    out = {
        "dominated_share": float(np.mean(dominated)) if len(dominated) else math.nan,
        "beats_dataset": float(bool(np.any((act > d_max) & (xe <= x_med)))),
    }
    for t in XE_LIMITS:
        out[f"best_xe{t:g}"] = best_at(act, xe, t)
    out["best_fluent"] = best_at(act, xe, x_med)
    out["best"] = best_at(act, xe, math.inf)
    out["pre_best"] = best_at(raw, xe, math.inf)
    out["pre_best_fluent"] = best_at(raw, xe, x_med)
    return out


def dataset_side(scans: list[Any], i: int) -> dict[str, Any]:
    """The judged dataset side of target i: the top TOP_K examples of all parts together (by the scans'
    activation, as one scan of A+B would rank them), each scored as a dream; the dataset max over every
    part (the scans' max, or a re-scored top example's if higher); the median xe of those examples."""
    tops = [sc.top(i).assign(part=p) for p, sc in enumerate(scans)]
    top = pd.concat(tops).sort_values("scan_activation", ascending=False, kind="stable").head(TOP_K)
    a, x = top["activation"].to_numpy(dtype=float), top["xe"].to_numpy(dtype=float)
    ok = np.isfinite(a) & np.isfinite(x)
    d_max = max(metrics.dataset_max(sc, i) for sc in scans)
    return {"d_max": d_max, "x_med": float(np.median(x[ok])) if ok.any() else math.nan, "ex": (a[ok], x[ok]),
            "part": top["part"].to_numpy()[ok], "from_a": int((top["part"] == 0).sum())}


def load_runs(folders: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    runs, errors = [], []
    for f in folders:
        for d in sorted(Path(f, "runs").glob("*")):
            if (d / "run.json").is_file():
                info = json.loads((d / "run.json").read_text())
                info["folder"] = str(d)
                runs.append(info)
            elif (d / "error.json").is_file():
                errors.append(json.loads((d / "error.json").read_text()))
    return runs, errors


def metric_rows(runs: list[dict[str, Any]], settings: dict[str, Any], sides: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per (run, budget share): the full budget for every run; 1/4 and 1/2 of it for the
    default method (cut from the full run, or from the real runs of a budget-dependent method)."""
    names = settings["targets"]
    budget = settings["budget"]
    d = settings["default"]
    inexact = inexact_fracs(settings) if d in settings["method_configs"] else []
    have_real = {(r["target"], r["seed"], r["frac"]) for r in runs if r["method"] == d and r["frac"] < 1}
    rows = []
    for r in runs:
        if r["spec"]["length"] != settings["length"] or r["spec"]["budget"] != round(budget * r["frac"]):
            continue  # a run of other settings (a stale folder)
        if r["target"] not in names:
            continue
        i = names.index(r["target"])
        side = sides[i]
        h = pd.read_parquet(Path(r["folder"]) / "scored.parquet")
        it, xe = h["iteration"].to_numpy(), h["xe"].to_numpy(dtype=float)
        act, raw = h["activation"].to_numpy(dtype=float), h["raw"].to_numpy(dtype=float)
        base = {"target": r["target"], "method": r["method"], "seed": r["seed"], "d_max": side["d_max"],
                "x_med": side["x_med"], "stopped": r["stopped"]}
        shares = [r["frac"]]
        if r["method"] == d and r["frac"] == 1.0:
            shares = [f for f in CURVE[:-1] if (r["target"], r["seed"], f) not in have_real] + [1.0]
            if seeded(d, settings):  # the starts alone, scored, before any search
                m = run_metrics(act[it == 0], xe[it == 0], raw[it == 0], side["ex"], side["d_max"], side["x_med"])
                rows.append({**base, "method": EXAMPLES_ONLY, "frac": 1.0, "source": "starts", "token_forwards": 0,
                             "iterations": 0, "seconds": math.nan, **m})
        for f in shares:
            if f == r["frac"]:
                keep, tf, iters, source = np.ones(len(it), bool), r["token_forwards"], r["iterations"], "run"
                seconds = r["seconds"]
                if f < 1:
                    source = "real run"
            else:
                last, tf = cut(r["trace"], budget * f)
                keep = it <= last if last is not None else np.ones(len(it), bool)
                tf = tf if tf is not None else r["token_forwards"]
                iters, seconds = (last if last is not None else r["iterations"]), math.nan
                source = "cut (inexact: budget-dependent)" if f in inexact else "cut"
            m = run_metrics(act[keep], xe[keep], raw[keep], side["ex"], side["d_max"], side["x_med"])
            rows.append({**base, "frac": f, "source": source, "token_forwards": tf, "iterations": iters,
                         "seconds": seconds, **m})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# Report


def fmt(x: Any, spec: str = ".3f") -> str:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return str(x)
    return "—" if not np.isfinite(x) else format(x, spec)


def norm(best: float, d_max: float) -> float:
    """Activation as a share of the dataset max; a run that found nothing counts 0."""
    if not d_max > 0:
        return math.nan
    return best / d_max if np.isfinite(best) else 0.0


BEST_COLS = [f"best_xe{t:g}" for t in XE_LIMITS] + ["best_fluent", "best"]


def per_target(rows: pd.DataFrame) -> pd.DataFrame:
    """Median over seeds per (target, method) at the full budget (beats_dataset: share of seeds)."""
    full = rows[rows["frac"] == 1.0]
    agg = dict.fromkeys(["dominated_share", *BEST_COLS, "pre_best", "pre_best_fluent", "d_max", "x_med"], "median")
    agg.update({"beats_dataset": "mean", "seconds": "mean", "token_forwards": "mean", "seed": "count"})
    return full.groupby(["target", "method"], sort=False).agg(agg).rename(columns={"seed": "runs"}).reset_index()


def summarize(table: pd.DataFrame, names: list[str]) -> dict[str, float]:
    """Per-method figures over targets (a target without a run counts as nothing)."""
    t = table.set_index("target").reindex(names)
    out = {
        "beats_dataset_rate": float(t["beats_dataset"].fillna(0).mean()),
        "mean_dominated_share": float(t["dominated_share"].fillna(0).mean()),
    }
    for c in BEST_COLS:
        out[f"norm_{c}"] = float(np.nanmean([norm(b, m) for b, m in zip(t[c].fillna(-math.inf), t["d_max"])]))
    out["median_norm_best_fluent"] = float(np.nanmedian(
        [norm(b, m) for b, m in zip(t["best_fluent"].fillna(-math.inf), t["d_max"])]))
    return out


def report(rows: pd.DataFrame, settings: dict[str, Any], sides: list[dict[str, Any]], errors: list[dict[str, Any]],
           header: list[str]) -> tuple[list[str], dict[str, Any]]:
    names = settings["targets"]
    methods = [m for m in settings["methods"] if m in set(rows["method"])] if len(rows) else []
    d = settings["default"]
    if len(rows) and EXAMPLES_ONLY in set(rows["method"]):
        methods.insert(methods.index(d) + 1 if d in methods else len(methods), EXAMPLES_ONLY)
    lines = list(header)
    tab = per_target(rows) if len(rows) else pd.DataFrame()
    lines += ["", "## Per target and method (full budget, median over seeds; beats_dataset: share of seeds)", "",
              "| target | method | dataset max | median xe | dominated_share | beats_dataset | "
              + " | ".join(f"best xe<={t:g}" for t in XE_LIMITS)
              + " | best xe<=median | best | pre-act. best | s/run | token-fw/run |",
              "|---|---|---:|---:|---:|---:|" + "---:|" * (len(XE_LIMITS) + 5)]
    for name in names:
        for m in methods:
            g = tab[(tab["target"] == name) & (tab["method"] == m)]
            if not len(g):
                lines.append(f"| `{name}` | {m} | " + " | ".join(["—"] * (len(XE_LIMITS) + 9)) + " |")
                continue
            r = g.iloc[0]
            lines.append(
                f"| `{name}` | {m} | {fmt(r['d_max'])} | {fmt(r['x_med'], '.2f')} | {fmt(r['dominated_share'], '.2f')} | "
                f"{fmt(r['beats_dataset'], '.2f')} | " + " | ".join(fmt(r[c]) for c in BEST_COLS) + " | "
                + (fmt(r["pre_best"]) if name.startswith("sae:") else "") + f" | {fmt(r['seconds'], '.0f')} | "
                f"{fmt(r['token_forwards'], '.0f')} |")
    summary: dict[str, Any] = {}
    lines += ["", "## Per method (means over targets; normalized: activation / dataset max, nothing found = 0)", "",
              ("| method | beats_dataset_rate | mean_dominated_share | norm. best xe<=median | median over targets | "
               "norm. best xe<=6 | norm. best xe<=8 | norm. best | s/run | token-fw/run | runs |"),
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in methods:
        s = summarize(tab[tab["method"] == m], names)
        g = rows[(rows["method"] == m) & (rows["frac"] == 1.0)]
        s.update({"seconds_per_run": float(g["seconds"].mean()), "token_forwards_per_run": float(g["token_forwards"].mean()),
                  "runs": len(g)})
        summary[m] = s
        lines.append(f"| {m}{' (default)' if m == d else ''} | {s['beats_dataset_rate']:.2f} | {s['mean_dominated_share']:.2f} | "
                     f"{fmt(s['norm_best_fluent'])} | {fmt(s['median_norm_best_fluent'])} | {fmt(s['norm_best_xe6'])} | "
                     f"{fmt(s['norm_best_xe8'])} | "
                     f"{fmt(s['norm_best'])} | {fmt(s['seconds_per_run'], '.0f')} | {fmt(s['token_forwards_per_run'], '.0f')} | "
                     f"{s['runs']} |")
    curve = {}
    if d in methods:
        lines += ["", f"## Budget curve of the default method ({d})", "",
                  "| share of budget | token-fw/run | source | beats_dataset_rate | mean_dominated_share | "
                  + " | ".join(f"norm. best xe<={t:g}" for t in XE_LIMITS) + " | norm. best xe<=median | norm. best |",
                  "|---:|---:|---|---:|---:|" + "---:|" * (len(XE_LIMITS) + 2)]
        for f in CURVE:
            g = rows[(rows["method"] == d) & (rows["frac"] == f)]
            if not len(g):
                continue
            s = summarize(per_target(g.assign(frac=1.0)), names)
            curve[f"{f:g}"] = {**s, "token_forwards_per_run": float(g["token_forwards"].mean()),
                               "source": ", ".join(sorted(set(g["source"])))}
            lines.append(f"| {f:g} | {g['token_forwards'].mean():.0f} | {curve[f'{f:g}']['source']} | "
                         f"{s['beats_dataset_rate']:.2f} | {s['mean_dominated_share']:.2f} | "
                         + " | ".join(fmt(s[f"norm_{c}"]) for c in BEST_COLS) + " |")
        figs = [curve[k] for k in sorted(curve, key=float)]
        if len(figs) > 1:
            keys = ["beats_dataset_rate", "mean_dominated_share", "norm_best_fluent", "norm_best_xe8", "norm_best"]
            rises = {k: all(b[k] >= a[k] - 1e-12 for a, b in itertools.pairwise(figs)) for k in keys}
            said = ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in rises.items())
            lines += ["", "rises with the budget (never falls): " + said]
    if d in summary:
        g, scratch = summary[d], [m for m in summary if m not in (d, EXAMPLES_ONLY) and not seeded(m, settings)]
        best = max(scratch, key=lambda m: summary[m]["beats_dataset_rate"], default=None)
        lines += ["", "## Goals at this budget", "",
                  f"- the default (seeded): beats_dataset_rate {g['beats_dataset_rate']:.2f} (goal >= 0.9), "
                  f"mean_dominated_share {g['mean_dominated_share']:.2f} (>= 0.8), median over targets of the normalized "
                  f"best at the median xe {g['median_norm_best_fluent']:.3f} (>= 1.2)"]
        if best is not None:
            lines.append(f"- the best method without examples ({best}): beats_dataset_rate "
                         f"{summary[best]['beats_dataset_rate']:.2f} (goal >= 0.5)")
    if errors:
        lines += ["", f"## Failed runs ({len(errors)})", ""]
        lines += [f"- {e['target']} {e['method']} seed {e['seed']} (share {e['frac']:g}): {e['error']}" for e in errors]
    return lines, {"methods": summary, "curve": curve, "default": d, "errors": len(errors)}


def draw(rows_runs: list[dict[str, Any]], settings: dict[str, Any], sides: list[dict[str, Any]], path: Path) -> Path:
    from matplotlib.figure import Figure

    from dreamlens.results import pareto_front
    from dreamlens.viz import save_png

    names = settings["targets"]
    n = len(names)
    cols = min(3, n)
    rws = math.ceil(n / cols)
    fig = Figure(figsize=(4.6 * cols, 3.5 * rws), layout="constrained")
    axes = fig.subplots(rws, cols, squeeze=False).ravel()
    colors = {m: f"C{j + 1}" for j, m in enumerate(METHODS)}
    seed0 = {(r["target"], r["method"]): r for r in rows_runs if r["seed"] == 0 and r["frac"] == 1.0}
    for ax, (i, name) in zip(axes, enumerate(names)):
        side = sides[i]
        ex_a, ex_x = side["ex"]
        a_part = side["part"] == 0
        ax.scatter(ex_x[a_part], ex_a[a_part], s=16, facecolors="none", edgecolors="C0", marker="o",
                   label="top examples from part A (the seeds' starts)", zorder=3)
        ax.scatter(ex_x[~a_part], ex_a[~a_part], s=16, c="C0", marker="o", alpha=0.8,
                   label="top examples from part B (held out)", zorder=3)
        for m in settings["methods"]:
            r = seed0.get((name, m))
            if r is None:
                continue
            h = pd.read_parquet(Path(r["folder"]) / "scored.parquet")
            a, x = h["activation"].to_numpy(dtype=float), h["xe"].to_numpy(dtype=float)
            keep = pareto_front(a, x)
            if len(keep):
                ax.step(x[keep], a[keep], where="post", c=colors.get(m, "k"), lw=1.4,
                        label=f"{m}{' (default)' if m == settings['default'] else ''}")
        if np.isfinite(side["x_med"]):
            ax.axvline(side["x_med"], ls="--", c="gray", lw=1, label="median xe of top examples")
        ax.axhline(side["d_max"], ls=":", c="k", lw=1, label="dataset max")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("cross-entropy (nats/token)", fontsize=8)
        ax.set_ylabel("activation", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[n:]:
        ax.set_visible(False)
    axes[0].legend(fontsize=6.5, loc="best")
    fig.suptitle(f"Dreams (seed 0 frontier, {settings['budget']:,} token-forwards, length {settings['length']}) vs the\n"
                 f"top {TOP_K} dataset examples of held-out parts A+B ({' + '.join(f'{n:,}' for n in settings['scan_n_tokens'])} "
                 "tokens; seeded methods start from A's)", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_png(fig, path)


def full_report(folders: list[str], settings: dict[str, Any], scans: list[Any], out: Path, figure: str | None,
                header: list[str], t0: float | None = None) -> None:
    names = settings["targets"]
    sides = [dataset_side(scans, i) for i in range(len(names))]
    runs, errors = load_runs(folders)
    runs = [r for r in runs if r["target"] in names and r["spec"] == json.loads(json.dumps(
        job_spec(Job(names.index(r["target"]), r["method"], r["seed"], r["frac"]), settings)))]  # not stale
    rows = metric_rows(runs, settings, sides)
    missing = sorted({(n, m) for n in names for m in settings["methods"]}
                     - (set(zip(rows["target"], rows["method"])) if len(rows) else set()))
    if missing:
        header = header + [f"# missing runs for {len(missing)} (target, method) pairs, e.g. {missing[:3]}"]
    lines, summary = report(rows, settings, sides, errors, header)
    out.mkdir(parents=True, exist_ok=True)
    if len(rows):
        rows.to_csv(out / "runs.csv", index=False)
    if figure and len(rows):
        png = draw(runs, settings, sides, Path(figure))
        lines += ["", f"figure: {png}"]
    d = settings["default"]
    rate = summary["methods"].get(d, {}).get("beats_dataset_rate", math.nan)
    summary["beats_dataset_rate"] = rate
    summary["settings"] = settings
    (out / "fluency.md").write_text("\n".join(lines) + "\n")
    _write_json(out / "summary.json", summary)
    print("\n".join(lines))
    print(f"\n(saved {out / 'fluency.md'}, {out / 'runs.csv'}, {out / 'summary.json'})")
    if t0 is not None:
        print(f"# {time.perf_counter() - t0:.0f} s in all")
    print(f"beats_dataset_rate: {rate:.2f}" if np.isfinite(rate) else f"beats_dataset_rate: nan (no runs of {d})")


def machine(threads: int) -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), {gpu}, torch {torch.__version__}, "
            f"{threads} thread(s)")


def header_lines(settings: dict[str, Any], scans: list[Any]) -> list[str]:
    cfg = settings["method_configs"]
    m = ", ".join(f"{n} = {cfg[n][0]}{cfg[n][1] or ''}" for n in settings["methods"])
    return [
        f"# Fluency benchmark: dreams vs the top {TOP_K} dataset examples ({_dt.date.today()}, {settings['machine']})",
        (f"# {len(settings['targets'])} targets, {settings['seeds']} seed(s), length {settings['length']}, "
         f"budget {settings['budget']:,} token-forwards per run; held-out split of the embedded corpora by document "
         "(corpus.split_documents): "
         + ", ".join(f"part {lab} {sc.meta.get('n_tokens', 0):,} tokens of {sc.meta.get('n_documents', 0)} documents "
                     f"({sc.meta.get('seconds', 0):.0f} s)" for lab, sc in zip(PARTS, scans))
         + f"; seeded methods start from part A's top {TOP_K}, every method is judged against the top {TOP_K} of A+B; "
         "domination is strict (higher activation, xe no higher)"),
        f"# methods: {m}; default of dream(): {DEFAULT_METHOD} (reported as {settings['default']})",
    ]


# ---------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 targets, 2 methods, 1 seed, a tiny budget and scan")
    ap.add_argument("--length", type=int, default=12, help="dream length in tokens (default 12)")
    ap.add_argument("--budget", type=int, default=None, help="token-forwards per run (default 40000; quick 3000)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 per target and method (default 2; quick 1)")
    ap.add_argument("--scan-tokens", type=int, default=None, help="corpus tokens scanned (default 200000; quick 20000)")
    ap.add_argument("--methods", default=None, help=f"comma-separated subset of {','.join(METHODS)} (default all; "
                    "quick: the default method and one other)")
    ap.add_argument("--curve", action=argparse.BooleanOptionalAction, default=None,
                    help="real runs at 1/4 and 1/2 of the budget for a budget-dependent default method (default: on, "
                    "off with --quick, where such a method's curve is cut from its full runs and marked inexact)")
    ap.add_argument("--scan-only", action="store_true", help="build and cache the scan, then exit")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default 1 for a shard, else torch's)")
    ap.add_argument("--out", default=None, help=f"output folder (default {DEFAULT_OUT}; quick {QUICK_OUT}; "
                    f"a shard: {DEFAULT_OUT}/shardIofN)")
    ap.add_argument("--shard", default=None, metavar="I/N", help="run only the jobs whose index %% N == I")
    ap.add_argument("--merge", nargs="+", default=None, metavar="FOLDER",
                    help="report the runs of these shard folders together (settings are read from them)")
    ap.add_argument("--figure", default=None, help=f"figure path (default {DEFAULT_FIGURE}; quick: OUT/figure.png; "
                    "'none': no figure)")
    args = ap.parse_args()

    if args.merge:
        merge(args)
        return
    shard_i, shard_n = (int(x) for x in args.shard.split("/")) if args.shard else (0, 1)
    if not 0 <= shard_i < shard_n:
        ap.error(f"--shard needs I/N with 0 <= I < N, got {args.shard!r}")
    q = args.quick
    threads = args.threads or (1 if args.shard else None)
    if threads:
        torch.set_num_threads(threads)
    out = Path(args.out or (QUICK_OUT if q else DEFAULT_OUT))
    if args.shard and not args.out:
        out = out / f"shard{shard_i}of{shard_n}"
    names_all = list(METHODS)
    if args.methods:
        methods = [m for m in args.methods.split(",") if m]
        bad = [m for m in methods if m not in METHODS]
        if bad:
            ap.error(f"unknown method(s) {bad}; METHODS has {names_all}")
    elif q:
        d = default_name(names_all)
        methods = [d, "adapt"]
    else:
        methods = names_all

    t0 = time.perf_counter()
    model = dl.load_model()
    targets = build_targets(q)
    settings: dict[str, Any] = {
        "quick": q, "length": args.length, "budget": args.budget or (3000 if q else 40_000),
        "seeds": args.seeds or (1 if q else 2), "scan_tokens": args.scan_tokens or (20_000 if q else 200_000),
        "methods": methods, "method_configs": {m: list(METHODS[m]) for m in methods},
        "default": default_name(methods), "curve": (not q) if args.curve is None else args.curve,
        "targets": [t.name for t in targets],
        "machine": machine(torch.get_num_threads()),
    }
    out.mkdir(parents=True, exist_ok=True)
    scans = []
    for part, label in enumerate(PARTS):
        t = time.perf_counter()
        sc = dl.scan(model, [t.scored for t in targets], split_documents(None, part, len(PARTS)),
                     tokens=settings["scan_tokens"], window=settings["length"], top_k=TOP_K, progress=args.scan_only)
        sc.save(out / f"scan_{label}")
        scans.append(sc)
        print(f"# scan of part {label}: {int(sc.meta.get('n_tokens', 0)):,} tokens of {sc.meta.get('n_documents')} documents "
              f"for {len(targets)} targets: {'from the cache' if sc.from_cache else f'{time.perf_counter() - t:.0f} s'} "
              f"(saved to {out / f'scan_{label}'})", flush=True)
    settings["scan_n_tokens"] = [int(sc.meta.get("n_tokens", 0)) for sc in scans]
    settings = with_earlier_methods(settings, out / "settings.json")
    _write_json(out / "settings.json", settings)
    if args.scan_only:
        for i, tg in enumerate(targets):
            s = dataset_side(scans, i)
            print(f"  {tg.name}: dataset max {s['d_max']:.3f}, median xe of the top {len(s['ex'][0])} {s['x_med']:.2f}, "
                  f"{s['from_a']} of them from part A")
        return

    jobs = make_jobs(settings, methods)
    mine = [j for k, j in enumerate(jobs) if k % shard_n == shard_i]
    names = settings["targets"]
    print(f"# {len(mine)} of {len(jobs)} runs in this {'shard' if args.shard else 'run'} ({out})", flush=True)
    for k, job in enumerate(mine):
        folder = out / "runs" / job.key(names)
        tag = f"[{k + 1}/{len(mine)}] {names[job.target]} {job.method} seed {job.seed}" + (
            f" at {job.frac:g} of the budget" if job.frac < 1 else "")
        if done(folder, job_spec(job, settings)):
            print(f"  {tag}: done before, skipped", flush=True)
            continue
        try:
            starts = example_spans(scans[0], job.target, settings["length"], positive=False)
            info = run_job(model, targets[job.target], job, settings, folder, starts)
        except KeyboardInterrupt:
            print(f"  {tag}: interrupted, not recorded; the finished runs are kept in {out / 'runs'}: run the same "
                  "command again to continue", file=sys.stderr, flush=True)
            sys.exit(130)
        except Exception as e:  # one failed run must not stop the others
            msg = f"{type(e).__name__}: {e}"
            print(f"  {tag}: FAILED {msg}\n" + "".join(traceback.format_exc(limit=-3)), file=sys.stderr, flush=True)
            folder.mkdir(parents=True, exist_ok=True)
            _write_json(folder / "error.json", {"target": names[job.target], "method": job.method, "seed": job.seed,
                                                "frac": job.frac, "error": msg[:500]})
            continue
        h = pd.read_parquet(folder / "scored.parquet")
        s = dataset_side(scans, job.target)
        best = best_at(h["activation"].to_numpy(float), h["xe"].to_numpy(float), s["x_med"])
        extra = f", pre-activation check {info['pre_check']:.1e}" if np.isfinite(info["pre_check"]) else ""
        print(f"  {tag}: best {h['activation'].max():.3f}, at xe <= {s['x_med']:.2f}: {fmt(best)} "
              f"(dataset max {s['d_max']:.3f}); {info['token_forwards']} token-forwards, {info['iterations']} iterations, "
              f"{info['seconds']:.0f} s{extra}{'' if info['stopped'] == 'budget' else ', stopped: ' + info['stopped']}"
              f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.shard:
        print(f"# shard {shard_i}/{shard_n} done in {time.perf_counter() - t0:.0f} s; merge the shards' folders with --merge")
        return
    figure = None if args.figure == "none" else (args.figure or (str(out / "figure.png") if q else DEFAULT_FIGURE))
    full_report([str(out)], settings, scans, out, figure, header_lines(settings, scans), t0)


def merge(args: argparse.Namespace) -> None:
    from dreamlens.analysis.scan import ScanResult

    t0 = time.perf_counter()
    folders = list(args.merge)
    all_settings = [json.loads(Path(f, "settings.json").read_text()) for f in folders]
    settings = all_settings[0]
    keys = ("length", "budget", "seeds", "scan_tokens", "targets", "method_configs", "curve")
    for f, s in zip(folders[1:], all_settings[1:]):
        diff = [k for k in keys if s.get(k) != settings.get(k)]
        if diff:
            raise SystemExit(f"{f} was run with other settings than {folders[0]}: {diff}")
    methods = [m for m in METHODS if any(m in s["methods"] for s in all_settings)]
    settings["methods"] = methods
    settings["default"] = default_name(methods)
    scans = [ScanResult.load(Path(folders[0], f"scan_{lab}")) for lab in PARTS]
    out = Path(args.out or (QUICK_OUT if settings["quick"] else DEFAULT_OUT))
    default_figure = str(out / "figure.png") if settings["quick"] else DEFAULT_FIGURE
    figure = None if args.figure == "none" else (args.figure or default_figure)
    header = header_lines(settings, scans) + [f"# merged from {', '.join(folders)}"]
    full_report(folders, settings, scans, out, figure, header, t0)


if __name__ == "__main__":
    main()
