# metal-guard developer tasks (GNU make; Linux and macOS).
#
#   make test    ruff, mypy --strict, then the test suite twice: with real MLX + mlx-lm
#                (.venv, which also gets pytest, ruff, mypy, build and twine) and without
#                MLX (.venv-nomlx)
#   make lint    ruff + mypy --strict
#   make demo    run examples/guarded_pipeline.py in .venv (its last step is
#                examples/guarded_servers.py: two mlx_lm.server processes under
#                metal-guard run), installing only what the demo needs: the library with
#                MLX + mlx-lm (none of the test or dev tools)
#   make bench   run bench/run_all.py in .venv
#   make dist    build the sdist and wheel into dist/ and run twine check
#   make clean   remove virtual environments, temp files, build output and caches
#
# Override the interpreter used to create the environments with PYTHON=..., e.g.
# `make test PYTHON=python3.12`, and pass extra pytest options with PYTEST_ARGS=...
# The environments are (re)installed only when pyproject.toml changes. .venv has two
# stamps: .installed (everything, for test/lint/bench/dist) and .installed-demo (the
# demo's needs, already met when .installed is current).

PYTHON ?= python3
PYTEST_ARGS ?=

VENV       := .venv
VENV_NOMLX := .venv-nomlx
BIN        := $(VENV)/bin
BIN_NOMLX  := $(VENV_NOMLX)/bin
STAMP      := $(VENV)/.installed
STAMP_DEMO := $(VENV)/.installed-demo
STAMP_NOMLX := $(VENV_NOMLX)/.installed
TMP        := $(CURDIR)/.tmp

PIP_INSTALL := -m pip install --quiet --disable-pip-version-check --progress-bar off
# The distribution is mlx-metal-guard; an environment made before the rename still holds
# it under the name metal-guard (the other project's name on the package index): drop that.
PIP_DROP_OLD_NAME := -m pip uninstall --quiet --yes --disable-pip-version-check metal-guard

# Every test, demo and bench run: temp files (pytest's tmp_path, MLX's compiled CPU
# kernels under $TMPDIR/mlx) stay inside the tree, and nothing reaches a model hub.
RUN_ENV := TMPDIR="$(TMP)" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

LINT_PATHS := metal_guard.py packaging/__main__.py

.DEFAULT_GOAL := test
.NOTPARALLEL:
.PHONY: test test-mlx test-nomlx lint ruff mypy demo bench dist venv venv-demo venv-nomlx clean

test: lint test-mlx test-nomlx

lint: ruff mypy

ruff: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

mypy: $(STAMP)
	$(BIN)/mypy --strict $(LINT_PATHS)

test-mlx: $(STAMP) | $(TMP)
	@$(BIN)/python -c "import importlib.util as u, mlx.core; \
	assert u.find_spec('mlx_lm'), 'mlx-lm missing'" \
	  || { echo "error: $(VENV) has no working MLX + mlx-lm; try 'make clean test'" >&2; exit 1; }
	$(RUN_ENV) $(BIN)/python -m pytest $(PYTEST_ARGS)

test-nomlx: $(STAMP_NOMLX) | $(TMP)
	@$(BIN_NOMLX)/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('mlx') is not None)" \
	  || { echo "error: $(VENV_NOMLX) must not have MLX; try 'make clean test'" >&2; exit 1; }
	$(RUN_ENV) $(BIN_NOMLX)/python -m pytest $(PYTEST_ARGS)

venv: $(STAMP)
venv-demo: $(STAMP_DEMO)
venv-nomlx: $(STAMP_NOMLX)

$(STAMP): pyproject.toml | $(TMP)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python $(PIP_DROP_OLD_NAME)
	TMPDIR="$(TMP)" $(BIN)/python $(PIP_INSTALL) -e ".[lm,test,dev]"
	touch $@

# The demo needs the library with MLX + mlx-lm only. A current full install (above)
# already holds all of that, so nothing is installed then (and nothing is fetched).
$(STAMP_DEMO): pyproject.toml | $(TMP)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	if [ -f $(STAMP) ] && [ $(STAMP) -nt pyproject.toml ]; then :; \
	else $(BIN)/python $(PIP_DROP_OLD_NAME) && TMPDIR="$(TMP)" $(BIN)/python $(PIP_INSTALL) -e ".[lm]"; fi
	touch $@

$(STAMP_NOMLX): pyproject.toml | $(TMP)
	test -x $(BIN_NOMLX)/python || $(PYTHON) -m venv $(VENV_NOMLX)
	$(BIN_NOMLX)/python $(PIP_DROP_OLD_NAME)
	TMPDIR="$(TMP)" $(BIN_NOMLX)/python $(PIP_INSTALL) -e ".[test]"
	touch $@

$(TMP):
	mkdir -p $@

demo: $(STAMP_DEMO) | $(TMP)
	$(RUN_ENV) $(BIN)/python examples/guarded_pipeline.py

bench: $(STAMP) | $(TMP)
	$(RUN_ENV) $(BIN)/python bench/run_all.py

dist: $(STAMP) | $(TMP)
	rm -rf dist
	TMPDIR="$(TMP)" $(BIN)/python -m build --outdir dist .
	$(BIN)/twine check --strict dist/*

clean:
	rm -rf $(VENV) $(VENV_NOMLX) .tmp build dist .mypy_cache .ruff_cache .pytest_cache
	find . -path ./.git -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
	find . -path ./.git -prune -o -name '*.egg-info' -type d -prune -exec rm -rf {} +
