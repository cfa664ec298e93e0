"""EPO quality on the embedded model: for a fixed list of neurons across layers, the best activation
reached under cross-entropy thresholds (4, 6, 8 nats) with a fixed budget, next to the best of the
initial random population.

    python benchmarks/epo_quality.py [--quick]

Last line: `mean_gain_xe6: X`, the mean over neurons of (best activation at xe <= 6) minus (best
activation of the initial population), in activation units.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import dreamlens as dl

# Fixed before any run: two neurons in each of four layers, indices spread over d_mlp = 1536.
NEURONS = [
    "blocks.3.mlp.hook_post[100]",
    "blocks.3.mlp.hook_post[900]",
    "blocks.9.mlp.hook_post[250]",
    "blocks.9.mlp.hook_post[1300]",
    "blocks.15.mlp.hook_post[400]",
    "blocks.15.mlp.hook_post[1100]",
    "blocks.24.mlp.hook_post[600]",
    "blocks.24.mlp.hook_post[1400]",
]
THRESHOLDS = (4.0, 6.0, 8.0)


def best_under(result: dl.DreamResult, max_xe: float) -> float:
    ok = result.xe <= max_xe
    return float(result.activation[ok].max()) if ok.any() else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="2 neurons, 3 iterations (under a minute)")
    ap.add_argument("--iters", type=int, default=None)
    args = ap.parse_args()
    neurons = NEURONS[::4] if args.quick else NEURONS
    iters = args.iters or (3 if args.quick else 40)
    cfg = dl.EPOConfig(length=8, population=8, children=16, topk=128, iters=iters, restart_every=20, seed=0)
    model = dl.load_model()
    print(f"EPO, length {cfg.length}, population {cfg.population}, children {cfg.children}, topk {cfg.topk}, "
          f"{iters} iterations per neuron")
    head = "".join(f"{f'xe<={t:g}':>9}" for t in THRESHOLDS)
    print(f"{'objective':<30}{'initial':>9}{head}{'best xe':>9}{'s':>6}")
    gains = []
    for name in neurons:
        t = time.perf_counter()
        r = dl.epo(model, name, cfg, progress=False)
        initial = float(r.activation[r.iteration == 0].max())
        cols = [best_under(r, x) for x in THRESHOLDS]
        best_xe = float(r.xe[np.argmax(r.activation)])
        print(f"{name:<30}{initial:>9.3f}" + "".join(f"{c:>9.3f}" for c in cols) + f"{best_xe:>9.2f}{time.perf_counter() - t:>6.0f}")
        gains.append(cols[1] - initial)
    print(f"mean_gain_xe6: {np.nanmean(gains):.3f}")


if __name__ == "__main__":
    main()
