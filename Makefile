# `make run`: the whole pipeline on the embedded default (Gemma 3 270M, CPU unless a GPU is present).
# `make test`: every test that needs no GPU. Both create .venv and install into it on first use.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SERVE  := $(VENV)/.installed-serve
CONFIG ?= configs/default.yaml
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: run test test-gpu setup clean-outputs

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# Without CUDA, take the CPU build of torch first (pip finds it on local disk); with CUDA, pip's default.
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install torch==2.13.0; fi
	$(PIP) install -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/instructflow run --config $(CONFIG)

# The llama.cpp server (extra `serve`) is the real peer of the openai backend's tests; `make run` skips it.
$(SERVE): $(STAMP)
	$(PIP) install -e '.[dev,serve]'
	touch $(SERVE)

test: $(SERVE)
	$(BIN)/python -m pytest -m "not gpu" tests

test-gpu: $(STAMP)
	$(BIN)/python -m pytest -m gpu tests

clean-outputs:
	rm -rf data/runs data/artifacts
