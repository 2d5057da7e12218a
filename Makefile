# Two entry points for a fresh machine: `make run` (the main job) and `make test`.
# Both create the virtual environment on first use. torch is pinned for setup only
# (a local CPU build here); the package itself accepts any torch >= 2.13 (pyproject.toml).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0

.PHONY: setup run test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_PIN)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

run: setup
	$(BIN)/engram demo

test: setup
	$(BIN)/python -m pytest -q
	$(BIN)/ruff check src tests benchmarks examples

lint: setup
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

bench: setup
	$(BIN)/python benchmarks/bench_hashing.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .ruff_cache
