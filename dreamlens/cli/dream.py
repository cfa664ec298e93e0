"""The `info`, `dream` (one dream, or its modes with --modes K) and `demo` subcommands and their printing:
the frontier, each mode's header, and the demo's dream next to the top dataset examples."""

from __future__ import annotations

import argparse
import itertools
import json
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import models
from ..analysis.metrics import dataset_max, median_top_xe
from ..analysis.scan import ScanResult, scan
from ..analysis.scan_config import ScanConfig
from ..corpus import check_source
from ..dreaming import dream
from ..errors import DreamError
from ..models import decode
from ..modes.result import Modes
from ..modes.settings import ModeSettings, check_needs_modes
from ..objectives import objective
from ..optim.config import DreamConfig, method_name
from ..optim.methods import DEFAULT_METHOD, make_config
from ..results import DreamResult
from .checks import check_dream_out, check_modes_out, load_result
from .defaults import DREAMS_FOLDER, EXAMPLE_SCAN_TOKENS, MODE_SCAN_TOKENS
from .knobs import knob_options

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from ..objectives import Objective

DEMO_OBJECTIVE = "blocks.12.mlp.hook_post[1256]"  # fires on lists of media: "film, radio,"
# SmolLM2-Instruct's user turn: after it, "fluent" means a user's English message. After the bare
# start token the model expects code, and a short dream's fluent end reads as code.
DEMO_PREFIX = "<|im_start|>user\n"
DEMO_LENGTH = 8  # the demo dream's tokens


def model_options(args: argparse.Namespace) -> dict[str, Any]:
    """The `device` and `dtype` of `load_model` from `--device` and `--dtype`, those given only (load_model's
    defaults for the others)."""
    return {k: v for k in ("device", "dtype") if (v := getattr(args, k, None)) is not None}


def default_out(objective: str, root: str | Path = DREAMS_FOLDER) -> str:
    """A new folder under `root` for a dream saved without --out: named after the objective (e.g.
    dreams/blocks.6.mlp.hook_post-123), numbered (-2, -3, ..) when that name is taken."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", objective).strip("-.")[:80] or "dream"
    for n in itertools.count(1):
        path = Path(root) / (stem if n == 1 else f"{stem}-{n}")
        if not path.exists():
            return str(path)
    raise AssertionError("unreachable")  # pragma: no cover


def _dream_options(args: argparse.Namespace, method: str) -> dict[str, Any]:
    """The method's config options the `dream` flags give (the knobs, and --budget as max_token_forwards)."""
    kw = knob_options(args, method)
    if getattr(args, "budget", None) is not None:
        kw["max_token_forwards"] = args.budget
    return kw


def cmd_info(args: argparse.Namespace) -> int:
    model = models.load_model(args.model, **model_options(args))
    text = model.generate(args.prompt, max_new_tokens=args.tokens, do_sample=False, prepend_bos=False, verbose=False)
    print(f"model: {model.cfg.model_name} ({model.cfg.n_layers} layers, d_model {model.cfg.d_model}; "
          f"{model.cfg.device}, {str(model.cfg.dtype).removeprefix('torch.')})")
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


def cmd_dream(args: argparse.Namespace) -> int:
    if args.modes is not None:
        if args.resume:
            raise DreamError("--modes cannot resume a run; dream the modes again (with a fixed --seed they come out the same)")
        if args.checkpoint_every is not None:
            raise DreamError("--checkpoint-every does not apply with --modes (modes cannot be resumed); drop it")
        if getattr(args, "from_examples", False):
            raise DreamError("--from-examples starts one dream from the examples; with --modes, later modes start from "
                             "them already (--mode-scan-tokens): drop --from-examples")
        _run_modes(args)
    else:
        check_needs_modes(args.modes, {"--mode-limit": args.mode_limit, "--mode-scan-tokens": args.mode_scan_tokens},
                          modes_name="--modes ")
        if not getattr(args, "from_examples", False):
            for flag, name in (("--corpus", "corpus"), ("--scan-tokens", "scan_tokens")):
                if getattr(args, name, None) is not None:
                    raise DreamError(f"{flag} applies only with --from-examples; add it, or drop {flag}")
        elif args.resume:
            raise DreamError("--from-examples sets where a fresh run starts; --resume continues from the saved state: drop one")
        _run_dream(args)
    return 0


