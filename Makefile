# Two entry points (see README): `make run` (the main job) and `make test` (the whole suite).
# Each creates the project's virtual environment on first use; nothing else to install by hand.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# A CPU build of torch: on this kind of machine pip takes 2.13.0 from local disk in seconds.
TORCH  ?= torch==2.13.0

.PHONY: run test test-fast lint bench env notebooks
env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test,examples]"
	touch $@

run: env
	$(BIN)/python examples/finetune_minilm.py $(ARGS)

lint: env
	$(BIN)/ruff check funcpeft tests examples benchmarks notebooks
	$(BIN)/ruff format --check funcpeft tests examples benchmarks notebooks
	$(BIN)/mypy funcpeft tests

test: lint
	$(BIN)/python -m pytest -n 2 --durations=15 $(PYTEST_ARGS)

# the inner loop: everything not marked slow (see CONTRIBUTING.md)
test-fast: env
	$(BIN)/python -m pytest -n 2 -m "not slow" --durations=10 $(PYTEST_ARGS)

bench: env
	$(BIN)/python benchmarks/bench_core.py

# Regenerate notebooks/*.ipynb from their jupytext sources notebooks/NN_*.py, executed (see notebooks/README.md).
notebooks: env
	$(BIN)/python notebooks/sync.py
