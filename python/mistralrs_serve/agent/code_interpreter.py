"""The code interpreter: one persistent, sandboxed Python process per agent
session (variables survive between calls), driven by python_kernel.py. A run
returns its stdout, stderr and traceback, its matplotlib figures as PNG files,
and the files it wrote in the session directory, stored through the Files API.
A timeout or a cancel kills the process; the next call starts a fresh one and
says the state was lost."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import secrets
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mistralrs_serve.agent import python_kernel
from mistralrs_serve.agent.sandbox import TRUNCATED_NOTE, Sandbox, kill, wait_or_cancel
from mistralrs_serve.agent.tool import OutputFile, ServerTool, ToolContext, ToolOutput, ToolSpec
from mistralrs_serve.agent.workdir_files import changed_files, snapshot, store, surface
from mistralrs_serve.config import AgentConfig

logger = logging.getLogger(__name__)

_KERNEL_SOURCE = Path(python_kernel.__file__).read_text()
_LOST_NOTE = (
    "the previous interpreter was stopped: this is a fresh one, earlier variables and imports are gone"
)

PYTHON_SPEC = ToolSpec(
    name="python",
    description=(
        "Run Python code in a persistent, sandboxed interpreter: variables and imports stay between "
        "calls. Returns what the code prints (stdout and stderr), the value of a final expression, and "
        "the traceback if it raises. The working directory is the session's directory: files written "
        "there are returned to the user, and matplotlib figures left open are returned as PNG images. "
        "No network access."
    ),
    parameters={
        "type": "object",
        "properties": {"code": {"type": "string", "description": "The Python code to run."}},
        "required": ["code"],
        "additionalProperties": False,
    },
    kind="code_interpreter",
)
RESET_SPEC = ToolSpec(
    name="python_reset",
    description="Restart the Python interpreter of the python tool: all variables and imports are cleared.",
    parameters={"type": "object", "properties": {}, "required": [], "additionalProperties": False},
    kind="code_interpreter",
)


class _CappedText:
    """Bytes kept up to a cap; the rest is counted as dropped."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.kept = bytearray()
        self.truncated = False

    def add(self, data: bytes) -> None:
        room = self.max_bytes - len(self.kept)
        if len(data) > room:
            self.truncated = True
            data = data[: max(room, 0)]
        self.kept += data

    def text(self) -> str:
        text = self.kept.decode("utf-8", errors="replace")
        return text + TRUNCATED_NOTE if self.truncated else text


@dataclass
class _Kernel:
    proc: asyncio.subprocess.Process
    results: asyncio.StreamReader
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass
class _RunOutcome:
    stdout: _CappedText
    stderr: _CappedText
    reply: dict[str, Any] | None = None  # None: the process ended or was stopped mid-run
    stopped: str | None = None  # "timeout" or "cancelled"


