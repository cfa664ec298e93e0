"""The cheap proxy on which the default's ingredients are chosen before the full benchmark: seeded dreams
(starts from part A's top examples) of tuning targets disjoint from `benchmarks/fluency.py`'s, at a
quarter of its budget, one seed, each variant side by side on the same scan.

    python benchmarks/tuning.py                 # every variant, 4 tuning targets, 10,000 token-forwards
    python benchmarks/tuning.py --quick         # 1 target, 2 variants, a tiny budget and scan

Per variant (means over targets): beats (activation above the scan's max at xe <= the median xe of its
top 32 examples), strict dominated share of those 32, and the best activation at xe <= median xe as a
share of the dataset max. The last line is the best variant's mean normalized best.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import dreamlens as dl
from dreamlens.analysis import metrics
from dreamlens.analysis.scan import example_spans
from dreamlens.corpus import split_documents

TARGETS = ["blocks.3.mlp.hook_post[500]", "blocks.13.mlp.hook_post[900]", "blocks.22.mlp.hook_post[1000]"]
SAE_LATENT = 1387  # of the embedded SAE, dreamed and judged on its pre-activation
# Each variant spells out ADAPT's move shares (ADAPTConfig's defaults are what this proxy chose).
OFF = {"lm_share": 0.0, "shift_share": 0.0}
BOTH = {"lm_share": 0.25, "shift_share": 0.25}
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "adapt": ("adapt", OFF),  # the gradient's swaps only
    "adapt_lm": ("adapt", {**OFF, "lm_share": 0.25}),
    "adapt_shift": ("adapt", {**OFF, "shift_share": 0.25}),
    "adapt_lm_shift": ("adapt", BOTH),  # chosen: ADAPTConfig's defaults
    # A length range around length 12: the insertions and deletions grow and shrink the prompt instead of
    # shifting it (optim.moves.resizes).
    "adapt_lm_shift_len": ("adapt", {**BOTH, "min_length": 8, "max_length": 16}),
    "adapt_lm_shift_len10": ("adapt", {**BOTH, "min_length": 10, "max_length": 14}),
    "adapt_lm_shift_len11": ("adapt", {**BOTH, "min_length": 11, "max_length": 13}),
    "adapt_lm_shift_grow": ("adapt", {**BOTH, "max_length": 16}),  # insertions grow it, deletions stop at 12
    "adapt_lm_shift_shrink": ("adapt", {**BOTH, "min_length": 8}),  # deletions shrink it, insertions stop at 12
    "adapt_lm_shift_hi": ("adapt", {**BOTH, "lam_min": 0.1, "lam_max": 3.0}),
    "adapt_full": ("adapt", {**BOTH, "lineage": True, "restart_patience": 8}),
    "adapt_full_b8": ("adapt", {**BOTH, "lineage": True, "restart_patience": 8, "beams": 8, "children": 16}),
    "epo_lm": ("epo", {"lm_share": 0.25}),
    # Without examples (the goal for a method without the dataset): `self_scan` (ADAPTConfig) spends that share of the
    # budget on text sampled from the model and scanned for the target; its top windows are the starts.
    "scratch_adapt": ("adapt", {"examples": False, "self_scan": 0}),  # from ADAPT's beam search
    "scratch_self15": ("adapt", {"examples": False, "self_scan": 0.15}),
    "scratch_self35": ("adapt", {"examples": False, "self_scan": 0.35}),
    "scratch_self50": ("adapt", {"examples": False, "self_scan": 0.5}),
    # 128 prompts of 12 tokens sampled from the model (no scan): fluent starts the members cover
    "scratch_sampled": ("adapt", {"examples": False, "sampled": 128}),
    # the length range that paid with examples (12..16), without them
    "scratch_grow": ("adapt", {"examples": False, "self_scan": 0, "max_length": 16}),
    "scratch_self35_grow": ("adapt", {"examples": False, "self_scan": 0.35, "max_length": 16}),
}


def sampled_starts(model: Any, n: int, length: int, seed: int) -> tuple[list[Any], int]:
    """n prompts of `length` tokens sampled from the model after the start token (its KV cache): the
    token-forwards of sampling (their scoring as starts is charged by the run)."""
    torch.manual_seed(seed)
    bos = model.tokenizer.bos_token_id
    ids = model.generate(torch.full((n, 1), bos, dtype=torch.long), max_new_tokens=length, stop_at_eos=False,
                         temperature=1.0, use_past_kv_cache=True, verbose=False, return_type="tokens")
    return [(r, tuple(int(t) for t in row[1:])) for r, row in enumerate(ids)], n * length


def judge(r: Any, scan: Any, i: int) -> dict[str, float]:
    top = scan.top(i)
    ex_a, ex_x = top["activation"].to_numpy(float), top["xe"].to_numpy(float)
    d_max, x_med = metrics.dataset_max(scan, i), metrics.median_top_xe(scan, i)
    a, x = np.asarray(r.activation, float), np.asarray(r.xe, float)
    ok = np.isfinite(a) & np.isfinite(x)
    a, x = a[ok], x[ok]
    fluent = a[x <= x_med]
    best = float(fluent.max()) if len(fluent) else 0.0
    dom = np.mean([bool(np.any((a > ea) & (x <= ex))) for ea, ex in zip(ex_a, ex_x)])
    start = np.asarray(r.iteration)[ok] == 0
    s_fluent = a[start & (x <= x_med)]
    return {"beats": float(best > d_max), "dominated": float(dom), "norm_best": best / d_max,
            "norm_start": (float(s_fluent.max()) if len(s_fluent) else 0.0) / d_max}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--budget", type=int, default=None, help="token-forwards per run (default 10000; quick 1500)")
    ap.add_argument("--variants", default=None, help=f"comma-separated subset of {','.join(VARIANTS)}")
    ap.add_argument("--out", default=None, help="where the log goes (default benchmarks/results/tuning.json)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    q = args.quick
    budget = args.budget or (1500 if q else 10_000)
    names = args.variants.split(",") if args.variants else (["adapt", "adapt_lm_shift"] if q else list(VARIANTS))
    model = dl.load_model()
    from dreamlens.sae import load_sae

    targets: list[Any] = [dl.objective(t) for t in (TARGETS[:1] if q else TARGETS)]
    if not q:
        targets.append(dl.SAELatent(load_sae(), SAE_LATENT, pre_activation=True, source="embedded"))
    scan = dl.scan(model, targets, split_documents(None, 0), tokens=20_000 if q else 100_000, window=12, top_k=32,
                   progress=False)
    rows: dict[str, list[dict[str, float]]] = {v: [] for v in names}
    for i, t in enumerate(targets):
        starts = example_spans(scan, i, 12, positive=False)
        for v in names:
            method, options = VARIANTS[v]
            options = dict(options)
            seeded = options.pop("examples", True)
            t0 = time.perf_counter()
            ex, spent = (starts, 0) if seeded else (None, 0)
            if options.get("sampled"):
                ex, spent = sampled_starts(model, options.pop("sampled"), 12, seed=0)
            r = dl.dream(model, t, method, examples=ex or None, length=12, seed=0, max_token_forwards=budget - spent,
                         iters=100_000, progress=False, **options)
            m = judge(r, scan, i)
            rows[v].append(m)
            print(f"{t} {v}: " + ", ".join(f"{k} {x:.2f}" for k, x in m.items())
                  + f" ({r.token_forwards} token-forwards, {time.perf_counter() - t0:.0f} s)", flush=True)
    means = {v: {k: float(np.mean([m[k] for m in ms])) for k in ms[0]} for v, ms in rows.items()}
    for v, m in means.items():
        print(f"mean {v}: " + ", ".join(f"{k} {x:.3f}" for k, x in m.items()))
    out = Path(args.out or ("benchmarks/results/tuning_quick.json" if q else "benchmarks/results/tuning.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    log = json.loads(out.read_text()) if out.is_file() else []
    log.append({"date": time.strftime("%Y-%m-%d"), "budget": budget, "targets": [str(t) for t in targets],
                "per_target": rows, "means": means})
    out.write_text(json.dumps(log, indent=1))
    best = max(means, key=lambda v: means[v]["norm_best"])
    value = means[best]["norm_best"]
    print(f"best variant: {best}")
    print(f"tuning_best_norm: {value:.3f}" if math.isfinite(value) else "tuning_best_norm: nan")


if __name__ == "__main__":
    main()
