# The two commands: `make run` (venv + install + dvc repro) and `make test` (venv + install + all tests).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
MLFLOW_PORT ?= 5000
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install run test test-fast lint bench ui ui-stop frontier clean-stores

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: install
	dvc repro

test: install
	ruff check pipeline stages tests
	HF_HUB_OFFLINE=1 python -m pytest -m "slow or not slow"

test-fast: install
	HF_HUB_OFFLINE=1 python -m pytest -m "not slow"

lint: install
	ruff check pipeline stages tests
