# nbflow developer tasks. GNU make; every recipe runs in bash with -eu -o pipefail.
#
#   make demo   create .venv, install nbflow, run the hello example, list the latest runs
#   make test   create .venv, install nbflow[test], run the test suite (needs PostgreSQL, see README)
#   make lint   ruff check .
#   make clean  remove .venv, .nbflow and caches

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-builtin-rules

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check
PYTEST_ARGS ?=

.PHONY: help demo test lint clean

help:
	@echo "make demo   run notebooks/examples/hello.ipynb through nbflow (SQLite under ./.nbflow)"
	@echo "make test   run the test suite with pytest -n auto (needs PostgreSQL, see README)"
	@echo "make lint   ruff check ."
	@echo "make clean  remove .venv, .nbflow and caches"
	@echo "variables:  PYTHON=$(PYTHON)  PYTEST_ARGS='$(PYTEST_ARGS)'"

# The virtual environment, created once. nbflow needs Python 3.11 or newer.
$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
	  echo "make: nbflow needs Python 3.11+, but $(PYTHON) is $$($(PYTHON) -V 2>&1); use make PYTHON=python3.11" >&2; \
	  exit 1; }
	$(PYTHON) -m venv $(VENV) || { \
	  echo "make: could not create $(VENV) (on Debian/Ubuntu: apt-get install python3-venv)" >&2; \
	  rm -rf $(VENV); exit 1; }

# Installs, redone only when pyproject.toml is newer than the stamp. A venv made before the distribution
# was renamed nbflow-orchestrator still holds the old editable "nbflow": removed first, so that one
# install owns the nbflow package (pip says "Skipping" where there is none).
$(VENV)/.installed-base: pyproject.toml | $(BIN)/python
	$(PIP) uninstall -y -q nbflow
	$(PIP) install -e .
	@touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(PIP) uninstall -y -q nbflow
	$(PIP) install -e '.[test]'
	@touch $@

demo: $(VENV)/.installed-base
	$(BIN)/nbflow run notebooks/examples/hello.ipynb -p name Ada -p n 3
	$(BIN)/nbflow runs --limit 5

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -n auto $(PYTEST_ARGS)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .nbflow .pytest_cache .ruff_cache build dist *.egg-info
	find . -path ./.git -prune -o \( -name __pycache__ -o -name .ipynb_checkpoints \) -type d -prune \
	  -exec rm -rf {} +