class CodeInterpreter:
    """The `python` and `python_reset` tools, and the sessions' interpreter processes."""

    def __init__(self, cfg: AgentConfig, sandbox: Sandbox) -> None:
        self.cfg = cfg
        self.sandbox = sandbox
        self.python = cfg.code_exec_python or sys.executable
        self._kernels: dict[str, _Kernel] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._lost: dict[str, str] = {}  # session id -> why its state was lost (told on the next call)

    def tools(self) -> list[ServerTool]:
        return [_PythonTool(self), _ResetTool(self)]

    def _lock(self, session_id: str) -> asyncio.Lock:
        return self._locks.setdefault(session_id, asyncio.Lock())

    async def run_code(self, code: str, ctx: ToolContext) -> ToolOutput:
        async with self._lock(ctx.session.id):
            workdir = Path(ctx.session.workdir)
            before = await asyncio.to_thread(snapshot, workdir)
            kernel = await self._kernel(ctx.session.id, workdir)
            note = self._lost.pop(ctx.session.id, None)
            try:
                outcome = await self._exchange(kernel, code, ctx.cancelled)
            except BaseException:
                # the caller's task was cancelled mid-run: a half-run kernel would answer the next call
                self._kill_now(ctx.session.id)
                raise
            if outcome.reply is None:
                await self._stop(ctx.session.id)
                self._lost[ctx.session.id] = _LOST_NOTE
            changed = await asyncio.to_thread(changed_files, workdir, before)
            return await self._output(code, outcome, note, changed, ctx)

    async def reset(self, ctx: ToolContext) -> ToolOutput:
        async with self._lock(ctx.session.id):
            await self._stop(ctx.session.id)
            self._lost.pop(ctx.session.id, None)
        return ToolOutput("The Python interpreter was restarted: all variables and imports are cleared.")

    async def close_session(self, session_id: str) -> None:
        """Kill the session's interpreter (the session ended or was deleted)."""
        await self._stop(session_id)
        self._lost.pop(session_id, None)
        self._locks.pop(session_id, None)

    async def aclose(self) -> None:
        """Kill every interpreter (server shutdown)."""
        for session_id in list(self._kernels):
            await self._stop(session_id)

    async def _kernel(self, session_id: str, workdir: Path) -> _Kernel:
        kernel = self._kernels.get(session_id)
        if kernel is not None and kernel.proc.returncode is None:
            return kernel
        if kernel is not None:  # it ended between calls (its CPU-time limit, say)
            self._lost[session_id] = _LOST_NOTE
        read_fd, write_fd = os.pipe()
        try:
            argv = [self.python, "-u", "-c", _KERNEL_SOURCE, str(write_fd)]
            proc = await self.sandbox.spawn(
                argv, workdir, stdin=asyncio.subprocess.PIPE, pass_fds=(write_fd,)
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        results = asyncio.StreamReader(limit=1 << 30)
        loop = asyncio.get_running_loop()
        await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(results), os.fdopen(read_fd, "rb", 0)
        )
        kernel = _Kernel(proc, results)
        self._kernels[session_id] = kernel
        return kernel

    def _kill_now(self, session_id: str) -> None:
        kernel = self._kernels.pop(session_id, None)
        if kernel is not None and kernel.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(kernel.proc.pid, signal.SIGKILL)
            self._lost[session_id] = _LOST_NOTE

    async def _stop(self, session_id: str) -> None:
        kernel = self._kernels.pop(session_id, None)
        if kernel is not None:
            await kill(kernel.proc)

    async def _exchange(self, kernel: _Kernel, code: str, cancelled: asyncio.Event) -> _RunOutcome:
        """Send one cell and collect its output and reply, or stop at the timeout or a cancel."""
        cap = self.cfg.max_output_bytes
        outcome = _RunOutcome(_CappedText(cap), _CappedText(cap))
        nonce = secrets.token_hex(16)
        proc = kernel.proc
        stdin, stdout, stderr = proc.stdin, proc.stdout, proc.stderr
        if stdin is None or stdout is None or stderr is None:
            raise RuntimeError("the interpreter process was started without pipes")
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            stdin.write(json.dumps({"code": code, "nonce": nonce}).encode() + b"\n")
            await stdin.drain()
        marker = nonce.encode()

        async def collect() -> None:
            _, _, line = await asyncio.gather(
                _read_until(stdout, marker, outcome.stdout),
                _read_until(stderr, marker, outcome.stderr),
                kernel.results.readline(),
            )
            outcome.reply = json.loads(line) if line else None

        ended = await wait_or_cancel(collect(), self.cfg.code_exec_timeout_s, cancelled)
        if ended is not True:
            outcome.stopped = str(ended)
        return outcome

    async def _output(
        self, code: str, outcome: _RunOutcome, note: str | None, changed: list[Path], ctx: ToolContext
    ) -> ToolOutput:
        """The tool message and the Responses `code_interpreter_call` outputs of one run."""
        reply = outcome.reply or {}
        error = reply.get("error") or self._failure(outcome)
        parts = [f"[note] {note}"] if note else []
        stdout, stderr = outcome.stdout.text(), outcome.stderr.text()
        parts += [stdout] if stdout else []
        parts += [f"[stderr]\n{stderr}"] if stderr else []
        parts += [f"[error]\n{error}"] if error else []
        logs = "\n".join(parts)
        outputs: list[dict[str, Any]] = [{"type": "logs", "logs": logs}]
        files: list[OutputFile] = []
        lines: list[str] = []
        for n, image in enumerate(reply.get("images") or [], start=1):
            stored = await store(ctx, base64.b64decode(image), f"figure_{n}.png", "image/png")
            if stored is not None:
                files.append(stored)
                outputs.append({"type": "image", "url": f"/v1/files/{stored.file_id}/content"})
            lines.append(f"figure {n}: " + ("returned to the user as an image" if stored else "not kept"))
        for path in changed:
            lines.append(await surface(path, ctx, files))
        if lines:
            parts.append("[files]\n" + "\n".join(lines))
        text = "\n".join(parts) if parts else "(the code ran and printed nothing)"
        details = {"code": code, "outputs": outputs}
        return ToolOutput(text, is_error=bool(error), files=files, details=details)

    def _failure(self, outcome: _RunOutcome) -> str | None:
        """Why a run has no reply, and the lost state the next call will mention too."""
        if outcome.reply is not None:
            return None
        if outcome.stopped == "timeout":
            why = f"the code ran past the {self.cfg.code_exec_timeout_s:g} s limit and was stopped"
        elif outcome.stopped == "cancelled":
            why = "the run was cancelled and the interpreter stopped"
        else:
            why = "the Python process ended (a memory, CPU-time or process limit, or os._exit)"
        return f"{why}; the interpreter's state (variables, imports) was lost, the next call starts afresh"


class _PythonTool:
    def __init__(self, interpreter: CodeInterpreter) -> None:
        self.spec = PYTHON_SPEC
        self.interpreter = interpreter

    async def run(self, arguments: dict[str, Any], ctx: ToolContext) -> ToolOutput:
        code = arguments.get("code")
        if not isinstance(code, str):
            return ToolOutput("The python tool needs a `code` string argument.", is_error=True)
        return await self.interpreter.run_code(code, ctx)


class _ResetTool:
    def __init__(self, interpreter: CodeInterpreter) -> None:
        self.spec = RESET_SPEC
        self.interpreter = interpreter

    async def run(self, arguments: dict[str, Any], ctx: ToolContext) -> ToolOutput:
        return await self.interpreter.reset(ctx)


async def _read_until(stream: asyncio.StreamReader, marker: bytes, into: _CappedText) -> None:
    """Read stream into `into` until marker (excluded) or end of file."""
    pending = bytearray()
    try:
        while chunk := await stream.read(1 << 16):
            pending += chunk
            at = pending.find(marker)
            if at >= 0:
                del pending[at:]
                return
            # keep a possible partial marker back; everything before it is output
            safe = len(pending) - (len(marker) - 1)
            if safe > 0:
                into.add(bytes(pending[:safe]))
                del pending[:safe]
    finally:  # the end of file, a timeout or a cancel: what came is still output
        into.add(bytes(pending))
