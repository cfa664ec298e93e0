"""The optimizers ranked at equal compute on the embedded model: ADAPT (the default of `dream()`), EPO
as published (EPOConfig's defaults, only the iterations cut by the budget) and GCG (GCGConfig's).

    python benchmarks/optimizers.py [--quick] [--budget N] [--seeds N] [--out FOLDER]
    python benchmarks/optimizers.py --shard 0/2 --out A & python benchmarks/optimizers.py --shard 1/2 --out B
    python benchmarks/optimizers.py --merge A B        # the two halves' tables as one run's

On a small CPU two shards with one thread each do more per second than one run with two threads. Every
shard scans all targets (the second loads the first's scan from the cache), so `--merge` reports
percentiles against the same scan.

Every run gets the same budget in token-forwards (a gradient pass counts 3 per token) and the same
prompt length. The budget is a hard cap: a run stops before an iteration that would cross it (the
next iteration is predicted to cost what the last one did), with `max_token_forwards` as the safety
net; the spent compute is printed. The default budget, 4000 token-forwards with length 8, is about ten
EPO iterations at reduced sizes (4 members x 8 children), a few at the paper's sizes. For each target, a scan of the embedded corpora gives the dataset
statistics: the median cross-entropy of its top examples (windows as long as the dreams, scored like
dreams), the dataset max and the activation distribution. A run's score is its best activation among
prompts whose xe is at most that median; a target's score for a method is the median over seeds (a run
with no prompt that fluent scores nothing). Then, per pair of methods, on how many targets each wins,
and the mean normalized activation (score / dataset max; nothing counts 0).

The targets are fixed here, before any run: MLP neurons at early, middle and late layers (indices
spread over d_mlp = 1536) and, when the embedded SAE exists, four of its latents (pre-activations).
ADAPT's defaults were tuned on the separate `--dev` targets, never on these.
"""

from __future__ import annotations

import argparse
import ast
import datetime as _dt
import math
import os
import platform
import time
from typing import Any

import numpy as np
import pandas as pd
import torch

import dreamlens as dl
from dreamlens import metrics
from dreamlens.optim.core import DreamError
from dreamlens.optim.dream import DEFAULT_METHOD

NEURONS = [
    "blocks.2.mlp.hook_post[311]",
    "blocks.2.mlp.hook_post[1207]",
    "blocks.4.mlp.hook_post[58]",
    "blocks.4.mlp.hook_post[842]",
    "blocks.12.mlp.hook_post[173]",
    "blocks.12.mlp.hook_post[1450]",
    "blocks.15.mlp.hook_post[666]",
    "blocks.15.mlp.hook_post[1029]",
    "blocks.24.mlp.hook_post[95]",
    "blocks.24.mlp.hook_post[777]",
    "blocks.27.mlp.hook_post[400]",
    "blocks.27.mlp.hook_post[1333]",
]
# Tuning targets for ADAPT's defaults: disjoint from the benchmark's.
DEV_NEURONS = [
    "blocks.3.mlp.hook_post[500]",
    "blocks.8.mlp.hook_post[1100]",
    "blocks.13.mlp.hook_post[900]",
    "blocks.25.mlp.hook_post[200]",
]
SAE_LATENTS = 4
METHODS = ("adapt", "epo", "gcg")


def targets(model: Any, dev: bool, quick: bool) -> list[Any]:
    if dev:
        return list(DEV_NEURONS)
    if quick:
        return [NEURONS[0], NEURONS[-2]]
    out: list[Any] = list(NEURONS)
    try:
        from dreamlens.sae import EMBEDDED_SAE_LATENTS, load_sae

        sae = load_sae()
    except Exception as e:  # not built yet: the neurons alone
        print(f"(no embedded SAE: {type(e).__name__}: {str(e)[:100]})")
        return out
    picks = sorted(EMBEDDED_SAE_LATENTS)[:SAE_LATENTS] or [int(i) for i in np.linspace(0, sae.cfg.d_sae - 1, SAE_LATENTS + 2)[1:-1]]
    out += [dl.SAELatent(sae, i, pre_activation=True, source="embedded") for i in picks]
    return out


def method_config(method: str, length: int, budget: int, seed: int, overrides: dict[str, dict[str, Any]]) -> Any:
    from dreamlens.optim.dream import make_config

    return make_config(method, None, length=length, max_token_forwards=budget, iters=10**6, seed=seed,
                       **overrides.get(method, {}))


class HardCap:
    """A callback that stops a run before an iteration that would cross the budget. The first
    iteration's cost is its token-forwards minus the start's (`start_cost`, None: unknown, then the
    first iteration always runs)."""

    def __init__(self, budget: int, start_cost: int | None):
        self.budget, self.start_cost, self.last = budget, start_cost, None

    def __call__(self, info: Any) -> bool:
        spent = info.token_forwards
        if self.last is None:
            step = spent - self.start_cost if self.start_cost is not None else 0
        else:
            step = spent - self.last
        self.last = spent
        return spent + step > self.budget


