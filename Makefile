# Two commands set up a fresh machine: `make example` (train on the bundled Criteo sample) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup example test bench clean

$(BIN)/deepfm: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU build of torch first: a plain `pip install torch` would pull a multi-GB CUDA build
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev,serve,export,tune]"
	touch $(BIN)/deepfm

setup: $(BIN)/deepfm

example: setup
	$(BIN)/deepfm train examples/criteo/config.yaml --output runs/criteo
	$(BIN)/deepfm predict runs/criteo examples/criteo/data/test.tsv --output runs/criteo-predictions.csv

test: setup
	$(BIN)/python -m pytest tests

# the speed benchmark against DeepCTR-Torch, FuxiCTR and torchrec (installs them in bench/.envs; long)
bench: setup
	$(BIN)/python bench/run_all.py

clean:
	rm -rf runs .cache examples/*/.cache
