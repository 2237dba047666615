# Two commands set up a fresh machine: `make example` (train on the bundled Criteo sample) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Where torch comes from. Empty (the default): plain PyPI, which on Linux x86-64 is the CUDA build (~530 MB plus
# the CUDA libraries) and elsewhere the CPU build. For the CPU-only build on Linux use PyTorch's own index:
#   make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX   ?=
TORCH_VERSION ?= 2.13.0

.PHONY: setup example test bench clean

$(BIN)/deepfm: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, from TORCH_INDEX when set (see above), so that the next line does not choose it
	$(BIN)/pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "torch==$(TORCH_VERSION)"
	$(BIN)/pip install -q -e ".[dev,serve,export,tune,explain]"
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
