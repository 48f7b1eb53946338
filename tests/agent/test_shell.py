"""The shell tool (agent/shell.py) through its tool API, in the bubblewrap sandbox:
commands in the session directory, exit codes, `shell_call_output` shapes, the
time limits, cancel, the output cap, and the sandbox's limits met from a shell."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from mistralrs_serve.agent.sandbox import TRUNCATED_NOTE, Sandbox
from mistralrs_serve.agent.shell import ShellExecutor
from mistralrs_serve.agent.tool import ToolContext, ToolOutput
from mistralrs_serve.config import AgentConfig

OPENAPI = Path(__file__).resolve().parents[1] / "data" / "openapi" / "openai-openapi.yaml"
CFG = AgentConfig(
    sandbox="on", sandbox_memory_mb=512, sandbox_max_procs=24, shell_timeout_s=2, max_output_bytes=2048
)


@dataclass
class Session:
    id: str
    workdir: Path


class Shell:
    def __init__(self, tmp_path: Path) -> None:
        self.loop = asyncio.new_event_loop()
        [self.tool] = ShellExecutor(CFG, Sandbox.from_config(CFG)).tools()
        self.session = Session("sess-1", tmp_path / "work")

    def __call__(self, *commands: str, cancelled: asyncio.Event | None = None, **extra: Any) -> ToolOutput:
        ctx = ToolContext(self.session, cancelled or asyncio.Event(), None)
        return self.loop.run_until_complete(self.tool.run({"commands": list(commands), **extra}, ctx))


@pytest.fixture
def sh(tmp_path: Path) -> Iterator[Shell]:
    shell = Shell(tmp_path)
    yield shell
    shell.loop.close()


def test_the_tool_the_model_sees(sh: Shell) -> None:
    spec = sh.tool.spec
    assert spec.name == "shell" and spec.kind == "shell"
    assert spec.parameters["required"] == ["commands"]
    assert set(spec.parameters["properties"]) == {"commands", "timeout_ms"}


def test_commands_run_in_order_in_the_session_directory(sh: Shell) -> None:
    out = sh("pwd", "echo one > f.txt", "cat f.txt; echo oops >&2; exit 3")
    assert out.is_error  # one command failed
    workdir = str(sh.session.workdir.resolve())
    assert out.details["commands"] == ["pwd", "echo one > f.txt", "cat f.txt; echo oops >&2; exit 3"]
    assert out.details["output"] == [
        {"stdout": workdir + "\n", "stderr": "", "outcome": {"type": "exit", "exit_code": 0}},
        {"stdout": "", "stderr": "", "outcome": {"type": "exit", "exit_code": 0}},
        {"stdout": "one\n", "stderr": "oops\n", "outcome": {"type": "exit", "exit_code": 3}},
    ]
    assert f"$ pwd\n{workdir}\n[exit code 0]" in out.text and "[stderr]\noops\n[exit code 3]" in out.text
    assert (sh.session.workdir / "f.txt").read_text() == "one\n"  # files stay between calls
    assert not sh("cat f.txt").is_error


def test_output_matches_openai_shell_call_output_content(sh: Shell) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    names = [f"FunctionShellCallOutput{kind}" for kind in ("Content", "TimeoutOutcome", "ExitOutcome")]
    content, timeout, exit_ = (_openapi_schema(name) for name in names)
    content["properties"] = dict(content["properties"])
    outcomes = [timeout, exit_]
    content["properties"]["outcome"] = {"oneOf": outcomes}
    out = sh("echo ok", "sleep 5", timeout_ms=300)
    for item in out.details["output"]:
        jsonschema.validate(item, content)
    assert [o["outcome"]["type"] for o in out.details["output"]] == ["exit", "timeout"]


def _openapi_schema(name: str) -> Any:
    """One schema of OpenAI's document, parsed alone (the whole document takes seconds to load)."""
    lines = OPENAPI.read_text().splitlines()
    start = lines.index(f"    {name}:")
    end = next(i for i in range(start + 1, len(lines)) if not lines[i].startswith("     "))
    return yaml.safe_load("\n".join(lines[start:end]))[name]


def test_timeout_kills_the_command_and_the_next_one_runs(sh: Shell) -> None:
    started = time.monotonic()
    out = sh("echo before; sleep 30", "echo after")
    assert time.monotonic() - started < 6
    first, second = out.details["output"]
    assert first["outcome"] == {"type": "timeout"} and first["stdout"] == "before\n"
    assert second == {"stdout": "after\n", "stderr": "", "outcome": {"type": "exit", "exit_code": 0}}
    assert "[timed out after 2 s" in out.text
    assert not sh("true").is_error


def test_timeout_ms_is_capped_by_the_server(sh: Shell) -> None:
    started = time.monotonic()
    out = sh("sleep 10", timeout_ms=60_000)
    assert out.details["output"][0]["outcome"] == {"type": "timeout"}
    assert time.monotonic() - started < 6
    quick = sh("sleep 10", timeout_ms=200)
    assert "[timed out after 0.2 s" in quick.text


def test_cancel_kills_the_command_and_skips_the_rest(sh: Shell) -> None:
    async def scenario() -> ToolOutput:
        cancelled = asyncio.Event()
        asyncio.get_running_loop().call_later(0.3, cancelled.set)
        ctx = ToolContext(sh.session, cancelled, None)
        return await sh.tool.run({"commands": ["sleep 30", "echo never"]}, ctx)

    out = sh.loop.run_until_complete(scenario())
    assert len(out.details["output"]) == 1 and "[cancelled" in out.text


def test_bad_arguments_are_a_tool_error(sh: Shell) -> None:
    cases: list[dict[str, Any]] = [{}, {"commands": []}, {"commands": [1]}, {"commands": ["true"] * 100}]
    for arguments in cases:
        ctx = ToolContext(sh.session, asyncio.Event(), None)
        out = sh.loop.run_until_complete(sh.tool.run(arguments, ctx))
        assert out.is_error and "commands" in out.text.lower()


def test_output_is_capped(sh: Shell) -> None:
    out = sh("head -c 10000000 /dev/zero | tr '\\0' x")
    stdout = out.details["output"][0]["stdout"]
    assert stdout == "x" * CFG.max_output_bytes + TRUNCATED_NOTE
    assert out.details["output"][0]["outcome"] == {"type": "exit", "exit_code": 0}


def test_a_shell_fork_bomb_is_stopped(sh: Shell) -> None:
    started = time.monotonic()
    out = sh("bomb() { bomb | bomb & }; bomb; sleep 1; echo done")
    assert time.monotonic() - started < 8
    assert out.details["output"][0]["outcome"]["type"] in ("exit", "timeout")
    assert sh("echo alive").details["output"][0]["stdout"] == "alive\n"


def test_reads_writes_and_sockets_outside_are_denied(sh: Shell, tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_text("private")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.3)
        port = listener.getsockname()[1]
        out = sh(
            f"cat {tmp_path / 'secret.txt'}",
            f"cat {__file__}",
            "echo x > /etc/escape",
            f"echo x > {tmp_path / 'escape'}",
            f"python -c \"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)\"",
        )
        with pytest.raises(TimeoutError):
            listener.accept()
    assert all(o["outcome"]["exit_code"] != 0 for o in out.details["output"]), out.text
    assert "private" not in out.text and not (tmp_path / "escape").exists()
    assert sh("echo next").details["output"][0]["stdout"] == "next\n"
