"""The real CLI server as a subprocess, for tests that kill it or break what it stands on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx


def start(
    data_dir: Path,
    port: int,
    log: Path,
    *extra: str,
    env: dict[str, str] | None = None,
    failed: bool = False,
) -> subprocess.Popen[bytes]:
    """`mistralrs-serve serve --data-dir data_dir -p port *extra`, once /health answers 200
    (with `failed`: once it answers that a model failed to load)."""
    cmd = [sys.executable, "-m", "mistralrs_serve.cli", "serve", "--data-dir", str(data_dir), "-p", str(port)]
    env = {**os.environ, "MISTRALRS_SERVE_DATA_DIR": str(data_dir / "not-this-one"), **(env or {})}
    proc = subprocess.Popen([*cmd, *extra], stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
            if health.status_code == 200 and not failed:
                return proc
            if failed and health.status_code == 503 and health.json()["status"] == "failed":
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("the server did not become healthy:\n" + log.read_text()[-3000:])


def kill_hard(proc: subprocess.Popen[bytes]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            kill_hard(proc)
