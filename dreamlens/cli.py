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
    print(f"{len(names)} hook points, e.g.:")
    for name in names[:4] + [n for n in names if n.startswith("blocks.0.")][:12]:
        print(f"  {name}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dreamlens", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="load a model, print a greedy continuation and its hook names")
    p.add_argument("--model", default=None, help="model name or folder (default: the embedded SmolLM2-135M)")
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--tokens", type=int, default=20)
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("demo", help="the README's main job on the embedded model")
    p.add_argument("--model", default=None)
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--tokens", type=int, default=20)
    p.set_defaults(func=_cmd_info)
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
