"""The sandbox the code interpreter and the shell run in: Debian's bubblewrap
(`bwrap`) with every namespace unshared, a minimal read-only root, the session
directory as the only writable place, and rlimits set by a tiny launcher inside.
`Sandbox.command` turns an argv and a working directory into what to start;
`Sandbox.spawn` and `Sandbox.run` start it with capped output and a wall clock.

Network: "none" and "loopback" both get bwrap's fresh network namespace, whose
only interface is its own `lo`: processes inside the sandbox may talk to each
other over it, nothing outside (the host's loopback included) is reachable.

Processes: RLIMIT_NPROC does not bind uid 0, so when the server runs as root the
launcher drops to an unprivileged uid chosen per working directory (no user
namespace, so the limit counts that uid's processes on the host); otherwise
bwrap's user namespace makes the count per sandbox. With `--sandbox off` only
the memory, CPU, file-size and core limits apply."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mistralrs_serve.config import AgentConfig
from mistralrs_serve.errors import MistralrsServeError

logger = logging.getLogger(__name__)

TRUNCATED_NOTE = "\n[output truncated]"
# The host directories a sandbox sees (read-only); everything else (/root, /home,
# /work, the data directory, /var, /run, /sys) is absent. Symlinks stay symlinks.
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
# Per-workdir uids for root servers: far from real accounts, stable per directory.
_UID_BASE, _UID_SPAN = 2_000_000_000, 1_000_000
_MAX_CHOWN_ENTRIES = 20_000
# After the process exits, how long its pipes may stay open (a background child) before it is killed.
_DRAIN_GRACE_S = 1.0

# Runs inside the sandbox before the command: rlimits, then (root servers) the
# unprivileged uid, then exec. Limits come as NAME:soft:hard,... ; uid -1 keeps the uid.
_LAUNCHER = """
import os, resource, sys
for item in filter(None, sys.argv[1].split(",")):
    name, soft, hard = item.split(":")
    which = getattr(resource, name)
    cur_hard = resource.getrlimit(which)[1]
    hard = int(hard) if cur_hard == resource.RLIM_INFINITY else min(int(hard), cur_hard)
    resource.setrlimit(which, (min(int(soft), hard), hard))
