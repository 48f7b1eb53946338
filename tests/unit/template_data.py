"""Where the real chat templates of tests/data live, and the marker
that skips a test, with the reason, when that folder is absent."""

from __future__ import annotations

from pathlib import Path

import pytest

TESTDATA = Path(__file__).resolve().parents[1] / "data"
TEMPLATE_DIR = TESTDATA / "chat_templates"
MISSING_TESTDATA = (
    f"chat template test data not found at {TEMPLATE_DIR} (tests/data is part of the repository)"
)
needs_templates = pytest.mark.skipif(not TEMPLATE_DIR.is_dir(), reason=MISSING_TESTDATA)


def read_template(filename: str) -> str:
    """A template's source; skips the test when the file is absent."""
    path = TEMPLATE_DIR / filename
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return path.read_text(encoding="utf-8")
