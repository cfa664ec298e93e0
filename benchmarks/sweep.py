"""A sweep on three engines: the local engine in this process on one torch thread, then Ray with 1 and with
2 one-thread workers (one local Ray cluster of 2 CPUs on 127.0.0.1, started once and timed apart). Each
engine runs the same sweep into a fresh folder; its wall time includes loading the model (each Ray worker
loads its own) and every chunk's scan (split across the workers and merged on Ray). Also checks that
the three give the same results (dreams exactly, scan statistics within float rounding).

Full run: 64 latents of the embedded SAE (`sae:embedded[0:64]`) on the embedded model, a small budget.
--quick: 8 MLP neurons of the tiny random model (`dreamlens.testing:tiny_model`), the same code path.

Headlines: ray_overhead = Ray with 1 worker / local (the cost of the engine), and last line
ray_speedup_2 = local / Ray with 2 workers.

    python benchmarks/sweep.py [--quick] [--latents N] [--budget TOKEN_FORWARDS] [--tokens N] [--chunk-size N]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import torch


def same(a: Any, b: Any) -> bool:
    """Same rows and values: frontiers exactly, summaries (less timing) within float rounding."""
    try:
        pd.testing.assert_frame_equal(a.summary.drop(columns=["seconds"]), b.summary.drop(columns=["seconds"]),
                                      check_exact=False, rtol=1e-6)
        pd.testing.assert_frame_equal(a.frontiers, b.frontiers, check_exact=True)
    except AssertionError:
        return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the tiny model, 8 objectives (under a minute)")
    ap.add_argument("--latents", type=int, default=None, help="objectives (default 64, quick 8)")
    ap.add_argument("--budget", type=int, default=None, help="token-forwards per objective (default 1000, quick 400)")
    ap.add_argument("--tokens", type=int, default=None, help="corpus tokens scanned per chunk (default 16384, quick 2048)")
    ap.add_argument("--chunk-size", type=int, default=None, help="objectives per chunk (default 8, quick 2)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)

    import dreamlens as dl
    from dreamlens.sweeps.ray_engine import cluster

    if args.quick:
        n = args.latents or 8
        spec, model, length, window = f"blocks.1.mlp.hook_post[0:{n}]", "dreamlens.testing:tiny_model", 4, 16
    else:
        n = args.latents or 64
        spec, model, length, window = f"sae:embedded[0:{n}]", None, 8, 24
    kw: dict[str, Any] = dict(
        model=model, budget=args.budget or (400 if args.quick else 1000), tokens=args.tokens or (2048 if args.quick else 16384),
        window=window, top_k=8, chunk_size=args.chunk_size or (2 if args.quick else 8), length=length, progress=False,
    )
    print(f"sweep {spec!r}: {n} objectives, {kw}", flush=True)
    root = Path(tempfile.mkdtemp(prefix="dreamlens-bench-sweep-"))
    walls: dict[str, float] = {}
    results: dict[str, Any] = {}
    try:

        def run(name: str, **engine: Any) -> None:
            t0 = time.perf_counter()
            results[name] = dl.sweep(spec, root / name, **kw, **engine)
            walls[name] = time.perf_counter() - t0
            assert results[name].complete, f"{name}: the sweep is incomplete"
            print(f"{name}: {walls[name]:.1f}s, {n / walls[name] * 3600:.0f} objectives/hour", flush=True)

        run("local")
        t0 = time.perf_counter()
        with cluster(None, 2):
            print(f"ray_cluster_start: {time.perf_counter() - t0:.1f}s (not counted below)", flush=True)
            run("ray_1", engine="ray", workers=1)
            run("ray_2", engine="ray", workers=2)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"same_results: {same(results['local'], results['ray_1']) and same(results['local'], results['ray_2'])}")
    print(f"ray_overhead: {walls['ray_1'] / walls['local']:.3f}")
    print(f"ray_speedup_2: {walls['local'] / walls['ray_2']:.3f}")


if __name__ == "__main__":
    main()
