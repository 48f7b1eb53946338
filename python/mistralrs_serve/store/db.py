"""The embedded database: one SQLite file (WAL) and a blob directory under
the server's data directory, with a versioned schema migrated on open.

Each thread gets its own connection; writes take the database's write lock
up front (`BEGIN IMMEDIATE`) and wait for it (busy timeout) rather than fail,
so concurrent requests never see "database is locked". Blobs are written to
a temporary name, fsynced and renamed, then recorded in a transaction: a
crash leaves either no row or a complete file.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from mistralrs_serve.errors import MistralrsServeError, StorageFullError

logger = logging.getLogger(__name__)

# Version N is reached by running MIGRATIONS[N - 1]; add a migration, never edit one.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE files (
        id TEXT PRIMARY KEY,
        object_json TEXT NOT NULL,      -- OpenAI's file object, as served
        purpose TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        expires_at INTEGER,
        bytes INTEGER NOT NULL,
        content_type TEXT NOT NULL,
        blob TEXT NOT NULL              -- file name under blobs/
    );
    CREATE INDEX files_by_created ON files (created_at, id);
    CREATE TABLE responses (
        id TEXT PRIMARY KEY,
        created_at INTEGER NOT NULL,
        status TEXT NOT NULL,
        background INTEGER NOT NULL,
        previous_response_id TEXT,
        object_json TEXT NOT NULL,      -- OpenAI's Response object, as served
        state_json TEXT                 -- what continuing it needs beyond the object
    );
    CREATE INDEX responses_by_status ON responses (status);
    CREATE TABLE response_input_items (
        response_id TEXT NOT NULL REFERENCES responses (id) ON DELETE CASCADE,
        position INTEGER NOT NULL,
        item_id TEXT NOT NULL,
        item_json TEXT NOT NULL,
        PRIMARY KEY (response_id, position)
    );
    """,
    # 2: the agentic runtime's sessions (store/sessions.py) and uploaded Skills (store/skills.py)
    """
    CREATE TABLE sessions (
        id TEXT PRIMARY KEY,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        expires_at INTEGER,
        state_json TEXT NOT NULL        -- messages, remembered approvals, produced files
    );
    CREATE INDEX sessions_by_updated ON sessions (updated_at, id);
    CREATE TABLE skills (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        object_json TEXT NOT NULL       -- the Skill object, as served
    );
    CREATE TABLE skill_versions (
        skill_id TEXT NOT NULL REFERENCES skills (id) ON DELETE CASCADE,
        version INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        object_json TEXT NOT NULL,      -- the SkillVersion object, as served
        path TEXT NOT NULL,             -- its directory under --skills-dir
        PRIMARY KEY (skill_id, version)
    );
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)
BUSY_TIMEOUT_MS = 30_000
# a blob without a row (or a temporary one) older than this is a crash's leftover
ORPHAN_GRACE_S = 3600.0
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# a write is refused up front when the data directory's disk has less room than this left
MIN_FREE_BYTES = 1 << 20


class StoreError(MistralrsServeError):
    """The data directory cannot be used (a newer schema, a damaged file, no permission)."""


class Database:
    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.data_dir = Path(data_dir).expanduser()
        self.blob_dir = self.data_dir / "blobs"
        self.path = self.data_dir / "mistralrs-serve.sqlite3"
        try:
            self.blob_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create the data directory {self.data_dir}: {e}") from None
        self._local = threading.local()
        self._migrate()
        self.sweep_orphans()

    def connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")  # WAL: durable at checkpoints, never corrupt
            conn.execute("PRAGMA foreign_keys = ON")
            self._local.conn = conn
        return conn

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: committed on exit, rolled back on an exception."""
        conn = self.connection()
        with self.full_disk_errors():
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    @contextlib.contextmanager
    def full_disk_errors(self) -> Iterator[None]:
        """Turn a full disk (OSError ENOSPC/EDQUOT, SQLite's SQLITE_FULL) into StorageFullError."""
        try:
            yield
        except (OSError, sqlite3.Error) as e:
            if not _is_full(e):
                raise
            logger.error("the data directory %s is full: %s", self.data_dir, e)
            raise StorageFullError(
                f"the server's data directory is full ({e}); nothing was stored: free space "
                "on its disk or delete stored files and responses, then retry"
            ) from None

    def read(self, sql: str, args: tuple[object, ...] = ()) -> list[sqlite3.Row]:
        return self.connection().execute(sql, args).fetchall()

    def _migrate(self) -> None:
        try:
            with self.write() as conn:
                conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
                row = conn.execute("SELECT version FROM schema_version").fetchone()
                version = row[0] if row else 0
                if version > SCHEMA_VERSION:
                    raise StoreError(
                        f"the database {self.path} has schema version {version}, newer than this "
                        f"server's {SCHEMA_VERSION}: upgrade mistralrs-serve or use another --data-dir"
                    )
                for script in MIGRATIONS[version:]:
                    for statement in _statements(script):
                        conn.execute(statement)
                if row is None:
                    conn.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
                else:
                    conn.execute("UPDATE schema_version SET version = ?", (max(version, SCHEMA_VERSION),))
        except sqlite3.DatabaseError as e:
            raise StoreError(f"cannot open the database {self.path}: {e}") from None

    def check_room(self, nbytes: int = 0) -> None:
        """StorageFullError unless the data directory's disk has room for nbytes more
        (and MIN_FREE_BYTES beside): refuse a write before any work goes into it."""
        try:
            st = os.statvfs(self.data_dir)
        except OSError:
            return  # cannot tell: the write itself will say
        free = st.f_bavail * st.f_frsize
        if free < nbytes + MIN_FREE_BYTES:
            with self.full_disk_errors():
                raise OSError(errno.ENOSPC, f"{free} bytes free, {nbytes} to store")

    # blobs

    def write_blob(self, data: bytes) -> str:
        """Store bytes durably under a fresh name (returned); record the name in a transaction after."""
        name = uuid.uuid4().hex
        final = self.blob_dir / name
        tmp = self.blob_dir / f".{name}.tmp"
        with self.full_disk_errors():
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, final)
                _fsync_dir(self.blob_dir)
            except BaseException:
                for path in (tmp, final):  # a partial blob would hold the space it took
                    with contextlib.suppress(OSError):
                        path.unlink()
                raise
        return name

    def read_blob(self, name: str) -> bytes:
        return (self.blob_dir / name).read_bytes()

    def delete_blob(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.blob_dir / name).unlink()

    def sweep_orphans(self, grace_s: float = ORPHAN_GRACE_S) -> int:
        """Delete blobs no `files` row names (and temporary ones) older than grace_s:
        what a crash between a blob's write and its row left behind. Returns how many."""
        referenced = {row[0] for row in self.read("SELECT blob FROM files")}
        cutoff = time.time() - grace_s
        swept = 0
        for entry in self.blob_dir.iterdir():
            with contextlib.suppress(OSError):  # gone meanwhile, or not ours to delete
                if entry.name not in referenced and entry.is_file() and entry.stat().st_mtime < cutoff:
                    entry.unlink()
                    swept += 1
        if swept:
            logger.info("removed %d blobs a crash left without a row in %s", swept, self.blob_dir)
        return swept

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def _is_full(e: OSError | sqlite3.Error) -> bool:
    if isinstance(e, OSError):
        return e.errno in _FULL_ERRNOS
    code = getattr(e, "sqlite_errorcode", None)  # Python >= 3.11
    return code == sqlite3.SQLITE_FULL if code is not None else "disk is full" in str(e)


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def default_data_dir() -> Path:
    """$MISTRALRS_SERVE_DATA_DIR, else the XDG data directory for the app."""
    env = os.environ.get("MISTRALRS_SERVE_DATA_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "mistralrs-serve"
