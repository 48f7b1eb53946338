"""The shell tool: each command runs with `/bin/sh -c` in the session directory,
inside the sandbox, one after the other, each under a time limit and with its
output capped. Its result has the shape of OpenAI's `shell_call_output` items;
files the commands wrote come back through the Files API (workdir_files.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from mistralrs_serve.agent.sandbox import Sandbox, SandboxRun
from mistralrs_serve.agent.tool import OutputFile, ServerTool, ToolContext, ToolOutput, ToolSpec
from mistralrs_serve.agent.workdir_files import changed_files, snapshot, surface
from mistralrs_serve.config import AgentConfig

MAX_COMMANDS = 32  # per call

SHELL_SPEC = ToolSpec(
    name="shell",
    description=(
        "Run shell commands (POSIX sh) in a sandboxed Linux environment, one after the other, in the "
        "session's working directory, which keeps its files between calls. Returns each command's "
        "stdout, stderr and exit code. No network access; the rest of the filesystem is read-only."
    ),
    parameters={
        "type": "object",
        "properties": {
            "commands": {
                "type": "array",
                "items": {"type": "string"},
                "description": "The commands to run, in order; each runs in its own `sh -c`.",
            },
            "timeout_ms": {
                "type": "integer",
                "description": "Time limit of each command in milliseconds (the server's limit caps it).",
            },
        },
        "required": ["commands"],
        "additionalProperties": False,
    },
    kind="shell",
)


class ShellExecutor:
    """The `shell` tool over a sandbox."""

    def __init__(self, cfg: AgentConfig, sandbox: Sandbox) -> None:
        self.cfg = cfg
        self.sandbox = sandbox

    def tools(self) -> list[ServerTool]:
        return [_ShellTool(self)]

    def timeout_s(self, timeout_ms: Any) -> float:
        """The model's timeout_ms when it is a positive integer, never past --shell-timeout."""
        limit = self.cfg.shell_timeout_s
        if isinstance(timeout_ms, int) and not isinstance(timeout_ms, bool) and timeout_ms > 0:
            return min(timeout_ms / 1000, limit)
        return limit

    async def run_commands(self, commands: list[str], timeout_s: float, ctx: ToolContext) -> ToolOutput:
        results: list[dict[str, Any]] = []
        texts: list[str] = []
        workdir = Path(ctx.session.workdir)
        before = await asyncio.to_thread(snapshot, workdir)
        for command in commands:
            done = await self.sandbox.run(
                ["/bin/sh", "-c", command],
                Path(ctx.session.workdir),
                timeout_s=timeout_s,
                max_output_bytes=self.cfg.max_output_bytes,
                cancelled=ctx.cancelled,
            )
            results.append(_output_item(done))
            texts.append(_describe(command, done, timeout_s))
            if done.cancelled:
                break  # the rest is not run: the request is gone
        is_error = any(r["outcome"] != {"type": "exit", "exit_code": 0} for r in results)
        details = {"commands": list(commands), "output": results}
        files: list[OutputFile] = []
        written = [
            await surface(path, ctx, files)
            for path in await asyncio.to_thread(changed_files, workdir, before)
        ]
        if written:
            texts.append("[files]\n" + "\n".join(written))
        return ToolOutput("\n\n".join(texts), is_error=is_error, files=files, details=details)


class _ShellTool:
    def __init__(self, executor: ShellExecutor) -> None:
        self.spec = SHELL_SPEC
        self.executor = executor

    async def run(self, arguments: dict[str, Any], ctx: ToolContext) -> ToolOutput:
        commands = arguments.get("commands")
        if isinstance(commands, str):
            commands = [commands]
        if not isinstance(commands, list) or not commands or not all(isinstance(c, str) for c in commands):
            return ToolOutput("The shell tool needs `commands`: a non-empty list of strings.", is_error=True)
        if len(commands) > MAX_COMMANDS:
            return ToolOutput(f"At most {MAX_COMMANDS} commands per call.", is_error=True)
        timeout_s = self.executor.timeout_s(arguments.get("timeout_ms"))
        return await self.executor.run_commands(commands, timeout_s, ctx)


def _output_item(done: SandboxRun) -> dict[str, Any]:
    """One `shell_call_output` content entry: stdout, stderr and the outcome."""
    if done.exit_code is None:
        # a cancelled command ended like a timed-out one: killed before it exited
        outcome: dict[str, Any] = {"type": "timeout"}
    else:
        outcome = {"type": "exit", "exit_code": _exit_code(done.exit_code)}
    return {"stdout": done.stdout, "stderr": done.stderr, "outcome": outcome}


def _exit_code(returncode: int) -> int:
    """The shell's convention for a signal death (128 + signal), not Python's negative code."""
    return 128 - returncode if returncode < 0 else returncode


def _describe(command: str, done: SandboxRun, timeout_s: float) -> str:
    """What the model reads of one command."""
    lines = [f"$ {command}"]
    if done.stdout:
        lines.append(done.stdout.rstrip("\n"))
    if done.stderr:
        lines.append("[stderr]\n" + done.stderr.rstrip("\n"))
    if done.cancelled:
        lines.append("[cancelled: the command was killed]")
    elif done.timed_out:
        lines.append(f"[timed out after {timeout_s:g} s: the command was killed]")
    else:
        lines.append(f"[exit code {_exit_code(done.exit_code or 0)}]")
    return "\n".join(lines)
