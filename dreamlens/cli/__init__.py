"""The `dreamlens` command line: info, demo, dream, scan, compare, sweep, report, export, install-embedded (subcommands).
A user's mistake (`DreamlensError`): one `error:` line, exit 2 (traceback: --debug, DREAMLENS_DEBUG=1); a bug: traceback, exit 1.

The parser (`parser.py`) names each command's handler; the handler's module (which loads torch) is imported
when its command runs, through this package's table of names, so `dreamlens --help` never loads torch.
"""

from __future__ import annotations

import os
import re
import sys
from typing import TYPE_CHECKING

from ..errors import DreamlensError
from ..lazy import exports
from .parser import build_parser

# each public name of the command line, by the module that defines it (loaded on first use)
_NAMES = {
    "cmd_info": "dream", "cmd_demo": "dream", "cmd_dream": "dream", "demo_config": "dream",
    "DEMO_OBJECTIVE": "dream", "DEMO_PREFIX": "dream",
    "cmd_scan": "data", "cmd_compare": "data", "cmd_sweep": "sweep", "cmd_report": "report",
    "cmd_export_neuronpedia": "export", "cmd_install_embedded": "install",
    "check_out_folder": "checks", "check_dream_out": "checks", "check_modes_out": "checks", "check_out_file": "checks",
}
__getattr__ = exports(__name__, _NAMES)

if TYPE_CHECKING:  # the commands' names, for a type checker
    from .checks import check_dream_out, check_modes_out, check_out_file, check_out_folder
    from .data import cmd_compare, cmd_scan
    from .dream import DEMO_OBJECTIVE, DEMO_PREFIX, cmd_demo, cmd_dream, cmd_info, demo_config
    from .export import cmd_export_neuronpedia
    from .install import cmd_install_embedded
    from .report import cmd_report
    from .sweep import cmd_sweep

__all__ = [
    "main", "build_parser",
    "DEMO_OBJECTIVE", "DEMO_PREFIX", "demo_config",
    "check_out_folder", "check_dream_out", "check_modes_out", "check_out_file",
    "cmd_info", "cmd_demo", "cmd_dream", "cmd_scan", "cmd_compare", "cmd_sweep", "cmd_report", "cmd_export_neuronpedia",
    "cmd_install_embedded",
]


def _one_line(e: BaseException) -> str:
    return re.sub(r"\s*\n\s*", " ", str(e).strip()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("DREAMLENS_DEBUG", "").strip() not in ("", "0")
    try:
        handler = getattr(sys.modules[__name__], args.func)  # the command's module loads here (its table entry)
        return handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except DreamlensError as e:
        if debug:
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2

