"""Make the README's "Dataset examples" figure: dreams of one neuron of the embedded model against its
max-activating examples in the embedded corpora.

    .venv/bin/python docs/make_dataset_figure.py [--tokens 30000] [--iters 150] [--out docs]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import dreamlens as dl

NEURON = "blocks.12.mlp.hook_post[1256]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--objective", default=NEURON)
    ap.add_argument("--tokens", type=int, default=30_000)
    ap.add_argument("--iters", type=int, default=150)
    ap.add_argument("--out", default=str(Path(__file__).parent))
    args = ap.parse_args()
    out = Path(args.out)

    model = dl.load_model()
    t = time.perf_counter()
    scan = dl.scan(model, [args.objective], tokens=args.tokens, window=16, top_k=32)
    print(f"scan: {time.perf_counter() - t:.0f}s{' (cached)' if scan.from_cache else ''}")
    print(scan.stats.to_string(index=False))
    print(scan.top(0)[["activation", "xe", "text"]].head(8).to_string(index=False))

    dreams_dir = out / "dataset_figure_dream"
    cfg = dl.EPOConfig(length=8, population=8, children=16, topk=128, iters=args.iters,
                       checkpoint_every=10, checkpoint_dir=str(dreams_dir))
    t = time.perf_counter()
    resume = dreams_dir if (dreams_dir / "result.json").is_file() else None  # continue a checkpoint
    dream = dl.DreamResult.load(dreams_dir) if resume else None
    if dream is None or dream.iterations < args.iters:
        dream = dl.epo(model, args.objective, cfg, resume=resume)
        dream.save(dreams_dir)
    print(f"dream: {time.perf_counter() - t:.0f}s, {dream.iterations} iterations")
    print(dream.frontier[["activation", "xe", "text"]].to_string(index=False))
    comp = dl.compare(dream, scan)
    png = comp.save(out, name="dataset_comparison")
    for k, v in comp.summary.items():
        print(f"{k}: {v}")
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
