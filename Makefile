# The README's two commands: `make demo` (set up, then the quickstart run) and `make test` (set up, then
# ruff, mypy and the whole test suite, Ray tests included: CI runs it). `make test-quick` skips the Ray tests.
# Every install goes through constraints.txt, which pins torch to the CPU wheel.
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed-stamp

.PHONY: setup demo lint test test-quick

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -c constraints.txt -e ".[dev,distributed]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rlp train configs/quickstart.yaml

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/python -m pytest -q

test-quick: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not ray"