def start_cost(method: str, cfg: Any, length: int) -> int | None:
    """Token-forwards before the first iteration: EPO and GCG score their random members (plus the
    start token); ADAPT's beam search varies, so its first iteration is never predicted."""
    return {"epo": getattr(cfg, "population", 1) * (length + 1), "gcg": length + 1}.get(method)


def best_fluent(r: dl.DreamResult, max_xe: float) -> float:
    ok = r.xe <= max_xe
    return float(r.activation[ok].max()) if ok.any() else -math.inf


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """`adapt:children=8,beams=4` -> {"adapt": {"children": 8, "beams": 4}} (for tuning on --dev)."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        method, _, kvs = item.partition(":")
        for kv in filter(None, kvs.split(",")):
            k, _, v = kv.partition("=")
            out.setdefault(method, {})[k] = ast.literal_eval(v)
    return out


def fmt(x: float, spec: str = ".3f") -> str:
    return "—" if not np.isfinite(x) else format(x, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 targets, 1 seed, a tiny budget and scan (about a minute)")
    ap.add_argument("--dev", action="store_true", help="the tuning targets instead of the benchmark's")
    ap.add_argument("--budget", type=int, default=None, help="token-forwards per run (default 4000; quick 1200)")
    ap.add_argument("--length", type=int, default=None, help="prompt length (default 8; quick 6)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per target and method (default 3; quick 1)")
    ap.add_argument("--scan-tokens", type=int, default=None, help="corpus tokens scanned (default 40000; quick 4000)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--set", action="append", default=[], metavar="METHOD:K=V,...", help="config overrides, e.g. adapt:children=8")
    ap.add_argument("--threads", default="auto", help="torch threads, or 'auto': 1 while the machine is busy "
                    "(a second thread only spins then), else torch's default; results do not depend on it")
    ap.add_argument("--out", default=None, help="folder for the per-run table (runs.csv) and the summary")
    ap.add_argument("--shard", default=None, metavar="I/N", help="run only targets I, I+N, I+2N, ... (0-based)")
    ap.add_argument("--merge", nargs="+", default=None, metavar="FOLDER",
                    help="print the report of shards' runs.csv (same other options as the shards)")
    args = ap.parse_args()
    shard_i, shard_n = (int(x) for x in args.shard.split("/")) if args.shard else (0, 1)
    if not 0 <= shard_i < shard_n:
        ap.error(f"--shard needs I/N with 0 <= I < N, got {args.shard!r}")
    q = args.quick
    budget = args.budget or (1200 if q else 4000)
    length = args.length or (6 if q else 8)
    seeds = args.seeds or (1 if q else 3)
    scan_tokens = args.scan_tokens or (4000 if q else 40_000)
    methods = [m for m in args.methods.split(",") if m]
    overrides = parse_overrides(args.set)
    default_threads = torch.get_num_threads()

    def set_threads() -> None:
        if args.threads != "auto":
            torch.set_num_threads(int(args.threads))
        else:
            busy = os.getloadavg()[0] > 0.75 * (os.cpu_count() or 1) + 1
            torch.set_num_threads(1 if busy else default_threads)

    set_threads()

    t_start = time.perf_counter()
    model = dl.load_model()
    objs = targets(model, args.dev, q)
    names = [str(o) for o in objs]
    scan = dl.scan(model, objs, tokens=scan_tokens, window=length, top_k=32, progress=False)
    stats = {n: (metrics.median_top_xe(scan, i), metrics.dataset_max(scan, i)) for i, n in enumerate(names)}
    print(f"# Optimizers at equal compute: {len(objs)} targets, {seeds} seed(s), length {length}, "
          f"budget {budget} token-forwards per run; scan of {scan.meta.get('n_tokens')} tokens "
          f"(windows of {length}), {scan.meta.get('seconds', 0):.0f} s{' (cached)' if scan.from_cache else ''}")
    print(f"# methods: {', '.join(methods)}; default of dream(): {DEFAULT_METHOD}; overrides: {overrides or 'none'}")
    if args.merge:
        runs = pd.concat([pd.read_csv(os.path.join(f, "runs.csv")) for f in args.merge], ignore_index=True)
        missing = sorted(set(names) - set(runs["target"]))
        if missing:
            raise SystemExit(f"the shards in {args.merge} have no runs for {missing}: run the missing shard first")
        report(runs, names, sorted(set(runs["method"]), key=methods.index), stats, scan)
        print(f"# merged from {', '.join(args.merge)}; {_dt.date.today()}; {machine(args.threads)}")
        return

    rows = []
    for i, (o, name) in enumerate(zip(objs, names)):
        if i % shard_n != shard_i:
            continue
        x_med, d_max = stats[name]
        for method in methods:
            for seed in range(seeds):
                cfg = method_config(method, length, budget, seed, overrides)
                set_threads()
                t = time.perf_counter()
                try:
                    r = dl.dream(model, o, method, config=cfg, progress=False,
                                 callback=HardCap(budget, start_cost(method, cfg, length)))
                except DreamError as e:
                    print(f"  {name} {method}: {e}")
                    continue
                a = best_fluent(r, x_med)
                rows.append({
                    "target": name, "method": method, "seed": seed, "best": a, "ratio": a / d_max if d_max > 0 else math.nan,
                    "best_any": float(r.activation.max()), "min_xe": float(r.xe.min()), "x_med": x_med, "d_max": d_max,
                    "token_forwards": r.token_forwards, "iterations": r.iterations, "seconds": time.perf_counter() - t,
                    "found_at": int(r.best(x_med).iteration) if np.isfinite(a) else -1,
                    "text": r.best(x_med).text if np.isfinite(a) else "",
                })
        done = [r for r in rows if r["target"] == name]
        print(f"  [{i + 1}/{len(objs)}] {name}: " + ", ".join(
            f"{m} {fmt(np.median([r['best'] for r in done if r['method'] == m]) if any(r['method'] == m for r in done) else math.nan)}"
            for m in methods) + f"  ({time.perf_counter() - t_start:.0f} s)", flush=True)
    runs = pd.DataFrame(rows)
    report(runs, names[shard_i::shard_n], methods, stats, scan)
    print(f"# {time.perf_counter() - t_start:.0f} s in all; {_dt.date.today()}; {machine(args.threads)}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        runs.to_csv(os.path.join(args.out, "runs.csv"), index=False)


def report(runs: pd.DataFrame, names: list[str], methods: list[str], stats: dict, scan: Any) -> None:
    """Tables of `names` (a subset of the scan's objectives, in any order) and the summary."""
    index = {str(o): i for i, o in enumerate(scan.objectives)}
    score: dict[tuple[str, str], float] = {}
    for (name, method), g in runs.groupby(["target", "method"]):
        score[name, method] = float(np.median(g["best"].to_numpy()))  # -inf when most seeds found nothing
    print()
    print("| target | median xe of top examples | dataset max | " + " | ".join(
        f"{m}: best at xe <= median / ratio / percentile" for m in methods) + " |")
    print("|---|---:|---:|" + "---:|" * len(methods))
    for name in names:
        x_med, d_max = stats[name]
        cells = []
        for m in methods:
            s = score.get((name, m), math.nan)
            pct = metrics.dataset_percentile(s, scan, index[name]) if np.isfinite(s) else math.nan
            cells.append(f"{fmt(s)} / {fmt(s / d_max if d_max > 0 else math.nan, '.2f')} / {fmt(pct, '.2f')}")
        print(f"| `{name}` | {x_med:.2f} | {d_max:.3f} | " + " | ".join(cells) + " |")
    print()
    print("| method | mean normalized activation | mean token-forwards | mean iterations | mean seconds per run |")
    print("|---|---:|---:|---:|---:|")
    for m in methods:
        g = runs[runs["method"] == m]
        ratios = [max(0.0, score.get((n, m), -math.inf) / stats[n][1]) if np.isfinite(score.get((n, m), -math.inf)) and stats[n][1] > 0 else 0.0 for n in names]
        print(f"| {m} | {np.mean(ratios):.3f} | {g['token_forwards'].mean():.0f} | {g['iterations'].mean():.1f} | {g['seconds'].mean():.1f} |")
    print()
    print("| pair | wins | losses | ties |")
    print("|---|---:|---:|---:|")
    for a in range(len(methods)):
        for b in range(a + 1, len(methods)):
            ma, mb = methods[a], methods[b]
            w = sum(score.get((n, ma), -math.inf) > score.get((n, mb), -math.inf) for n in names)
            lo = sum(score.get((n, ma), -math.inf) < score.get((n, mb), -math.inf) for n in names)
            print(f"| {ma} vs {mb} | {w} | {lo} | {len(names) - w - lo} |")
    if DEFAULT_METHOD in methods and "epo" in methods and DEFAULT_METHOD != "epo":
        w = sum(score.get((n, DEFAULT_METHOD), -math.inf) > score.get((n, "epo"), -math.inf) for n in names)
        print(f"\n{DEFAULT_METHOD}_beats_epo: {w}/{len(names)} = {w / len(names):.0%} (goal: at least 75%)")


def machine(threads: str) -> str:
    n = os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{n}-core CPU ({platform.processor() or platform.machine()}), {gpu}, torch {torch.__version__}, threads: {threads}"


if __name__ == "__main__":
    main()
