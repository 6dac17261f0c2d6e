# `make test` and `make demo` work from a fresh clone: they create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is only the reference of the parity tests. Pinned, so that pip takes the CPU wheel where
# one is provided locally; elsewhere pass TORCH_INDEX=https://download.pytorch.org/whl/cpu to
# avoid the multi-GB CUDA build.
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
PIP := $(BIN)/python -m pip

.PHONY: install test lint format demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml client/pyproject.toml Makefile
	$(PIP) install --quiet -e ./client -e '.[test,demo]'
	$(PIP) install --quiet '$(TORCH)' $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	touch $@

install: $(VENV)/.installed

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: install lint
	$(BIN)/python -m pytest

# Four worker processes train a small MLP on scikit-learn's digits through an embedded server.
demo: install
	$(BIN)/optserver demo $(DEMO_ARGS)

bench: install
	$(BIN)/python benchmarks/optim_step.py
	$(BIN)/python benchmarks/step_roundtrip.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# The compose stack for real (docker-compose.yml): a Docker engine of its own, a local base image,
# offline wheels, three workers training through the server. Root, Debian; see the script.
.PHONY: compose-test
compose-test: install
	VENV=$(VENV) bash scripts/compose_test.sh
