"""The sandbox itself (agent/sandbox.py): how each --sandbox mode starts, the
scrubbed environment, the hidden filesystem, the output cap and the wall clock.
The limits as the tools meet them are proved in test_code_interpreter.py and
test_shell.py. These tests need bubblewrap (CI installs it): they fail, not skip,
where it is missing."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from mistralrs_serve.agent.sandbox import TRUNCATED_NOTE, Sandbox, SandboxRun, SandboxUnavailableError
from mistralrs_serve.config import AgentConfig


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def sandbox(**overrides: Any) -> Sandbox:
    cfg = AgentConfig(sandbox=overrides.pop("sandbox", "on"), sandbox_memory_mb=512, **overrides)
    return Sandbox.from_config(cfg)


def python(sb: Sandbox, workdir: Path, code: str, timeout_s: float = 10, cap: int = 1 << 16) -> SandboxRun:
    return run(sb.run([sys.executable, "-c", code], workdir, timeout_s=timeout_s, max_output_bytes=cap))


def test_on_uses_bubblewrap_here() -> None:
    sb = sandbox()
    assert sb.is_isolated, "bubblewrap must be installed and working (apt-get install bubblewrap)"


def test_on_refuses_to_start_without_bubblewrap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap anywhere on it
    with pytest.raises(SandboxUnavailableError, match="bubblewrap"):
        sandbox(sandbox="on")


def test_on_refuses_a_bubblewrap_that_does_not_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SandboxUnavailableError, match=r"does not work here.*namespace"):
        sandbox(sandbox="on")


def test_auto_without_bubblewrap_warns_and_runs_unconfined(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="mistralrs_serve.agent.sandbox"):
        sb = sandbox(sandbox="auto")
    assert not sb.is_isolated
    assert "UNCONFINED" in caplog.text and "bubblewrap" in caplog.text
    done = python(sb, tmp_path / "work", "print(6 * 7)")
    assert (done.stdout, done.exit_code) == ("42\n", 0)


def test_off_runs_with_rlimits_only(tmp_path: Path) -> None:
    sb = sandbox(sandbox="off")
    assert not sb.is_isolated
    done = python(sb, tmp_path / "work", "import os; print(os.getcwd())")
    assert done.stdout.strip() == str((tmp_path / "work").resolve())
    # the memory cap holds without bubblewrap too
    done = python(sb, tmp_path / "work", "b = bytearray(1024 << 20)")
    assert done.exit_code == 1 and "MemoryError" in done.stderr


def test_auto_with_bubblewrap_is_isolated() -> None:
    assert sandbox(sandbox="auto").is_isolated


def test_environment_is_scrubbed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MISTRALRS_TEST_SECRET", "hunter2")
    workdir = tmp_path / "work"
    done = python(sandbox(), workdir, "import os, json; print(json.dumps(dict(os.environ)))")
    env = __import__("json").loads(done.stdout)
    assert "hunter2" not in done.stdout and "MISTRALRS_SERVE_DATA_DIR" not in env
    assert env["HOME"] == str(workdir.resolve()) and env["MPLBACKEND"] == "Agg"
    assert env["LANG"] == "C.UTF-8" and "/usr/bin" in env["PATH"]


def test_only_the_system_the_interpreter_and_the_workdir_are_visible(tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    (tmp_path / "secret.txt").write_text("beside the workdir")
    data_dir = os.environ["MISTRALRS_SERVE_DATA_DIR"]
    code = (
        "import os, sys\n"
        f"for p in [{str(Path(__file__).resolve())!r}, {str(tmp_path / 'secret.txt')!r}, {data_dir!r}]:\n"
        "    print(p, os.path.exists(p))\n"
        "print('pids', sum(n.isdigit() for n in os.listdir('/proc')))\n"
        "print('uid', os.getuid())\n"
    )
    done = python(sandbox(), workdir, code)
    assert done.exit_code == 0, done.stderr
    lines = done.stdout.splitlines()
    assert all(line.endswith(" False") for line in lines[:3]), done.stdout
    # a private pid namespace: the host's processes are not there
    assert int(lines[3].split()[1]) < 10
    if os.geteuid() == 0:  # a root server's sandbox runs as an unprivileged uid
        assert lines[4] != "uid 0"


def test_output_is_capped_and_the_rest_drained(tmp_path: Path) -> None:
    code = "import sys; sys.stdout.write('a' * 5_000_000); sys.stderr.write('b' * 10); print('', end='')"
    done = python(sandbox(), tmp_path / "work", code, cap=1000)
    assert done.stdout == "a" * 1000 + TRUNCATED_NOTE
    assert done.stderr == "b" * 10 and done.exit_code == 0


def test_timeout_kills_the_whole_sandbox(tmp_path: Path) -> None:
    marker = "31337.25"
    code = f"import subprocess as s; s.Popen(['sleep', '{marker}']); s.run(['sleep', '{marker}'])"
    started = time.monotonic()
    done = python(sandbox(), tmp_path / "work", code, timeout_s=1)
    assert done.timed_out and done.exit_code is None
    assert time.monotonic() - started < 6
    time.sleep(0.3)
    assert not _processes_with(f"sleep\0{marker}"), "a sandboxed process outlived the timeout"


def test_cancel_kills_it(tmp_path: Path) -> None:
    async def scenario() -> SandboxRun:
        cancelled = asyncio.Event()
        asyncio.get_running_loop().call_later(0.5, cancelled.set)
        argv = [sys.executable, "-c", "import time; time.sleep(60)"]
        workdir = tmp_path / "work"
        return await sandbox().run(argv, workdir, timeout_s=30, max_output_bytes=100, cancelled=cancelled)

    started = time.monotonic()
    done = run(scenario())
    assert done.cancelled and not done.timed_out and done.exit_code is None
    assert time.monotonic() - started < 5


def test_a_root_server_hands_the_workdir_to_the_sandbox_uid(tmp_path: Path) -> None:
    sb = sandbox()
    workdir = tmp_path / "work"
    (workdir / "sub").mkdir(parents=True)
    (workdir / "sub" / "given.txt").write_text("copied in by the server")
    code = "open('sub/given.txt', 'a').write(' and edited'); open('new.txt', 'w').write('x')"
    done = python(sb, workdir, code)
    assert done.exit_code == 0, done.stderr
    assert (workdir / "sub" / "given.txt").read_text() == "copied in by the server and edited"
    uid = sb.sandbox_uid(workdir)
    if uid >= 0:
        assert (workdir / "new.txt").stat().st_uid == uid
        assert uid != sb.sandbox_uid(tmp_path / "other")


def _processes_with(needle: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found
