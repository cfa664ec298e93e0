"""The `scan` and `compare` subcommands: max-activating dataset examples and activation statistics of
objectives, and a dream plotted against them (activation vs xe)."""

from __future__ import annotations

import argparse

import pandas as pd

from .. import models
from ..analysis.compare import compare
from ..analysis.scan import ScanResult, scan
from ..analysis.scan_config import ScanConfig, scan_config
from ..corpus import check_source
from ..objectives import objective
from .checks import check_out_folder, load_result
from .dream import model_options


def scan_settings(args: argparse.Namespace, defaults: ScanConfig) -> ScanConfig:
    """The `ScanConfig` of the scan flags (--tokens, --window, --top-examples, --per-document): `defaults`
    with those given changed."""
    return scan_config(defaults, tokens=args.tokens, window=args.window, top_k=args.top_k, per_document=args.per_document)


def cmd_scan(args: argparse.Namespace) -> int:
    check_out_folder(args.out, "scan.json", "scan", force=args.force)
    check_source(args.corpus)
    config = scan_settings(args, ScanConfig())
    objs = [objective(o) for o in args.objective]
    model = models.load_model(args.model, **model_options(args))
    result = scan(model, objs, args.corpus, config=config, cache=not args.no_cache)
    out = result.save(args.out)
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(result.stats.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        for i, name in enumerate(result.objectives):
            print(f"\ntop examples of {name}:")
            for _, r in result.top(i).head(5).iterrows():
                print(f"  {r['activation']:9.4g}  xe {r['xe']:5.2f}  {r['text']!r}")
    print(f"\nsaved to {out}" + (" (from cache)" if result.from_cache else ""))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    dream_result = load_result(args.dream_dir, "DREAM_DIR")
    scan_result = ScanResult.load(args.scan_dir)
    out = args.out or args.dream_dir
    check_out_folder(out, "comparison.png", "comparison", force=args.force)
    comp = compare(dream_result, scan_result, args.objective_index)
    png = comp.save(out)
    for k, v in comp.summary.items():
        print(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}")
    print(f"saved {png} and its .csv")
    return 0
