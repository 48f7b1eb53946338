"""The `mistralrs-serve` command as a user runs it: answers, and clean errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mistralrs_serve.models.default_model import default_model_path


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "mistralrs_serve.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)


def test_run_answers_a_prompt() -> None:
    out = cli("run", "--prompt", "What is the capital of France?", "--max-tokens", "12", "--stats")
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    assert "tok/s" in out.stderr


def test_help_lists_the_model_flag() -> None:
    out = cli("run", "--help")
    assert out.returncode == 0
    assert "--model" in out.stdout and "--prompt" in out.stdout


def bad_model_error(model: str) -> str:
    out = cli("run", "-m", model, "--prompt", "hi", "--max-tokens", "2")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    assert "error:" in out.stderr
    return out.stderr


def test_unknown_path_is_a_clean_error(tmp_path: Path) -> None:
    err = bad_model_error(str(tmp_path / "nope.gguf"))
    assert "nope.gguf" in err and "no such file" in err


def test_truncated_gguf_is_a_clean_error(tmp_path: Path) -> None:
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(default_model_path().read_bytes()[:5_000_000])
    err = bad_model_error(str(bad))
    assert "cut.gguf" in err and "truncated" in err


def test_not_a_gguf_is_a_clean_error(tmp_path: Path) -> None:
    bad = tmp_path / "junk.gguf"
    bad.write_bytes(b"not a model at all" * 10)
    err = bad_model_error(str(bad))
    assert "junk.gguf" in err and "not a GGUF" in err


def test_directory_without_model_files_is_a_clean_error(tmp_path: Path) -> None:
    err = bad_model_error(str(tmp_path))
    assert str(tmp_path) in err


@pytest.mark.parametrize("template", ["{% if %}", "{{ raise_exception('template says no') }}"])
def test_bad_chat_template_is_a_clean_error(tmp_path: Path, template: str) -> None:
    path = tmp_path / "t.jinja"
    path.write_text(template)
    out = cli("run", "-c", str(path), "--prompt", "hi", "--max-tokens", "2")
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr and "error:" in out.stderr
