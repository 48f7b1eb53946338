"""Files a server-side tool wrote in the session directory, returned through
the Files API: a snapshot of the directory before a run, the files that are new
or changed after it, and each stored (within the caps) with a line for the
model that says what became of it. The code interpreter and the shell share it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

from mistralrs_serve.agent.tool import OutputFile, ToolContext

logger = logging.getLogger(__name__)

OUTPUT_PURPOSE = "assistants_output"
MAX_OUTPUT_FILES = 20  # files surfaced per run; the rest are only named
MAX_OUTPUT_FILE_BYTES = 32 << 20
MAX_SCANNED_FILES = 5000  # of the session directory, before and after a run


async def surface(path: Path, ctx: ToolContext, files: list[OutputFile]) -> str:
    """Store one written file (within the caps) and say so for the model."""
    name = path.as_posix()
    full = Path(ctx.session.workdir) / path
    size = full.stat().st_size if full.exists() else 0
    if len(files) >= MAX_OUTPUT_FILES or size > MAX_OUTPUT_FILE_BYTES:
        return f"{name} ({size} bytes): written, not returned (too many or too large)"
    try:
        content = await asyncio.to_thread(full.read_bytes)
    except OSError as e:
        return f"{name}: written, unreadable ({e.strerror})"
    stored = await store(ctx, content, path.name, None)
    if stored is None:
        return f"{name} ({size} bytes): written"
    files.append(stored)
    return f"{name} ({size} bytes): written, returned to the user as file {stored.file_id}"


async def store(
    ctx: ToolContext, content: bytes, filename: str, content_type: str | None
) -> OutputFile | None:
    if ctx.files is None:
        return None
    try:
        stored = await asyncio.to_thread(
            ctx.files.create, content, filename=filename, purpose=OUTPUT_PURPOSE, content_type=content_type
        )
    except Exception:  # the run's output still goes back; the file is named as not kept
        logger.exception("storing the tool output file %s failed", filename)
        return None
    return OutputFile(stored.id, stored.filename, stored.bytes, stored.content_type)


def snapshot(workdir: Path) -> dict[Path, tuple[int, int]]:
    """(mtime, size) of the session directory's visible files, by relative path."""
    found: dict[Path, tuple[int, int]] = {}
    if not workdir.is_dir():
        return found
    for root, dirs, names in os.walk(workdir):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # caches and config (HOME is here)
        for name in names:
            if name.startswith(".") or len(found) >= MAX_SCANNED_FILES:
                continue
            path = Path(root, name)
            with contextlib.suppress(OSError):
                st = path.lstat()
                if path.is_file() and not path.is_symlink():
                    found[path.relative_to(workdir)] = (st.st_mtime_ns, st.st_size)
    return found


def changed_files(workdir: Path, before: dict[Path, tuple[int, int]]) -> list[Path]:
    after = snapshot(workdir)
    return sorted(path for path, stamp in after.items() if before.get(path) != stamp)
