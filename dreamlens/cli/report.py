"""The `report` subcommand: one offline HTML page of a dream result, of a modes folder (the modes side by
side) or of a sweep folder (its table), with PNG plots beside it; a model for attributions loads only when needed."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import models, viz
from ..analysis.scan import ScanResult
from ..errors import ModelLoadError, ResultError
from ..models import smollm2_config
from ..modes.result import Modes
from ..sweeps.errors import SweepError
from ..sweeps.store import load_sweep
from ..viz.errors import ReportError
from ..viz.report import write_modes_report, write_report
from ..viz.sweep_report import write_sweep_report
from .checks import check_out_file, load_result
from .dream import model_options

DEFAULT_PAGE = "report.html"  # `report FOLDER` without --out writes FOLDER/report.html

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from ..results import DreamResult


def _model_for(result: DreamResult, name: str | None, why: str = "token attributions",
               skip: str = "--attributions 0 to skip them", **where: Any) -> HookedTransformer:
    if name is None and result.model_name not in ("", smollm2_config().model_name):
        name = result.model_name
    try:
        return models.load_model(name, **where)
    except Exception as e:
        raise ModelLoadError(f"cannot load the model {name or 'embedded'!r} for {why} ({e}); pass --model, or {skip}") from e


def cmd_report(args: argparse.Namespace) -> int:
    if args.out is None:  # the page of a folder lives in it, and is replaced when made again
        args.out, args.force = str(Path(args.result_dir) / DEFAULT_PAGE), True
    if (Path(args.result_dir) / "sweep.json").is_file():
        return _report_sweep(args)
    if args.limit is not None:
        raise ReportError("--limit applies to the report of a sweep folder; drop it (a dream's report shows limits 4, 6 and 8)")
    if (Path(args.result_dir) / "modes.json").is_file():
        return _report_modes(args)
    result = load_result(args.result_dir, "RESULT_DIR")
    check_out_file(args.out, "report", force=args.force)
    scan = None
    own = Path(args.result_dir) / "scan"  # `dream --from-examples --out DIR` saves the scan it started from
    where = args.scan or (own if (own / "scan.json").is_file() else None)
    if where:
        scan = ScanResult.load(where)
    n_attr = 6 if args.attributions is None else args.attributions
    model = _model_for(result, args.model, **model_options(args)) if n_attr > 0 else None
    out = write_report(args.out, result, model=model, scan=scan, max_attributions=n_attr,
                       objective_index=args.objective_index)
    stem = out.with_suffix("")
    pngs = [
        viz.save_png(viz.plot_frontier(result), f"{stem}_frontier.png"),
        viz.save_png(viz.plot_evolution(result), f"{stem}_evolution.png"),
        viz.save_png(viz.plot_thresholds(result), f"{stem}_thresholds.png"),
    ]
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) and {', '.join(p.name for p in pngs)}")
    return 0


def _report_modes(args: argparse.Namespace) -> int:
    """`report` of a modes folder: the modes side by side, and each mode's frontier PNG beside the page."""
    try:
        modes = Modes.load(args.result_dir)
    except ResultError as e:
        raise ResultError(f"RESULT_DIR: {e}") from e
    check_out_file(args.out, "report", force=args.force)
    scan = None
    own = Path(args.result_dir) / "scan"  # `dream --modes --out DIR` saves the scan its modes started from
    where = args.scan or (own if (own / "scan.json").is_file() else None)
    if where:
        scan = ScanResult.load(where)
    n_attr = 3 if args.attributions is None else args.attributions
    model = None
    if len(modes) and (n_attr > 0 or scan is not None):  # the nearest examples need the model too
        why = "token attributions and nearest dataset examples" if scan is not None else "token attributions"
        skip = "--attributions 0 and no --scan to skip them" if scan is not None else "--attributions 0 to skip them"
        model = _model_for(modes.dreams[0], args.model, why, skip, **model_options(args))
    out = write_modes_report(args.out, modes, model=model, scan=scan, max_attributions=n_attr,
                             objective_index=args.objective_index)
    stem = out.with_suffix("")
    pngs = [viz.save_png(viz.plot_frontier(r), f"{stem}_mode_{i + 1}_frontier.png") for i, r in enumerate(modes) if len(r)]
    names = ", ".join(p.name for p in pngs) or "no PNG (no mode holds a prompt)"
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB: {len(modes)} modes) and {names}")
    return 0


def _report_sweep(args: argparse.Namespace) -> int:
    """`report` of a sweep folder: one page, a sortable table of every objective; no model, no plots."""
    for flag, value in (("--scan", args.scan), ("--objective-index", args.objective_index), ("--model", args.model),
                        ("--attributions", args.attributions), ("--device", getattr(args, "device", None)),
                        ("--dtype", getattr(args, "dtype", None))):
        if value is not None:
            raise SweepError(f"{flag} does not apply to a sweep (its scans and dreams are in the folder); drop it")
    sweep = load_sweep(args.result_dir)
    check_out_file(args.out, "report", force=args.force)
    limit = 6.0 if args.limit is None else args.limit
    out = write_sweep_report(args.out, sweep, limit=limit)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB: {sweep.n_done} of {len(sweep)} objectives)")
    return 0
