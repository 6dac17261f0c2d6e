# `make test` and `make demo` work from a fresh clone: they create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is the reference of the parity tests and what optserver_client.torch and the torch demo
# use. Pinned, so that pip takes the CPU wheel where one is provided locally; elsewhere pass
# TORCH_INDEX=https://download.pytorch.org/whl/cpu to avoid the multi-GB CUDA build.
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
PIP := $(BIN)/python -m pip
# The Python client generator whose output the tests import and drive.
GENERATOR ?= openapi-python-client==0.29.0

.PHONY: install install-demo test lint format demo demo-torch bench clean

install-demo: $(VENV)/.demo-installed

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# What the demo needs, and no more: the server, the client and scikit-learn (its dataset).
$(VENV)/.demo-installed: $(BIN)/python pyproject.toml client/pyproject.toml Makefile
	@echo "== installing the server, the client and the demo's scikit-learn into $(VENV)"
	$(PIP) install --progress-bar on -e ./client -e '.[demo]'
	touch $@

# The torch demo's one addition: torch (CPU).
$(VENV)/.torch-installed: $(VENV)/.demo-installed
	@echo "== installing torch (CPU) into $(VENV)"
	$(PIP) install --progress-bar on '$(TORCH)' $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	touch $@

# The test tooling on top: test extras, torch (CPU), a client generator (its own directory:
# it pins an older typer than ours), the TypeScript generator's packages, and chromium.
$(VENV)/.installed: $(VENV)/.torch-installed scripts/typescript-client/package-lock.json
	@echo "== installing the test tooling into $(VENV)"
	$(PIP) install --progress-bar on -e ./client -e '.[test,demo]'
	$(PIP) install --quiet --upgrade --target $(VENV)/tools '$(GENERATOR)'
	npm ci --prefix scripts/typescript-client --no-audit --no-fund
	bash scripts/ensure_chromium.sh
	touch $@

install: $(VENV)/.installed

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Line and branch coverage of optserver and optserver_client, the servers that tests start in
# child processes included ([tool.coverage] in pyproject.toml); fails under its floor.
test: install lint
	$(BIN)/python -m pytest --cov --cov-report=term

# Four worker processes train a small MLP on scikit-learn's digits through an embedded server.
demo: $(VENV)/.demo-installed
	$(BIN)/optserver demo $(DEMO_ARGS)

# The same with a torch model and training loop, RemoteOptimizer as the optimizer.
demo-torch: $(VENV)/.torch-installed
	$(BIN)/optserver demo --framework torch $(DEMO_ARGS)

bench: install
	$(BIN)/python benchmarks/optim_step.py
	$(BIN)/python benchmarks/step_roundtrip.py

clean:
	rm -rf $(VENV) scripts/typescript-client/node_modules .pytest_cache .mypy_cache .ruff_cache

# The compose stack for real (docker-compose.yml, then with compose/compose.shards.yml): a Docker
# engine of its own, a local base image, offline wheels, three workers training through one
# server, then through two shards. Root, Debian; see the script.
.PHONY: compose-test
compose-test: install
	VENV=$(VENV) bash scripts/compose_test.sh

# The Swarm stack (deploy/swarm/stack.yml) for real: a one-node swarm on a Docker engine of its
# own (the compose test's machinery and cache), a shard killed mid-run, then checks that no
# acknowledged step was lost. Root, Debian; see the script.
.PHONY: swarm-test
swarm-test: install-demo
	VENV=$(VENV) bash scripts/swarm_test.sh