uid = int(sys.argv[2])
if uid >= 0:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
os.execvp(sys.argv[3], sys.argv[3:])
"""


class SandboxUnavailableError(MistralrsServeError):
    """`--sandbox on` where bubblewrap is missing or does not work on this machine."""


@dataclass(frozen=True)
class SandboxRun:
    """What one command did: its output (each stream capped), and how it ended."""

    stdout: str
    stderr: str
    exit_code: int | None  # None when it was killed for the timeout or a cancel
    timed_out: bool = False
    cancelled: bool = False


@dataclass(frozen=True)
class SandboxLimits:
    memory_bytes: int
    cpu_s: int
    max_procs: int
    file_bytes: int  # the largest file a sandboxed process may write

    @classmethod
    def from_config(cls, cfg: AgentConfig) -> SandboxLimits:
        memory = cfg.sandbox_memory_mb << 20
        # One file may be as large as the memory cap: a bound on what a run can leave on disk per file.
        return cls(memory, cfg.sandbox_cpu_s, cfg.sandbox_max_procs, memory)

    def launcher_arg(self, *, with_nproc: bool) -> str:
        items = [
            f"RLIMIT_AS:{self.memory_bytes}:{self.memory_bytes}",
            # SIGXCPU at the soft limit, SIGKILL a second later
            f"RLIMIT_CPU:{self.cpu_s}:{self.cpu_s + 1}",
            f"RLIMIT_FSIZE:{self.file_bytes}:{self.file_bytes}",
            "RLIMIT_CORE:0:0",
        ]
        if with_nproc:
            items.append(f"RLIMIT_NPROC:{self.max_procs}:{self.max_procs}")
        return ",".join(items)


class Sandbox:
    """Starts commands confined (bubblewrap) or, with `bwrap=None`, with rlimits only."""

    def __init__(
        self,
        *,
        bwrap: str | None,
        limits: SandboxLimits,
        python: str,
        visible_paths: Sequence[str] = (),
    ) -> None:
        self.bwrap = bwrap
        self.limits = limits
        self.python = python  # the interpreter tools run; its directory leads PATH
        self.visible_paths = tuple(visible_paths)  # read-only extras: the interpreters' prefixes
        self.is_root = os.geteuid() == 0

    @property
    def is_isolated(self) -> bool:
        return self.bwrap is not None

    @classmethod
    def from_config(cls, cfg: AgentConfig) -> Sandbox:
        """The sandbox `cfg.sandbox` asks for: "on" raises SandboxUnavailableError
        when bubblewrap is missing or fails its probe; "auto" falls back with a warning."""
        python = cfg.code_exec_python or sys.executable
        limits = SandboxLimits.from_config(cfg)
        paths = _python_paths(python) + _python_paths(sys.executable)
        if cfg.sandbox == "off":
            logger.warning("sandbox off: code and shell tools run unconfined, with rlimits only")
            return cls(bwrap=None, limits=limits, python=python)
        bwrap = shutil.which("bwrap")
        problem = "bubblewrap (bwrap) is not on PATH" if bwrap is None else None
        if bwrap is not None:
            candidate = cls(bwrap=bwrap, limits=limits, python=python, visible_paths=paths)
            problem = candidate.probe()
            if problem is None:
                return candidate
        if cfg.sandbox == "on":
            raise SandboxUnavailableError(
                f"--sandbox on: {problem}; install bubblewrap (Debian: apt-get install bubblewrap) "
                "or choose --sandbox auto/off"
            )
        logger.warning(
            "sandbox auto: %s, so code and shell tools run UNCONFINED (rlimits only: no filesystem, "
            "network or process isolation); install bubblewrap, or pass --sandbox on to refuse to start",
            problem,
        )
        return cls(bwrap=None, limits=limits, python=python)

    def probe(self) -> str | None:
        """None when a trivial command runs in this sandbox, else what went wrong."""
        with tempfile.TemporaryDirectory(prefix="mistralrs-sandbox-probe-") as tmp:
            workdir = Path(tmp)
            self.prepare(workdir)
            argv = self.command([self.python, "-c", "import os; open('probe', 'w').write('ok')"], workdir)
            try:
                done = subprocess.run(argv, capture_output=True, timeout=30, env=self.environment(workdir))
            except (OSError, subprocess.TimeoutExpired) as e:
                return f"bubblewrap failed to start: {e}"
            if done.returncode != 0 or not (workdir / "probe").exists():
                err = done.stderr.decode(errors="replace").strip()[-400:]
                return f"bubblewrap does not work here (exit {done.returncode}: {err})"
        return None

    def sandbox_uid(self, workdir: Path) -> int:
        """The uid a root server's sandboxed processes run as (-1: the server's own)."""
        if not (self.is_root and self.is_isolated):
            return -1
        digest = hashlib.sha256(str(workdir.resolve()).encode()).digest()
        return _UID_BASE + int.from_bytes(digest[:4], "big") % _UID_SPAN

    def prepare(self, workdir: Path) -> None:
        """Create the working directory and hand it to the sandbox's uid (root servers)."""
        workdir.mkdir(parents=True, exist_ok=True)
        uid = self.sandbox_uid(workdir)
        if uid < 0:
            return
        entries = [workdir]
        for root, dirs, files in os.walk(workdir):
            entries += [Path(root, name) for name in dirs + files]
            if len(entries) > _MAX_CHOWN_ENTRIES:
                break
        for path in entries:
            with contextlib.suppress(OSError):
                if path.lstat().st_uid != uid:
                    os.lchown(path, uid, uid)

    def environment(self, workdir: Path) -> dict[str, str]:
        """The whole environment a sandboxed process gets (nothing of the server's)."""
        bin_dir = os.path.dirname(os.path.abspath(self.python))
        return {
            "PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(workdir),
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "TMPDIR": "/tmp",
            "MPLBACKEND": "Agg",
            # caches go to the private /tmp, not into the session's files
            "MPLCONFIGDIR": "/tmp/.matplotlib",
            "XDG_CACHE_HOME": "/tmp/.cache",
            "PYTHONDONTWRITEBYTECODE": "1",
            # one BLAS thread: pools of threads count against the process cap and the address space
            "OPENBLAS_NUM_THREADS": "1",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }

    def command(self, argv: Sequence[str], workdir: Path) -> list[str]:
        """The argv to start: the launcher (rlimits, uid), inside bubblewrap when isolated."""
        workdir = workdir.resolve()
        launch = [
            sys.executable,
            "-S",
            "-c",
            _LAUNCHER,
            self.limits.launcher_arg(with_nproc=self.is_isolated),
            str(self.sandbox_uid(workdir)),
            *argv,
        ]
        if self.bwrap is None:
            return launch
        return [self.bwrap, *self._bwrap_args(workdir), "--", *launch]

    def _bwrap_args(self, workdir: Path) -> list[str]:
        args = ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
        if self.is_root:
            # No user namespace (its uid 0 would map to the host's root, whom RLIMIT_NPROC
            # exempts): the launcher needs these two capabilities to drop to the sandbox uid.
            args += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        else:
            args += ["--unshare-user"]
        args += ["--die-with-parent", "--new-session"]
        for path in SYSTEM_PATHS:
            if os.path.islink(path):
                args += ["--symlink", os.readlink(path), path]
            elif os.path.isdir(path):
                args += ["--ro-bind", path, path]
        args += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--tmpfs", "/tmp"]
        args += ["--perms", "1777", "--tmpfs", "/dev/shm"]
        made: set[str] = set()
        for path in self.visible_paths:
            if not _under(path, SYSTEM_PATHS):
                args += [*_parents(path, made), "--ro-bind", path, path]
        args += [*_parents(str(workdir), made), "--bind", str(workdir), str(workdir)]
        args += ["--remount-ro", "/", "--chdir", str(workdir), "--clearenv"]
        for name, value in self.environment(workdir).items():
            args += ["--setenv", name, value]
        return args

    async def spawn(self, argv: Sequence[str], workdir: Path, **kwargs: Any) -> asyncio.subprocess.Process:
        """Start argv in the sandbox in its own process group (stdout and stderr piped
        unless kwargs say otherwise); the caller ends it with `kill`."""
        await asyncio.to_thread(self.prepare, workdir)
        kwargs.setdefault("stdout", asyncio.subprocess.PIPE)
        kwargs.setdefault("stderr", asyncio.subprocess.PIPE)
        kwargs.setdefault("stdin", asyncio.subprocess.DEVNULL)
        return await asyncio.create_subprocess_exec(
            *self.command(argv, workdir),
            cwd=workdir,
            env=self.environment(workdir),
            start_new_session=True,
            **kwargs,
        )

    async def run(
        self,
        argv: Sequence[str],
        workdir: Path,
        *,
        timeout_s: float,
        max_output_bytes: int,
        cancelled: asyncio.Event | None = None,
    ) -> SandboxRun:
        """Run argv to completion, the timeout, or `cancelled`, whichever comes first."""
        proc = await self.spawn(argv, workdir)
        streams = [s for s in (proc.stdout, proc.stderr) if s is not None]  # both piped by spawn
        readers = [asyncio.create_task(read_capped(s, max_output_bytes)) for s in streams]
        try:
            ended = await wait_or_cancel(proc.wait(), timeout_s, cancelled)
            if ended is not True:
                await kill(proc)
            (out, _), (err, _) = await finish_readers(proc, readers)
        finally:
            await kill(proc)
            for task in readers:
                task.cancel()
        exit_code = proc.returncode if ended is True else None
        return SandboxRun(out, err, exit_code, timed_out=ended == "timeout", cancelled=ended == "cancelled")


