# The README's two commands: `make demo` and `make test`. Both create .venv and install everything first.
PYTHON ?= python3
VENV ?= .venv
# torch goes in first and pinned, so that nothing pulls a multi-GB CUDA build on CPU machines.
# Users with their own CUDA build: `make TORCH_SPEC='torch' ...` or install torch yourself first.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.hctembed-installed

.PHONY: setup demo test test-fast lint bench clean peers

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

# the authors' packages of other models, as test references (tests/test_peer_references.py): pure-Python
# wheels without their dependencies (torch, MONAI, huggingface_hub come from .venv; the parts of merlin-vlm
# that need transformers, torchvision or peft are never imported)
PEERS := .peers/.installed
$(PEERS): $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps --target .peers merlin-vlm==0.0.7 lighter-zoo==0.1.3 \
	  || echo "warning: could not install the peers' packages; their reference tests will be skipped" >&2
	# torchvision only for the model code merlin-vlm builds its ResNet from (the torch 2.13 pair; see
	# tests/peer_merlin_reference.py), in .peers/ so that it never enters hctembed's own environment
	$(BIN)/python -m pip install --quiet --no-deps --target .peers torchvision==0.28.0 \
	  || echo "warning: could not install torchvision into .peers; the Merlin encoder reference test will be skipped" >&2
	mkdir -p .peers && touch $(PEERS)

peers: $(PEERS)

test: lint peers
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

bench: setup
	$(BIN)/python benchmarks/preprocess_speed.py

clean:
	rm -rf $(VENV) .peers demo-out .pytest_cache .ruff_cache *.egg-info
