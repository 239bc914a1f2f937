# The README's two commands: `make demo` and `make test`. Both create .venv and install everything first.
PYTHON ?= python3
VENV ?= .venv
# torch goes in first and pinned, so that nothing pulls a multi-GB CUDA build on CPU machines.
# Users with their own CUDA build: `make TORCH_SPEC='torch' ...` or install torch yourself first.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.hctembed-installed

.PHONY: setup demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/hctembed demo --out demo-out

lint: setup
	$(BIN)/ruff check hctembed tests benchmarks
	$(BIN)/ruff format --check hctembed tests benchmarks

test: lint
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

bench: setup
	$(BIN)/python benchmarks/preprocess_speed.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache .ruff_cache *.egg-info
