"""Shared fixtures: the default model is loaded once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def default_runner():  # type: ignore[no-untyped-def]
    from mistralrs_serve import Runner, Which

    return Runner(which=Which.Default())
