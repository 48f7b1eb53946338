#!/usr/bin/env bash
# Static checks: Rust format and lints, Python lints and types, the .pyi stub, the tree's layout rules.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
cargo fmt --all --check
cargo clippy --workspace --all-targets --release -- -D warnings
$BIN/ruff check python tests bench kernels ci
$BIN/mypy
$BIN/python -m mypy.stubtest mistralrs_serve._native --allowlist ci/stubtest-allowlist.txt
$BIN/python ci/check_layout.py