async def wait_or_cancel(awaitable: Any, timeout_s: float, cancelled: asyncio.Event | None) -> bool | str:
    """True when awaitable finished, else "timeout" or "cancelled" (the awaitable is cancelled)."""
    main = asyncio.ensure_future(awaitable)
    waiters: set[asyncio.Future[Any]] = {main}
    stop = asyncio.ensure_future(cancelled.wait()) if cancelled is not None else None
    if stop is not None:
        waiters.add(stop)
    try:
        done, _ = await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for fut in waiters:
            if not fut.done():
                fut.cancel()
    if main in done:
        return True
    return "cancelled" if stop is not None and stop in done else "timeout"


async def kill(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL the process group (bwrap's --die-with-parent then ends the whole sandbox) and reap it."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    await proc.wait()


async def finish_readers(
    proc: asyncio.subprocess.Process, readers: list[asyncio.Task[tuple[str, bool]]]
) -> list[tuple[str, bool]]:
    """The readers' text once the pipes close; a background child still holding them
    after a grace period is killed with its group, and what was read is kept."""
    _, pending = await asyncio.wait(readers, timeout=_DRAIN_GRACE_S)
    if pending:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        await asyncio.wait(pending, timeout=_DRAIN_GRACE_S)
    return [task.result() if task.done() and not task.cancelled() else ("", False) for task in readers]


async def read_capped(stream: asyncio.StreamReader, max_bytes: int) -> tuple[str, bool]:
    """All of stream, keeping the first max_bytes (the rest is read and dropped so the
    writer never blocks); the text ends with TRUNCATED_NOTE when something was dropped."""
    kept = bytearray()
    truncated = False
    with contextlib.suppress(asyncio.CancelledError):
        while chunk := await stream.read(1 << 16):
            room = max_bytes - len(kept)
            if len(chunk) > room:
                truncated = True
                chunk = chunk[: max(room, 0)]
            kept += chunk
    text = kept.decode("utf-8", errors="replace")
    return (text + TRUNCATED_NOTE if truncated else text), truncated


def _under(path: str, roots: Sequence[str]) -> bool:
    real_roots = {os.path.realpath(r) for r in roots} | set(roots)
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in real_roots)


def _parents(path: str, made: set[str]) -> list[str]:
    """bwrap arguments creating path's missing ancestors world-traversable (bwrap makes them 0700)."""
    args: list[str] = []
    parts = Path(path).parts[1:-1]
    for i in range(len(parts)):
        parent = "/" + "/".join(parts[: i + 1])
        # /tmp is the sandbox's own tmpfs (1777): only the directories below it are made
        if parent not in made and parent != "/tmp" and not _under(parent, SYSTEM_PATHS):
            made.add(parent)
            args += ["--perms", "0755", "--dir", parent]
    return args


@functools.lru_cache(maxsize=8)
def _python_paths(python: str) -> tuple[str, ...]:
    """The directories an interpreter needs: its prefix and base prefix (a venv and
    the Python it was made from) and where its executable really lives."""
    found = {os.path.dirname(os.path.dirname(os.path.realpath(python)))}
    if os.path.abspath(python) == os.path.abspath(sys.executable):
        found |= {sys.prefix, sys.base_prefix}
    else:
        script = "import sys; print(sys.prefix); print(sys.base_prefix)"
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            done = subprocess.run([python, "-c", script], capture_output=True, text=True, timeout=30)
            found |= {line for line in done.stdout.splitlines() if line.startswith("/")}
    found |= {os.path.realpath(p) for p in found}
    # a venv's bin/python is a symlink: its own directory must be visible too
    found.add(os.path.dirname(os.path.dirname(os.path.abspath(python))))
    return tuple(sorted(p for p in found if p and p != "/" and os.path.isdir(p)))
