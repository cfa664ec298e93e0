"""Do modes recover both halves of a polysemantic feature? Synthetic features with a known answer: the
max of two standardized latents of the embedded SAE whose top examples are unrelated (PAIRS, fixed here
before any run). With modes=2, a pair is recovered when each latent is the larger term in the best
prompt (at the fluency limit) of at least one mode.

    python benchmarks/modes.py --quick --threads 1     # 2 pairs, a tiny budget and scan
    python benchmarks/modes.py --threads 2             # 6 pairs + the cost of diversity; ~7 min here once scans are cached

Standardized: each latent's pre-activation divided by its maximum over a scan of the embedded corpora
(so both are 1.0 at their top example); the pre-activation, because a TopK latent is 0 (with zero
gradient) where it does not fire. Each mode is a `dl.dream(..., modes=2, examples=scan)` of the default
method at the budget of one ordinary dream (`--budget` token-forwards per mode; a later mode's budget
leaves room for what separates it: the attribution, the top examples' patterns). `examples=scan`: the
synthetic feature's own top examples (a second scan, of the pair objectives); the later mode starts from
the one least like mode 1 (`--no-examples`: bans only, random starts). Also: for one real
(non-synthetic) latent, modes=3, the activation of modes 2 and 3 relative to mode 1 at the same fluency
limit (what diversity costs).

Prints per pair the larger term of each mode's best prompt and whether both were recovered; last line
`mode_recovery: X` (share of pairs with both recovered).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

import dreamlens as dl
from dreamlens.io import atomic_write_text
from dreamlens.modes.settings import ModeSettings
from dreamlens.optim.methods import DEFAULT_METHOD
from dreamlens.sae import EMBEDDED_SAE_LATENTS

PAIRS = [(2261, 2448), (221, 4004), (1387, 3272), (2261, 221), (2448, 1387), (4004, 3272)]
SINGLE = 2261  # the real feature whose cost of diversity is measured
LENGTH = 12
LIMIT = 6.0  # nats/token: the fluency limit modes are ranked and judged at
TOP_K = 32  # top examples per objective (where later modes may start)
OUT = "benchmarks/results/modes"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 pairs, no cost-of-diversity run, a tiny budget and scan")
    ap.add_argument("--budget", type=int, default=None, help="token-forwards per mode (default 12000; quick 5000)")
    ap.add_argument("--scan-tokens", type=int, default=None, help="corpus tokens scanned (default 100000; quick 10000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-examples", action="store_true", help="later modes start at random (bans only), not from the dataset")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help=f"where the modes and summary.json go (default {OUT}, quick {OUT}_quick)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    q = args.quick
    budget = args.budget or (5000 if q else 12000)
    scan_tokens = args.scan_tokens or (10_000 if q else 100_000)
    pairs = PAIRS[:2] if q else PAIRS
    out = Path(args.out or (OUT + "_quick" if q else OUT))
    out.mkdir(parents=True, exist_ok=True)
    missing = sorted({i for p in PAIRS for i in p} - set(EMBEDDED_SAE_LATENTS))
    if missing:
        print(f"(note: latents {missing} are not in EMBEDDED_SAE_LATENTS)")

    t0 = time.perf_counter()
    model = dl.load_model()
    latents = sorted({i for p in pairs for i in p} | ({SINGLE} if not q else set()))
    specs = [f"sae_pre:embedded[{i}]" for i in latents]
    scan = dl.scan(model, specs, None, tokens=scan_tokens, window=LENGTH, top_k=TOP_K, progress=False)
    stats = scan.stats.set_index("objective")
    top = {i: float(stats.loc[str(dl.objective(s)), "max"]) for i, s in zip(latents, specs)}
    print(f"# {scan.meta.get('n_tokens', 0):,}-token scan of {len(latents)} latents' pre-activations "
          f"({time.perf_counter() - t0:.0f} s); dataset max: " + ", ".join(f"{i}: {top[i]:.2f}" for i in latents), flush=True)
    print(f"# method {DEFAULT_METHOD}, length {LENGTH}, {budget:,} token-forwards per mode, seed {args.seed}, "
          f"fluency limit xe <= {LIMIT}; {machine()}", flush=True)

    settings = ModeSettings(limit=LIMIT)
    pair_specs = [f"max({1 / top[a]:.6g}*sae_pre:embedded[{a}], {1 / top[b]:.6g}*sae_pre:embedded[{b}])" for a, b in pairs]
    pair_scan = None
    if not args.no_examples:
        t = time.perf_counter()
        pair_scan = dl.scan(model, pair_specs, None, tokens=scan_tokens, window=LENGTH, top_k=TOP_K, progress=False)
        print(f"# the pair objectives' scan: {time.perf_counter() - t:.0f} s", flush=True)
    rows = []
    for (a, b), spec in zip(pairs, pair_specs):
        obj = dl.objective(spec)
        t = time.perf_counter()
        modes = dl.dream(model, obj, modes=2, mode_settings=settings, length=LENGTH, max_token_forwards=budget,
                         seed=args.seed, progress=False, examples=pair_scan)
        larger, detail = [], []
        for i in range(len(modes)):
            best = modes.best(i)
            if best is None:
                detail.append(f"mode {i + 1}: none at xe <= {LIMIT}")
                continue
            ids = torch.tensor([[0, *map(int, best["ids"])]])
            with torch.no_grad():
                vals, _ = dl.run_objectives(model, list(obj.parts), ids)
            k = int(vals[:, 0].argmax())
            larger.append((a, b)[k])
            detail.append(f"mode {i + 1} (found {modes.found[i]}, start {modes.starts[i]}; "
                          f"{float(best['activation']):.2f} at xe {float(best['xe']):.2f}): "
                          f"{a} {float(vals[0, 0]):.2f} / {b} {float(vals[1, 0]):.2f} -> {(a, b)[k]}  {best['text']!r}")
        recovered = {a, b} <= set(larger)
        rows.append({"pair": [a, b], "objective": spec, "larger": larger, "recovered": recovered, "starts": modes.starts,
                     "seconds": time.perf_counter() - t, "token_forwards": [int(r.token_forwards) for r in modes]})
        modes.save(out / f"pair_{a}_{b}", overwrite=True)
        print(f"pair ({a}, {b}): {'both recovered' if recovered else 'NOT both'} ({time.perf_counter() - t:.0f} s)")
        for d in detail:
            print(f"    {d}", flush=True)

    cost = None
    if not q:
        t = time.perf_counter()
        single = dl.dream(model, f"sae_pre:embedded[{SINGLE}]", modes=3, mode_settings=settings, length=LENGTH,
                          max_token_forwards=budget, seed=args.seed, progress=False,
                          examples=None if args.no_examples else scan)
        single.save(out / f"single_{SINGLE}", overwrite=True)
        by_found = {f: i for i, f in enumerate(single.found)}
        best = [single.best(by_found[f]) for f in (1, 2, 3)]
        acts = [float("nan") if x is None else float(x["activation"]) for x in best]
        cost = {"latent": SINGLE, "activation_at_limit": acts, "relative": [acts[1] / acts[0], acts[2] / acts[0]]}
        print(f"cost of diversity, sae_pre:embedded[{SINGLE}] at xe <= {LIMIT} (modes in the order found): "
              f"{acts[0]:.2f}, {acts[1]:.2f}, {acts[2]:.2f} -> mode 2 / mode 1 {acts[1] / acts[0]:.2f}, "
              f"mode 3 / mode 1 {acts[2] / acts[0]:.2f} ({time.perf_counter() - t:.0f} s)", flush=True)

    rate = sum(r["recovered"] for r in rows) / len(rows)
    summary = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "method": DEFAULT_METHOD, "length": LENGTH,
               "budget_per_mode": budget, "scan_tokens": int(scan.meta.get("n_tokens", 0)), "limit": LIMIT,
               "examples": not args.no_examples, "top_k": TOP_K,
               "seed": args.seed, "pairs": rows, "cost_of_diversity": cost, "mode_recovery": rate,
               "seconds": time.perf_counter() - t0}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    print(f"# {time.perf_counter() - t0:.0f} s in all; summary in {out / 'summary.json'}")
    print(f"mode_recovery: {rate:.2f}")


def machine() -> str:
    return (f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
            f"{torch.get_num_threads()} thread(s)")


if __name__ == "__main__":
    main()
