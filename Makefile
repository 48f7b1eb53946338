# The two commands of the README: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Build caches live outside the clone so a fresh clone rebuilds quickly.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/mistralrs-serve/cargo-target
STAMP := $(VENV)/.deps-installed
PROMPT ?= What is the capital of France?

HOST ?= 127.0.0.1
PORT ?= 1234

.PHONY: setup build serve run test lint bench clean

setup: $(STAMP) build

$(STAMP): pyproject.toml kernels/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q 'maturin>=1.7,<2'
	$(BIN)/pip install -q -e kernels
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

# Incremental: cargo rebuilds only what changed (release profile, see pyproject).
build: $(STAMP)
	VIRTUAL_ENV=$(abspath $(VENV)) $(BIN)/maturin develop --release -q

serve: setup
	$(BIN)/mistralrs-serve serve --host $(HOST) --port $(PORT)

run: setup
	$(BIN)/mistralrs-serve run --prompt "$(PROMPT)"

lint: setup
	bash ci/lint.sh

test: setup
	bash ci/test.sh

bench: setup
	$(BIN)/python bench/decode.py

clean:
	rm -rf $(VENV) target build
