"""The `dreamlens` command line: dream, scan, compare, report (each a subcommand)."""

from __future__ import annotations

import argparse
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    from .models import load_model

    model = load_model(args.model)
    prompt = args.prompt
    text = model.generate(prompt, max_new_tokens=args.tokens, do_sample=False, prepend_bos=False, verbose=False)
    print(f"model: {model.cfg.model_name} ({model.cfg.n_layers} layers, d_model {model.cfg.d_model})")
    print(f"greedy continuation: {text!r}")
    names = list(model.hook_dict)
    print(f"{len(names)} hook points: these, and the same for every block (blocks.N.*):")
    for name in [n for n in names if not n.startswith("blocks.")] + [n for n in names if n.startswith("blocks.0.")]:
        print(f"  {name}")
    return 0


DEMO_OBJECTIVE = "blocks.12.mlp.hook_post[1256]"  # fires on lists of media: "film, radio,"


def _writable_folder(path: str) -> None:
    """Fail before any compute if results could not be written there."""
    import tempfile
    from pathlib import Path

    folder = Path(path).resolve()
    parent = folder if folder.exists() else folder.parent
    if folder.exists() and not folder.is_dir():
        raise SystemExit(f"error: --out {path!r} exists and is not a folder")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise SystemExit(f"error: cannot write results to --out {path!r} ({e.strerror}); choose a writable folder") from None


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
    import dataclasses

    from .models import load_model
    from .optim.dream import DEFAULT_METHOD, METHODS, dream, make_config

    if args.out:
        _writable_folder(args.out)
    method = getattr(args, "method", None) or DEFAULT_METHOD
    fields = {f.name for _, cls in METHODS.values() for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if args.out and args.checkpoint_every:
        kw["checkpoint_dir"] = args.out
    cfg = make_config(method, None, **kw)  # an option the method does not have fails here, before loading
    cfg.validate()
    model = load_model(args.model)
    result = dream(model, args.objective, method, config=cfg, resume=args.resume)
    _print_frontier(result)
    if args.out:
        result.save(args.out)
        print(f"\nsaved to {args.out} (result.json, history.parquet)")
    return 0 if not result.stopped.startswith("error") else 1


# SmolLM2-Instruct's user turn: after it, "fluent" means a user's English message. After the bare
# start token the model expects code, and a short dream's fluent end reads as code.
DEMO_PREFIX = "<|im_start|>user\n"


def demo_args(args: argparse.Namespace) -> argparse.Namespace:
    """The `dream` arguments of the demo: ADAPT (the default method), 8 tokens, on the embedded model
    after its chat template's user turn (no prefix for another `--model`, whose template may differ)."""
    return argparse.Namespace(
        objective=DEMO_OBJECTIVE, model=args.model, out=args.out, resume=None, checkpoint_every=None,
        length=8, iters=args.iters, seed=0, method="adapt", prefix=DEMO_PREFIX if args.model is None else None,
    )


def _cmd_demo(args: argparse.Namespace) -> int:
    _cmd_info(args)
    print(f"\nDreaming {DEMO_OBJECTIVE} with ADAPT after {DEMO_PREFIX!r} (a small budget: about a minute on a 2-core CPU)...")
    return _cmd_dream(demo_args(args))


def _handler(module: str, name: str):
    """A subcommand handler living in another module, imported only when that subcommand runs."""

    def run(args: argparse.Namespace) -> int:
        import importlib

        return getattr(importlib.import_module(f".{module}", __package__), name)(args)

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dreamlens", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="load a model, print a greedy continuation and its hook names")
    p.add_argument("--model", default=None, help="model name or folder (default: the embedded SmolLM2-135M)")
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--tokens", type=int, default=20)
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("demo", help="the README's main job: a short dream on the embedded model")
    p.add_argument("--model", default=None)
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--tokens", type=int, default=12)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--out", default="dreams/demo")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("dream", help="dream an objective: print the Pareto frontier, save the result")
    p.add_argument("objective", help="e.g. 'blocks.6.mlp.hook_post[123]', 'sae:embedded[42]', 'logit[\" Paris\"]'")
    p.add_argument("--method", choices=["adapt", "epo", "gcg"], default=None,
                   help="optimizer (default adapt; epo: the paper's; gcg: one member, fixed penalty)")
    p.add_argument("--model", default=None, help="model name or folder (default: the embedded SmolLM2-135M)")
    p.add_argument("--iters", type=int, default=None, help="iterations (default 300)")
    p.add_argument("--length", type=int, default=None, help="optimized tokens (default 12)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--population", type=int, default=None, help="EPO members (default 8)")
    p.add_argument("--children", type=int, default=None, help="children per member (default 32)")
    p.add_argument("--topk", type=int, default=None, help="gradient top-k (default 512)")
    p.add_argument("--restart-every", type=int, default=None, help="restart period (default 50; 0: never)")
    p.add_argument("--prefix", default=None, help="fixed text before the dream")
    p.add_argument("--suffix", default=None, help="fixed text after the dream")
    p.add_argument("--ascii-only", action="store_true", default=None, help="ban tokens with non-ASCII characters")
    p.add_argument("--max-token-forwards", type=int, default=None, help="compute budget in token-forwards")
    p.add_argument("--checkpoint-every", type=int, default=None, help="save to --out every N iterations")
    p.add_argument("--resume", default=None, help="continue the run saved in this folder")
    p.add_argument("--out", default=None, help="folder for the result (result.json + history.parquet)")
    p.set_defaults(func=_cmd_dream)

    p = sub.add_parser("scan", help="max-activating dataset examples and activation statistics of objectives")
    p.add_argument("objective", nargs="+", help="objectives, e.g. 'blocks.6.mlp.hook_post[123]' (many: one pass)")
    p.add_argument("--model", default=None, help="model name or folder (default: the embedded SmolLM2-135M)")
    p.add_argument("--corpus", default=None, help="'sotu', 'wiki', a file or folder, 'hf:NAME' (default: embedded)")
    p.add_argument("--tokens", type=int, default=200_000, help="corpus tokens to scan (default 200000)")
    p.add_argument("--window", type=int, default=24, help="tokens per example window (default 24)")
    p.add_argument("--top-k", type=int, default=32, help="top examples kept per objective (default 32)")
    p.add_argument("--per-document", type=int, default=4, help="at most this many examples per document")
    p.add_argument("--no-cache", action="store_true", help="scan again even if a cached scan exists")
    p.add_argument("--out", required=True, help="folder for stats, examples and sketch (Parquet + scan.json)")
    p.set_defaults(func=_handler("dataset", "cli_scan"))

    p = sub.add_parser("compare", help="plot dreams against the top dataset examples (activation vs xe)")
    p.add_argument("dream_dir", help="a dream result folder")
    p.add_argument("scan_dir", help="a scan folder (written by `dreamlens scan --out`)")
    p.add_argument("--objective-index", type=int, default=None, help="the scan's objective (default: the dream's)")
    p.add_argument("--out", default=None, help="folder for comparison.png/.csv/.json (default: DREAM_DIR)")
    p.set_defaults(func=_handler("dataset", "cli_compare"))

    p = sub.add_parser("report", help="one offline HTML page: objective, frontier, plots, attributions, dataset comparison")
    p.add_argument("result_dir", help="a dream result folder")
    p.add_argument("--scan", default=None, help="a scan folder (from `dreamlens scan --out`) to compare with")
    p.add_argument("--objective-index", type=int, default=None, help="the scan's objective (default: the dream's)")
    p.add_argument("--out", required=True, help="the HTML file to write (PNG plots are written beside it)")
    p.add_argument("--model", default=None, help="model for token attributions (default: the dream's model)")
    p.add_argument("--attributions", type=int, default=6, help="frontier prompts to attribute (0: none, no model loaded)")
    p.set_defaults(func=_handler("report", "cli_report"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
