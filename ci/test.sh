#!/usr/bin/env bash
# Every test tier, in order of cost: static checks, the Rust crates (and the
# CPU crate on emulated aarch64 cores), the CPU pytest suite, seconds-long
# benchmark smoke runs, then the wheels built and installed where no Rust
# toolchain is (the aarch64 one under qemu-user).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
# servers started by tests and benchmarks store responses and files in a scratch directory
MISTRALRS_SERVE_DATA_DIR=$(mktemp -d)
export MISTRALRS_SERVE_DATA_DIR
trap 'rm -rf "$MISTRALRS_SERVE_DATA_DIR"' EXIT
# the sandbox of server-side code and shell commands (bubblewrap, Debian's): its tests run, never skip
if ! command -v bwrap >/dev/null; then
    apt-get update -qq && apt-get install -y -qq bubblewrap >/dev/null
fi
# the chat page's tests drive Debian's Chromium through its chromedriver
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
fi
# the shared store's tests start Debian's PostgreSQL server in a temporary directory (tests/pg_server.py)
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
bash ci/lint.sh
cargo test --release
bash ci/aarch64.sh kernels
$BIN/python -m pytest -q -ra
$BIN/python bench/decode.py --smoke
$BIN/python bench/throughput.py --smoke
$BIN/python bench/throughput.py --smoke --model random:tiny
$BIN/python bench/compare_peers.py --smoke
$BIN/python bench/serve.py --smoke
$BIN/python bench/structured.py --smoke
$BIN/python bench/responses_api.py --smoke
$BIN/python bench/agent_tools.py --smoke
$BIN/python bench/models.py --smoke
$BIN/python bench/embeddings.py --smoke
$BIN/python bench/audio.py --smoke
$BIN/python bench/soak.py --smoke
# the prebuilt wheels, installed where no Rust toolchain is (README: Installing the prebuilt wheels)
bash ci/wheels.sh build
bash ci/wheels.sh check
bash ci/aarch64.sh wheel
