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

.PHONY: setup build serve run test lint bench lock clean wheels

setup: $(STAMP) build

# Installs take the exact versions CI tested (constraints.txt); `make lock` refreshes them.
$(STAMP): pyproject.toml kernels/pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt 'maturin>=1.7,<2'
	$(BIN)/pip install -q -c constraints.txt -e kernels
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
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

# dist/: the abi3 wheels (manylinux x86_64 and aarch64) and the kernels wheel
wheels: setup
	bash ci/wheels.sh build

test: setup
	bash ci/test.sh

bench: setup
	$(BIN)/python bench/decode.py

# The newest versions the package's ranges allow, resolved in a scratch virtualenv and
# written to constraints.txt; review the diff and run `make test` before committing it.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install -q --upgrade pip
	.venv-lock/bin/pip install -q 'maturin>=1.7,<2' -e kernels -e '.[test]'
	{ echo "# Exact versions CI tested: make serve, make test and CI install with -c constraints.txt."; \
	  echo "# The package keeps its ranges (pyproject.toml). Refresh on purpose with 'make lock', then run 'make test'."; \
	  .venv-lock/bin/pip freeze --exclude-editable | sort -f; } > constraints.txt
	rm -rf .venv-lock

clean:
	rm -rf $(VENV) target build
