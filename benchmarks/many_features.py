"""Many features at once: K = 16 MLP neurons of the embedded model dreamed in one EPO run (16
populations sharing every forward pass) versus 16 separate runs, with the same config, budgets and
seeds. The variants alternate (batched first, then separate, then the other way round), after an
untimed warm-up; medians reported, with each variant's peak resident memory (sampled every 20 ms)
above the memory at its start, and how many of the 16 features ended on the same prompts both ways.

Headline (last line): many_features_ratio = batched time / separate time (target <= 1.0 on a CPU).

    python benchmarks/many_features.py [--quick] [--reps R] [--threads T]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import threading
import time
import warnings

import numpy as np
import torch


class PeakRSS:
    """Peak resident set size of this process while the context is open, sampled from /proc."""

    def __init__(self, every: float = 0.02):
        self.every, self.peak, self.start = every, 0, 0
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.every)

    def __enter__(self) -> PeakRSS:
        try:  # hand freed heap back to the system, so each variant starts from what is really in use
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.start = self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, same code path (under a minute)")
    ap.add_argument("--reps", type=int, default=None, help="timed runs per variant (default 2, quick 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--features", type=int, default=16)
    ap.add_argument("--layer", type=int, default=6)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = args.reps or (1 if args.quick else 2)

    import dreamlens as dl

    size = (
        dict(length=6, population=2, children=4, topk=64, iters=1)
        if args.quick
        else dict(length=10, population=4, children=8, topk=256, iters=3)
    )
    cfg = dl.EPOConfig(**size, restart_every=2, seed=0)
    t0 = time.perf_counter()
    model = dl.load_model()
    objs = [f"blocks.{args.layer}.mlp.hook_post[{i}]" for i in range(0, 97 * args.features, 97)]
    print(f"model loaded in {time.perf_counter() - t0:.1f}s; {torch.get_num_threads()} threads; K={len(objs)}; {size}")

    def batched() -> list:
        return dl.dream(model, objs, "epo", config=cfg, progress=False)

    def separate() -> list:
        return [dl.dream(model, o, "epo", config=cfg, progress=False) for o in objs]

    dl.dream(model, objs[:2], "epo", config=dl.EPOConfig(**{**size, "iters": 1}), progress=False)  # warm-up
    times: dict[str, list[float]] = {"batched": [], "separate": []}
    peaks: dict[str, list[float]] = {"batched": [], "separate": []}
    results: dict[str, list] = {}
    for r in range(reps):
        for name in ("batched", "separate") if r % 2 == 0 else ("separate", "batched"):
            with PeakRSS() as mem:
                start = time.perf_counter()
                results[name] = (batched if name == "batched" else separate)()
                times[name].append(time.perf_counter() - start)
            peaks[name].append((mem.peak - mem.start) / 2**20)
            peak, base = peaks[name][-1], mem.start / 2**20
            print(f"{name}: {times[name][-1]:.1f}s, peak memory +{peak:.0f} MiB over {base:.0f} MiB", flush=True)

    same = sum(np.array_equal(a.ids, b.ids) for a, b in zip(results["batched"], results["separate"]))
    close = all(
        np.isclose(a.activation.max(), b.activation.max(), rtol=1e-4, atol=1e-4)
        for a, b in zip(results["batched"], results["separate"])
    )
    med = statistics.median
    ratio = med(a / b for a, b in zip(times["batched"], times["separate"]))
    print(f"batched_s: {med(times['batched']):.2f}")
    print(f"separate_s: {med(times['separate']):.2f}")
    print(f"peak_mib_batched: {med(peaks['batched']):.0f}")
    print(f"peak_mib_separate: {med(peaks['separate']):.0f}")
    print(f"same_prompts: {same}/{len(objs)} (best activations equal: {close})")
    print(f"many_features_ratio: {ratio:.3f}")


if __name__ == "__main__":
    main()
