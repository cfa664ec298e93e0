"""Scan throughput: tokens per second of `dreamlens.scan` for 1 and for 256 objectives at once, against
the raw forward of the same model to the same layer over the same token windows.

Targets: 256 objectives cost at most 1.2x one objective (`scan_256_vs_1_ratio`, time ratio), and the
scan runs at >= 0.9x the raw forward's speed (`scan_1_vs_raw`). Variants are timed alternately after
an untimed warm-up, medians reported. The corpus text is read once up front (I/O is not the scan's);
tokenizing it is part of the scan and is timed.

    python benchmarks/scan_throughput.py [--quick] [--tokens N] [--reps R]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small budget, same code path (under a minute)")
    ap.add_argument("--tokens", type=int, default=None, help="tokens per scan (default 24576, quick 3072)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per variant (default 5, quick 3)")
    ap.add_argument("--layer", type=int, default=6, help="MLP layer of the neurons (default 6)")
    ap.add_argument("--window", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    n_tok = args.tokens or (3072 if args.quick else 24576)
    reps = args.reps or (3 if args.quick else 5)
    warnings.filterwarnings("ignore")

    import dreamlens as dl
    from dreamlens import corpus
    from dreamlens.analysis.scan import scan
    from dreamlens.models import bos_token_id

    t0 = time.perf_counter()
    model = dl.load_model()
    docs = []
    for d in corpus.documents(None):  # enough text for the budget, read once
        docs.append(d)
        if len(docs) >= 8 and sum(len(x) for x in docs) > 8 * n_tok:
            break
    print(f"model and corpus loaded in {time.perf_counter() - t0:.1f}s; {torch.get_num_threads()} threads")

    hook = f"blocks.{args.layer}.mlp.hook_post"
    one = [dl.Neuron(hook, 0)]
    many = [dl.Neuron(hook, i) for i in range(256)]
    stop = dl.objectives.stop_at_layer(model, one)
    bos = bos_token_id(model)
    chunks = list(corpus.document_windows(model, docs, args.window, max_tokens=n_tok))
    batches = [
        torch.tensor([[bos] + c.ids for c in chunks[i : i + args.batch_size]])
        for i in range(0, len(chunks), args.batch_size)
    ]
    n_tokens = len(chunks) * args.window

    def raw() -> None:
        with torch.inference_mode():
            for b in batches:
                model(b, stop_at_layer=stop)

    def run_scan(objs) -> None:
        r = scan(model, objs, docs, tokens=n_tok, window=args.window, top_k=32,
                 batch_size=args.batch_size, score=False, cache=False, progress=False)
        assert r.meta["n_tokens"] == n_tokens

    variants = {"raw_forward": raw, "scan_1": lambda: run_scan(one), "scan_256": lambda: run_scan(many)}
    for f in variants.values():  # untimed warm-up (the first large forwards of a process are slow)
        f()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(reps):
        for name, f in variants.items():
            t = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}

    print(f"{n_tokens} tokens per run (window {args.window}, batch {args.batch_size}), stop_at_layer={stop}, "
          f"median of {reps}")
    for name, t in med.items():
        spread = f"{min(times[name]):.2f}..{max(times[name]):.2f}s"
        print(f"{name:12s} {n_tokens / t:9.0f} tokens/s   ({t:.2f}s, {spread})")

    if not args.quick:  # scoring the top examples (a full forward per window) is a separate, per-example cost
        r = scan(model, one, docs, tokens=n_tok, window=args.window, top_k=32, batch_size=args.batch_size,
                 score=False, cache=False, progress=False)
        t = time.perf_counter()
        r.score(model, one)
        dt, n_ex = time.perf_counter() - t, len(r.examples)
        print(f"scoring {n_ex} top examples (full forward, window {args.window}): {dt:.1f}s, "
              f"{dt / max(n_ex, 1) * 1000:.0f} ms per example")

    print(f"scan_1_vs_raw: {med['raw_forward'] / med['scan_1']:.2f}")
    print(f"scan_256_vs_raw: {med['raw_forward'] / med['scan_256']:.2f}")
    print(f"scan_256_vs_1_ratio: {med['scan_256'] / med['scan_1']:.2f}")


if __name__ == "__main__":
    main()
