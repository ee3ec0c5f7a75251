# `make run`: the whole pipeline on the embedded default (Gemma 3 270M, CPU unless a GPU is present).
# `make test`: every test that needs no GPU. Both create .venv and install into it on first use.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SERVE  := $(VENV)/.installed-serve
CONFIG ?= configs/default.yaml
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: run test test-gpu setup system-deps clean-outputs

# Debian packages the tests use: PostgreSQL under the Prefect server, headless Chromium for the UI test,
# docker-compose (1.29) to validate docker-compose.yml. Installed once when missing (root, or sudo).
TEST_DEBS := postgresql chromium chromium-driver docker-compose
SUDO      := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# Without CUDA, take the CPU build of torch first (pip finds it on local disk); with CUDA, pip's default.
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install torch==2.13.0; fi
	$(PIP) install -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/instructflow run --config $(CONFIG)

# The llama.cpp server (extra `serve`) is the real peer of the openai backend's tests, and the tests start a
# local Ray cluster (extra `ray`); `make run` needs neither.
# pip compiles llama.cpp here, portably (no -march=native): a native build crashed at its first completion
# on an Intel Xeon VM with AVX-512 and AMX (a general protection fault in libggml-cpu; the portable build
# runs), and pip's wheel cache can carry a build to another machine. CMAKE_ARGS set by you wins.
$(SERVE): $(STAMP)
	CMAKE_ARGS="$${CMAKE_ARGS:--DGGML_NATIVE=OFF}" $(PIP) install -e '.[dev,serve,ray]'
	touch $(SERVE)

system-deps:
	@if ! command -v dpkg >/dev/null 2>&1; then echo "not Debian: install $(TEST_DEBS) yourself, or those tests skip"; exit 0; fi; \
	missing=$$(for p in $(TEST_DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages for the tests:" $$missing; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	fi

test: $(SERVE) system-deps
	$(BIN)/python -m pytest -m "not gpu" --durations=30 tests

test-gpu: $(STAMP)
	$(BIN)/python -m pytest -m gpu tests

clean-outputs:
	rm -rf data/runs data/artifacts