def _run_dream(args: argparse.Namespace) -> tuple[HookedTransformer, DreamResult, ScanResult | None]:
    """Dream as the `dream` arguments say: print the frontier, save the result; (model, result, scan)."""
    method = args.method or DEFAULT_METHOD
    kw = _dream_options(args, method)
    resume = load_result(args.resume, "--resume") if args.resume else None
    out = args.out or args.resume or default_out(args.objective)  # a resumed run goes on in its folder
    check_dream_out(out, force=args.force or resume is not None)
    # checkpoints, and the partial result of a run that fails, go to `out`; an option the method does not
    # have fails here, before the model loads, and so does a malformed objective
    cfg = make_config(method, None, **kw, checkpoint_dir=out)
    cfg.validate()
    target = objective(args.objective)
    if not args.out and resume is None:
        print(f"saving to {out} (--out FOLDER to choose)")
    examples = None
    if getattr(args, "from_examples", False):
        check_source(args.corpus)
        examples = ScanConfig(tokens=args.scan_tokens or EXAMPLE_SCAN_TOKENS, window=cfg.length)
    return dream_and_save(target, cfg, out, model=args.model, placement=model_options(args), resume=resume,
                          corpus=args.corpus, examples=examples)


def dream_and_save(
    target: Objective, cfg: DreamConfig, out: str, *, model: str | None = None, placement: dict[str, Any] | None = None,
    resume: DreamResult | None = None, corpus: str | None = None, examples: ScanConfig | None = None,
) -> tuple[HookedTransformer, DreamResult, ScanResult | None]:
    """Load `model` (on `placement`: device, dtype), dream `target` with `cfg` (its method's config), print
    the frontier and save the result in `out` (checked by the caller). `examples`: first scan `corpus` so
    (cached), start the dream from the objective's top examples and save that scan as OUT/scan.
    Returns (model, result, that scan or None)."""
    net = models.load_model(model, **(placement or {}))
    found = None
    if examples is not None:
        print(f"The top dataset examples, where the dream starts: a scan of {examples.tokens:,} tokens of "
              f"{corpus or 'the embedded corpora'} (cached after the first run; not counted in the dream's budget)...")
        found = scan(net, [target], corpus, config=examples)
    result = dream(net, target, method_name(cfg), config=cfg, resume=resume, examples=found)
    assert isinstance(result, DreamResult)  # one objective, one result
    _print_frontier(result)
    result.save(out, overwrite=True)  # the folder was checked; it may hold our checkpoint
    own_scan = Path(out) / "scan"  # `dreamlens report OUT` compares the dream with it
    if found is not None:
        found.save(own_scan)
    elif (own_scan / "scan.json").is_file() and resume is None:  # a replaced dream's scan is not this one's
        shutil.rmtree(own_scan)
    print(f"\nsaved to {out} (result.json, history.parquet{', scan/' if found is not None else ''}); "
          f"a page: dreamlens report {out}")
    return net, result, found


