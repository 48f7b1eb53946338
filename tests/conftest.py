"""Shared fixtures: the default model is loaded once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import torch

# Triton kernels run under Triton's interpreter without a GPU; the variable
# must be set before Triton is first imported (pytest imports this file first).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import tempfile

import pytest

# Stored responses and files of servers started by tests go to a scratch
# directory, never to the user's data directory.
os.environ.setdefault("MISTRALRS_SERVE_DATA_DIR", tempfile.mkdtemp(prefix="mistralrs-serve-test-data-"))

# Test data lives in the repository (tests/data/README.md says where each file comes from).
DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="session")
def default_runner():  # type: ignore[no-untyped-def]
    from mistralrs_serve import Runner, Which

    return Runner(which=Which.Default())
