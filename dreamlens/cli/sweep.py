"""The `sweep` subcommand: dream, scan and measure every objective of a SPEC into a resumable sweep folder,
then print the objectives whose dreams beat the dataset by the most."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path
from typing import Any

from .. import sweeps
from ..analysis.scan_config import SWEEP_SCAN
from ..modes.settings import check_needs_modes
from ..optim.methods import DEFAULT_METHOD
from ..sweeps.errors import SweepError
from ..sweeps.store import load_sweep
from .data import scan_settings
from .knobs import SWEEP_SKIPPED, knob_options


def _workers_line(result: Any) -> str | None:
    """Where the last run's Ray workers ran (from sweep.json), e.g. 'ray workers (127.0.0.1:6379): 2 on cuda at 10.0.0.2'."""
    run = result.runs[-1] if result.runs else {}
    workers = run.get("workers") if run.get("engine") == "ray" else None
    if not workers:
        return None
    where = Counter((w.get("device"), w.get("node")) for w in workers)
    return f"ray workers ({run.get('address')}): " + ", ".join(f"{n} on {d} at {node}" for (d, node), n in where.items())

def cmd_sweep(args: argparse.Namespace) -> int:
    if args.ray is None and args.workers is not None:
        raise SweepError("--workers is the number of Ray workers: pass --ray [ADDRESS] with it, or drop it")
    gpus = getattr(args, "gpus_per_worker", None)
    if args.ray is None and gpus is not None:
        raise SweepError("--gpus-per-worker applies to Ray workers: pass --ray [ADDRESS] with it, or drop it")
    modes = args.modes or 1
    check_needs_modes(modes, {"--mode-limit": args.mode_limit}, modes_name="--modes ", error=SweepError)
    options = knob_options(args, args.method or DEFAULT_METHOD, skip=SWEEP_SKIPPED)
    scan = scan_settings(args, SWEEP_SCAN)
    before = load_sweep(args.out).n_done if (Path(args.out) / "sweep.json").is_file() else 0
    result = sweeps.sweep(
        args.spec, args.out, model=args.model, method=args.method, max_token_forwards=args.budget, corpus=args.corpus,
        scan=scan, chunk_size=args.chunk_size, modes=modes, mode_limit=args.mode_limit,
        engine="local" if args.ray is None else "ray",
        address=args.ray or None, workers=args.workers, progress=not args.quiet,
        **({"gpus_per_worker": gpus} if gpus is not None else {}),
        device=getattr(args, "device", None), dtype=getattr(args, "dtype", None), **options,
    )
    s = result.summary
    limits = result.config.get("limits") or []
    limit = 6.0 if 6.0 in limits else (limits[-1] if limits else None)
    print(f"{len(result)} objectives in {args.out}: {len(result) - before} computed now, {before} from before")
    if (line := _workers_line(result)) is not None and len(result) > before:
        print(line)
    failed = s[s["stopped"] == "error"] if "stopped" in s.columns else s.iloc[:0]
    if len(failed):
        print(f"{len(failed)} could not be dreamed (the summary's `error` column says why), e.g. {failed['objective'].iloc[0]}: "
              f"{failed['error'].iloc[0]}")
    if limit is not None and len(s):
        col = f"ratio_xe{float(limit):g}"
        beats = int(s["beats_dataset"].sum())
        if result.modes > 1:
            objectives = s.loc[s["beats_dataset"].astype(bool), "index"].nunique()
            print(f"dreams that beat the dataset: {beats} of {len(s)} ({result.modes} modes of each objective; "
                  f"{objectives} of {result.n_done} objectives); highest ratios at xe <= {limit:g} (best dream / dataset max):")
        else:
            print(f"dreams that beat the dataset: {beats} of {len(s)}; highest ratios at xe <= {limit:g} "
                  "(best dream / dataset max):")
        for _, r in s.sort_values(col, ascending=False, na_position="last", kind="stable").head(10).iterrows():
            mode = f" (mode {int(r['mode'])})" if result.modes > 1 else ""
            print(f"  {r[col]:8.3g}  {r['objective']}{mode}  {r[f'best_xe{float(limit):g}_text']!r}")
    page = Path(args.out) / "report.html"
    print(f"read it with dl.load_sweep({str(args.out)!r}); a page ({page}): dreamlens report {args.out}")
    return 0
