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
    out = cli(
        "run",
        "--prompt",
        "What is the capital of France? Answer in one sentence.",
        "--max-tokens",
        "12",
        "--stats",
    )
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


def test_serve_help_and_default_command() -> None:
    out = cli("serve", "--help")
    assert out.returncode == 0
    for flag in ("--port", "--host", "--api-key", "--cors-allowed-origins", "--max-seqs", "--log-format"):
        assert flag in out.stdout, flag
    top = cli("--help")
    assert top.returncode == 0 and "serve" in top.stdout


def test_serve_bad_port_is_a_clean_error() -> None:
    out = cli("-p", "70000")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "--port" in out.stderr


def test_serve_runs_and_stops_on_sigint() -> None:
    """The real command: `mistralrs-serve -p PORT --log-format json` answers over
    HTTP with the official client, then exits 0 on Ctrl-C."""
    import json
    import signal
    import socket
    import time

    import httpx
    import openai

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "mistralrs_serve.cli", "-p", str(port), "--log-format", "json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        res = client.chat.completions.create(
            model="default",
            messages=[{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
            max_tokens=12,
            temperature=0,
        )
        assert "Paris" in (res.choices[0].message.content or "")
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    logged = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert any("serving the OpenAI API" in line["message"] for line in logged)


def test_bad_device_is_a_clean_error() -> None:
    out = cli("run", "--device", "tpu", "--prompt", "hi")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "device must be auto, cpu or cuda" in out.stderr
