"""The code interpreter (agent/code_interpreter.py) through its tool API, in the
bubblewrap sandbox: state that persists, reset, exceptions, figures and written
files through the Files API, timeout and cancel; and every sandbox limit met from
inside (reading and writing outside the directory, a socket, a fork bomb, memory,
an endless loop, a huge print), each stopped with the next call in the session
still working."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mistralrs_serve.agent.code_interpreter import CodeInterpreter
from mistralrs_serve.agent.sandbox import TRUNCATED_NOTE, Sandbox
from mistralrs_serve.agent.tool import ToolContext, ToolOutput
from mistralrs_serve.config import AgentConfig
from mistralrs_serve.store.db import SqliteDatabase
from mistralrs_serve.store.files import SqlFileStore, read_all

MEMORY_MB = 768  # room for numpy and matplotlib, small enough to pass in a test
CFG = AgentConfig(
    sandbox="on",
    sandbox_memory_mb=MEMORY_MB,
    sandbox_max_procs=24,
    code_exec_timeout_s=3,
    max_output_bytes=4096,
)


@dataclass
class Session:
    id: str
    workdir: Path


class Harness:
    """One interpreter and one session, called as the agent loop calls the tools."""

    def __init__(self, tmp_path: Path, cfg: AgentConfig = CFG, *, with_files: bool = True) -> None:
        self.loop = asyncio.new_event_loop()
        self.interpreter = CodeInterpreter(cfg, Sandbox.from_config(cfg))
        self.python, self.reset = self.interpreter.tools()
        self.session = Session("sess-1", tmp_path / "work")
        self.files = SqlFileStore(SqliteDatabase(tmp_path / "store")) if with_files else None

    def context(self, cancelled: asyncio.Event | None = None) -> ToolContext:
        return ToolContext(self.session, cancelled or asyncio.Event(), self.files)

    def __call__(self, code: str) -> ToolOutput:
        return self.loop.run_until_complete(self.python.run({"code": code}, self.context()))

    def close(self) -> None:
        self.loop.run_until_complete(self.interpreter.aclose())
        self.loop.close()


@pytest.fixture
def py(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    yield harness
    harness.close()


def test_the_tools_the_model_sees(py: Harness) -> None:
    assert py.python.spec.name == "python" and py.python.spec.kind == "code_interpreter"
    assert py.python.spec.parameters["required"] == ["code"]
    assert py.reset.spec.name == "python_reset" and py.reset.spec.kind == "code_interpreter"
    assert py.reset.spec.parameters["properties"] == {}


def test_variables_persist_between_calls(py: Harness) -> None:
    assert py("x = 20\nimport math").text == "(the code ran and printed nothing)"
    code = "print(x + 1)\nmath.sqrt(x * 5)"
    out = py(code)
    assert out.text == "21\n10.0\n" and not out.is_error
    assert out.details == {"code": code, "outputs": [{"type": "logs", "logs": out.text}]}


def test_reset_clears_the_state(py: Harness) -> None:
    py("x = 1")
    reset = py.loop.run_until_complete(py.reset.run({}, py.context()))
    assert not reset.is_error and "restarted" in reset.text
    out = py("x")
    assert out.is_error and "NameError" in out.text


def test_exceptions_come_back_as_tracebacks_of_the_cell(py: Harness) -> None:
    out = py("print('partial')\nimport sys\nprint('warn', file=sys.stderr)\n{}['missing']")
    assert out.is_error
    assert out.text.startswith("partial\n")
    assert "[stderr]\nwarn" in out.text
    assert "KeyError: 'missing'" in out.text and '"<cell 1>", line 4' in out.text
    assert "python_kernel" not in out.text and "_run_cell" not in out.text  # the driver stays hidden
    assert py("print('next')").text == "next\n"
    syntax = py("def broken(:\n  pass")
    assert syntax.is_error and "SyntaxError" in syntax.text


def test_sys_exit_and_input_do_not_end_the_session(py: Harness) -> None:
    py("kept = 'yes'")
    assert "SystemExit" in py("import sys; sys.exit(3)").text
    assert "EOFError" in py("input('?')").text
    assert py("print(kept)").text == "yes\n"


def test_matplotlib_figures_come_back_as_png_files(py: Harness) -> None:
    out = py("import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.title('t')\nprint('plotted')")
    assert not out.is_error, out.text
    [image] = out.files
    assert image.filename == "figure_1.png" and image.content_type == "image/png"
    assert out.details["outputs"][1] == {"type": "image", "url": f"/v1/files/{image.file_id}/content"}
    stored, content = read_all(py.files, image.file_id)  # type: ignore[arg-type]
    assert content.startswith(b"\x89PNG\r\n\x1a\n") and stored.purpose == "assistants_output"
    assert "figure 1" in out.text
    assert py("print(len(plt.get_fignums()))").files == []  # figures are closed once returned


def test_files_written_in_the_directory_are_stored(py: Harness) -> None:
    out = py("import os\nos.makedirs('out', exist_ok=True)\nopen('out/data.csv', 'w').write('a,b\\n1,2\\n')")
    [written] = out.files
    assert written.filename == "data.csv" and written.bytes == 8
    assert read_all(py.files, written.file_id)[1] == b"a,b\n1,2\n"  # type: ignore[arg-type]
    assert f"out/data.csv (8 bytes): written, returned to the user as file {written.file_id}" in out.text
    assert (py.session.workdir / "out" / "data.csv").exists()
    assert py("print(open('out/data.csv').read())").files == []  # read, not written: not returned again
    assert len(py("open('out/data.csv', 'a').write('3,4\\n')").files) == 1


def test_without_a_file_store_files_are_named_only(tmp_path: Path) -> None:
    harness = Harness(tmp_path, with_files=False)
    try:
        out = harness("open('note.txt', 'w').write('hi')")
        assert out.files == [] and "note.txt (2 bytes): written" in out.text
    finally:
        harness.close()


def test_timeout_kills_the_interpreter_and_the_next_call_starts_afresh(py: Harness) -> None:
    py("x = 1")
    out = py("print('started', flush=True)\nwhile True:\n    pass")
    assert out.is_error and out.text.startswith("started\n")
    assert "3 s limit" in out.text and "state" in out.text
    after = py("print('alive')\nx")
    assert after.text.startswith("[note] the previous interpreter was stopped")
    assert "alive" in after.text and "NameError" in after.text
    assert py("print('fine')").text == "fine\n"


def test_cancel_kills_the_run(py: Harness) -> None:
    async def cancelled_run() -> ToolOutput:
        cancelled = asyncio.Event()
        asyncio.get_running_loop().call_later(0.5, cancelled.set)
        return await py.python.run({"code": "import time\ntime.sleep(30)"}, py.context(cancelled))

    started = py.loop.time()
    out = py.loop.run_until_complete(cancelled_run())
    assert out.is_error and "cancelled" in out.text
    assert py.loop.time() - started < 3
    assert "fresh" in py("print(1)").text


def test_bad_arguments_are_a_tool_error(py: Harness) -> None:
    out = py.loop.run_until_complete(py.python.run({"source": "1"}, py.context()))
    assert out.is_error and "code" in out.text


# ---- the sandbox's limits, from inside ----


def test_files_outside_the_directory_cannot_be_read(py: Harness, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    home_file = Path.home() / ".bashrc"
    out = py(
        "import os\n"
        f"for p in [{str(secret)!r}, {__file__!r}, {str(home_file)!r}, '/proc/1/environ']:\n"
        "    try:\n"
        "        print(p, 'READ', open(p).read()[:20])\n"
        "    except OSError as e:\n"
        "        print(p, 'denied', type(e).__name__)\n"
    )
    assert "READ" not in out.text.replace("/proc/1/environ READ", ""), out.text
    assert "private" not in out.text
    # /proc/1 is the sandbox's own init, not the host's: its environment is not the server's
    assert "MISTRALRS" not in out.text
    assert py("print('next')").text == "next\n"


def test_nothing_outside_the_directory_can_be_written(py: Harness, tmp_path: Path) -> None:
    targets = ["/etc/escape", "/usr/escape", "/escape", str(tmp_path / "escape"), __file__ + ".escape"]
    out = py(
        f"for p in {targets!r}:\n"
        "    try:\n"
        "        open(p, 'w').write('x')\n"
        "        print(p, 'WROTE')\n"
        "    except OSError as e:\n"
        "        print(p, 'denied', type(e).__name__)\n"
        "open('/tmp/scratch', 'w').write('private tmp works')\n"
    )
    assert "WROTE" not in out.text and out.text.count("denied") == len(targets), out.text
    assert not (tmp_path / "escape").exists() and not Path(__file__ + ".escape").exists()
    assert py("print(open('/tmp/scratch').read())").text == "private tmp works\n"


def test_no_socket_reaches_the_host(py: Harness) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.3)
        port = listener.getsockname()[1]
        out = py(
            "import socket\n"
            f"for host, port in [('127.0.0.1', {port}), ('192.0.2.1', 80)]:\n"
            "    try:\n"
            "        socket.create_connection((host, port), timeout=2)\n"
            "        print(host, 'CONNECTED')\n"
            "    except OSError as e:\n"
            "        print(host, 'failed', type(e).__name__)\n"
        )
        with pytest.raises(TimeoutError):
            listener.accept()
    assert "CONNECTED" not in out.text and out.text.count("failed") == 2, out.text
    assert py("print('next')").text == "next\n"


def test_a_fork_bomb_is_stopped(py: Harness) -> None:
    py("kept = 'state'")
    out = py("import os\nwhile True:\n    os.fork()")
    assert out.is_error and "BlockingIOError" in out.text
    assert "process cap was reached" in out.text  # its copies still forking were killed
    # the interpreter survived with its state, and can still start processes
    assert py("import subprocess\nprint(kept, subprocess.run(['true']).returncode)").text == "state 0\n"


def test_the_process_cap_holds(py: Harness) -> None:
    out = py(
        "import os, time\n"
        "pids = []\n"
        "try:\n"
        "    for _ in range(500):\n"
        "        pid = os.fork()\n"
        "        if pid == 0:\n"
        "            time.sleep(20)\n"
        "            os._exit(0)\n"
        "        pids.append(pid)\n"
        "finally:\n"
        "    print('forked', len(pids))\n"
        "    for pid in pids:\n"
        "        os.kill(pid, 9)\n"
        "        os.waitpid(pid, 0)\n"
    )
    forked = int(out.text.split("forked ")[1].split()[0])
    assert 0 < forked < CFG.sandbox_max_procs, out.text


def test_memory_past_the_cap_is_refused(py: Harness) -> None:
    py("kept = 1")
    out = py(f"block = bytearray({(MEMORY_MB + 64) << 20})")
    assert out.is_error and "MemoryError" in out.text
    assert py("print(kept + 1)").text == "2\n"


def test_a_huge_print_is_capped(py: Harness) -> None:
    out = py("print('y' * 50_000_000)\nprint('z' * 10)")
    assert out.text.startswith("y" * 100) and TRUNCATED_NOTE in out.text
    assert len(out.text.encode()) < CFG.max_output_bytes + 200
    assert py("print('next')").text == "next\n"


def test_another_session_gets_its_own_interpreter(py: Harness, tmp_path: Path) -> None:
    py("x = 'first'")
    other = Session("sess-2", tmp_path / "other")
    ctx = ToolContext(other, asyncio.Event(), None)
    out: Any = py.loop.run_until_complete(py.python.run({"code": "import os\nprint(os.getcwd())\nx"}, ctx))
    assert out.text.startswith(str(other.workdir.resolve())) and "NameError" in out.text
    py.loop.run_until_complete(py.interpreter.close_session("sess-2"))
    assert py("print(x)").text == "first\n"


def test_the_cpu_time_limit_ends_the_process(tmp_path: Path) -> None:
    cfg = AgentConfig(sandbox="on", sandbox_memory_mb=MEMORY_MB, sandbox_cpu_s=1, code_exec_timeout_s=20)
    harness = Harness(tmp_path, cfg)
    try:
        started = harness.loop.time()
        out = harness("while True:\n    pass")
        assert harness.loop.time() - started < 10  # the CPU limit, not the 20 s wall clock
        assert out.is_error and "process ended" in out.text
        assert harness("print('again')").text.endswith("again\n")
    finally:
        harness.close()


def test_a_cancelled_caller_leaves_no_half_run_interpreter(py: Harness) -> None:
    py("x = 1")

    async def abandoned() -> None:
        task = asyncio.ensure_future(py.python.run({"code": "import time\ntime.sleep(30)"}, py.context()))
        await asyncio.sleep(0.5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    py.loop.run_until_complete(abandoned())
    out = py("print('next')")
    assert out.text.startswith("[note] the previous interpreter was stopped") and "next\n" in out.text
