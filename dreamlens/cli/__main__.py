"""`python -m dreamlens.cli`: the `dreamlens` command, as the entry point `dreamlens.cli:main` runs it;
its exit status is `main`'s."""

import sys

from . import main

sys.exit(main())