def _run_modes(args: argparse.Namespace) -> tuple[HookedTransformer, Modes]:
    """`dream --modes K`: dream the modes, print each one's header and frontier (best first), save them."""
    method = args.method or DEFAULT_METHOD
    kw = _dream_options(args, method)
    chosen = bool(args.out)
    args.out = args.out or default_out(args.objective)
    check_modes_out(args.out, force=args.force)  # no checkpoints: each mode is a run of its own
    cfg = make_config(method, None, **kw)
    cfg.validate()
    settings = ModeSettings() if args.mode_limit is None else ModeSettings(limit=args.mode_limit)
    settings.validate()
    target = objective(args.objective)
    if not chosen:
        print(f"saving to {args.out} (--out FOLDER to choose)")
    model = models.load_model(args.model, **model_options(args))
    found = None
    tokens = MODE_SCAN_TOKENS if args.mode_scan_tokens is None else args.mode_scan_tokens
    if args.modes > 1 and tokens:
        print(f"The top dataset examples, where later modes start: a scan of {tokens:,} tokens of the embedded corpora "
              "(cached after the first run)...")
        found = scan(model, [target], None, config=ScanConfig(tokens=tokens, window=cfg.length))
    modes = dream(model, target, method, config=cfg, modes=args.modes, mode_settings=settings, examples=found)
    assert isinstance(modes, Modes)
    for i, r in enumerate(modes.dreams):
        keys = ", ".join(repr(decode(model, [t])) for t in modes.key_tokens[i])
        if not keys:
            keys = "none (found last: no mode was dreamed without them)" if modes.found[i] == len(modes) else "none"
        print(f"\n=== mode {i + 1} of {len(modes)} (found {_ordinal(modes.found[i])}, start {modes.starts[i]}; key tokens: "
              f"{keys}; dreamed without {len(modes.banned[i])} tokens) ===")
        b = modes.best(i)
        if b is None:
            print(f"no prompt at xe <= {modes.limit:g}")
        else:
            print(f"best at xe <= {modes.limit:g}: {float(b['activation']):.3f} (xe {float(b['xe']):.2f})  {b['text']!r}")
        _print_frontier(r)
    modes.save(args.out, overwrite=True)  # the folder was checked above
    saved = f"modes.json, mode_1/ .. mode_{len(modes)}/"
    own_scan = Path(args.out) / "scan"  # `dreamlens report OUT` shows each mode's nearest examples from it
    if found is not None:
        found.save(own_scan)
        saved += ", scan/"
    elif (own_scan / "scan.json").is_file():  # the scan of the modes these replaced (--force) is not theirs
        shutil.rmtree(own_scan)
    print(f"\nsaved to {args.out} ({saved}); a page: dreamlens report {args.out}")
    return model, modes


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def demo_config(model: str | None, budget: int, out: str | None = None) -> DreamConfig:
    """The demo's dream: the default method, `DEMO_LENGTH` tokens, seed 0, `budget` token-forwards, on the
    embedded model after its chat template's user turn (no prefix for another `model`, whose template may
    differ); checkpoints in `out`."""
    return make_config(DEFAULT_METHOD, None, length=DEMO_LENGTH, seed=0, prefix=DEMO_PREFIX if model is None else "",
                       max_token_forwards=budget, checkpoint_dir=out)


def _is_demo_result(out: str | None) -> bool:
    """The demo replaces its own earlier result (`make demo` twice), never anything else."""
    if out is None:
        return False
    try:
        meta = json.loads((Path(out) / "result.json").read_text())
    except (OSError, ValueError, TypeError):
        return False
    return meta.get("objective") == DEMO_OBJECTIVE and meta.get("config", {}).get("length") == DEMO_LENGTH


def cmd_demo(args: argparse.Namespace) -> int:
    out = args.out or default_out(DEMO_OBJECTIVE)
    check_dream_out(out, force=getattr(args, "force", False) or _is_demo_result(out), resume=False)  # before the model loads
    cfg = demo_config(args.model, args.budget, out)
    cfg.validate()
    cmd_info(args)
    print(f"\nDreaming {DEMO_OBJECTIVE} with {method_name(cfg).upper()} after {DEMO_PREFIX!r} "
          f"({args.budget:,} token-forwards: a couple of minutes on a 2-core CPU)...")
    # from the objective's top dataset examples: the scan the comparison reads
    examples = ScanConfig(tokens=args.scan_tokens, window=cfg.length)
    _, result, found = dream_and_save(objective(DEMO_OBJECTIVE), cfg, out, model=args.model,
                                      placement=model_options(args), examples=examples)
    assert found is not None  # a scan was asked for
    _print_dataset_side(result, found)
    return 0


def _print_dataset_side(result: DreamResult, found: ScanResult) -> None:
    """The demo's dream next to the objective's top dataset examples (`found`: the scan it started from,
    windows as long as the dream, scored like dreams): does the frontier reach their fluency, and how high
    does it go there?"""
    print(f"\nThe top dataset examples: the scan the dream started from ({found.meta['tokens']:,} tokens of the "
          "embedded corpora)...")
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
