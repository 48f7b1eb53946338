"""The driver of the code interpreter's persistent Python process. Its source is
handed to the sandboxed interpreter with `-c` (the package itself is not visible
in the sandbox), so it uses the standard library only.

Protocol: the server writes one JSON object per line on stdin,
`{"code": ..., "nonce": ...}`; the user's prints go to the real stdout and stderr
(so subprocesses and C libraries are captured too), each closed by the nonce once
the run ends; the result goes as one JSON line on the private result pipe whose
fd is argv[1]: `{"nonce", "error": traceback text or null, "images": [base64 PNG]}`.
"""

from __future__ import annotations

import ast
import base64
import contextlib
import io
import json
import linecache
import os
import resource
import signal
import sys
import traceback
from typing import Any

MAX_IMAGE_BYTES = 8 << 20  # of all figures of one run together


def _compile_cell(code: str, filename: str) -> tuple[Any, Any]:
    """The cell's statements, and its last expression apart so its value can be shown (as a REPL does)."""
    tree = ast.parse(code, filename, "exec")
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body[-1].value)
        tree.body.pop()
    body = compile(tree, filename, "exec")
    return body, (compile(last, filename, "eval") if last is not None else None)


def _run_cell(code: str, number: int, namespace: dict[str, Any]) -> str | None:
    """Run one cell; the traceback text of what it raised, None when it ran through."""
    filename = f"<cell {number}>"
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    try:
        body, last = _compile_cell(code, filename)
        exec(body, namespace)
        if last is not None:
            value = eval(last, namespace)
            if value is not None:
                print(repr(value))
        return None
    except BaseException as e:  # SystemExit and KeyboardInterrupt too: the kernel lives on
        frames = traceback.extract_tb(e.__traceback__)
        # drop this driver's own frames: the model reads only its code's
        skip = next((i for i, f in enumerate(frames) if f.filename.startswith("<cell")), len(frames))
        tb = e.__traceback__
        for _ in range(skip):
            tb = tb.tb_next if tb is not None else None
        return "".join(traceback.format_exception(type(e), e, tb))


def _figures() -> list[str]:
    """The open matplotlib figures as base64 PNGs (then closed), within MAX_IMAGE_BYTES."""
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is None:
        return []
    images, total = [], 0
    for number in plt.get_fignums():
        buffer = io.BytesIO()
        try:
            plt.figure(number).savefig(buffer, format="png")
        except Exception as e:  # a broken figure must not lose the others
            print(f"[figure {number} could not be saved: {e}]", file=sys.stderr)
            continue
        total += buffer.tell()
        if total > MAX_IMAGE_BYTES:
            print(f"[figure {number} left out: figures over {MAX_IMAGE_BYTES} bytes]", file=sys.stderr)
            continue
        images.append(base64.b64encode(buffer.getvalue()).decode())
    plt.close("all")
    return images


def _reap() -> None:
    """Collect the cell's exited children: zombies would count against the process cap for good."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


def _session_pids() -> list[int]:
    """The other live processes of this interpreter's session (the cell's children and theirs).
    The session, not the uid: unsandboxed, the uid is the server's."""
    me, session = os.getpid(), os.getsid(0)
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in (me, 1):  # 1: bubblewrap's init, when sandboxed
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == session and fields[0] != "Z":  # fields: state, ppid, pgrp, session
            found.append(int(name))
    return found


def _free_process_cap(hit_cap: bool) -> str | None:
    """When a cell ran into the process cap or left it nearly full (a fork bomb's
    copies still forking), kill the session's other processes so the next cell
    can start some; say so."""
    cap = resource.getrlimit(resource.RLIMIT_NPROC)[0]
    pids = _session_pids()
    if not pids or (not hit_cap and (cap == resource.RLIM_INFINITY or len(pids) + 2 < cap)):
        return None
    for _ in range(200):  # each pass kills what the last one's survivors forked
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        _reap()
        pids = _session_pids()
        if not pids:
            break
    return "[the process cap was reached: the cell's other processes were killed]\n"


def _flush(*streams: Any) -> None:
    for stream in streams:
        with contextlib.suppress(Exception):  # the cell may have closed or replaced it
            stream.flush()


def main() -> None:
    kernel_pid = os.getpid()
    # past the file-size limit a write fails (EFBIG, an exception in the cell) instead of killing the kernel
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    commands = os.fdopen(os.dup(0), "rb")
    results = os.fdopen(int(sys.argv[1]), "wb")
    os.set_inheritable(results.fileno(), False)  # user subprocesses must not write the protocol
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)  # input() sees end of file instead of the protocol
    sys.path.insert(0, os.getcwd())
    namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": __builtins__}
    for number, line in enumerate(commands, start=1):
        request = json.loads(line)
        _reap()  # children that ended since the last cell (a fork bomb's stragglers) free their slots
        error = _run_cell(request["code"], number, namespace)
        if os.getpid() != kernel_pid:
            os._exit(0)  # a child the cell forked returned here: it must not answer
        _reap()
        # a fork that failed for want of a process slot raises BlockingIOError (EAGAIN)
        freed = _free_process_cap(hit_cap=error is not None and "BlockingIOError" in error.splitlines()[-1])
        if freed:
            sys.stderr.write(freed)
        images = _figures()
        marker = request["nonce"]
        _flush(sys.stdout, sys.stderr)
        for stream in (sys.__stdout__, sys.__stderr__):  # the real fds, whatever the cell rebound
            if stream is not None:
                stream.write(marker)
                stream.flush()
        reply = {"nonce": marker, "error": error, "images": images}
        results.write(json.dumps(reply).encode() + b"\n")
        results.flush()


if __name__ == "__main__":
    main()
