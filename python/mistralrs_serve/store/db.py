"""The store's database: `SqlDatabase` is what the stores (files, responses,
sessions, skills) use; `SqliteDatabase` is the embedded default, one SQLite
file (WAL) under the server's data directory, and `PostgresDatabase`
(store/postgres.py) the server database that replicas share. Both run the
same SQL (`?` placeholders; the few dialect differences are methods here)
and the same versioned schema, migrated on open. File bytes live in a
`BlobStore` (store/blobs.py) beside the rows.

SQLite: each thread gets its own connection; writes take the database's
write lock up front (`BEGIN IMMEDIATE`) and wait for it (busy timeout) rather
than fail, so concurrent requests never see "database is locked".
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Protocol, TypeAlias, cast

from mistralrs_serve.store.blobs import (
    BlobStore,
    DirBlobStore,
    StoreError,
    check_disk_room,
    full_disk_errors,
    is_full_os_error,
)

__all__ = ["SCHEMA_VERSION", "SqlDatabase", "SqliteDatabase", "StoreError", "default_data_dir"]

logger = logging.getLogger(__name__)

# A row: indexable by position and by column name (sqlite3.Row, or postgres.Row).
Row: TypeAlias = Any


class Cursor(Protocol):
    rowcount: int

    def fetchone(self) -> Row: ...  # None when there is none

    def fetchall(self) -> list[Row]: ...

    def __iter__(self) -> Iterator[Row]: ...


class Conn(Protocol):
    """A connection inside a write transaction, as the stores use it."""

    def execute(self, sql: str, args: Sequence[object] = ..., /) -> Cursor: ...

    def executemany(self, sql: str, args: Sequence[Sequence[object]], /) -> Any: ...


# Version N is reached by running MIGRATIONS[N - 1]; add a migration, never edit one.
# store/postgres.py keeps the same versions in PostgreSQL's types (PG_MIGRATIONS).
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
    # 3: which server instance runs a response, and the instances alive (replicas sharing a database)
    """
    ALTER TABLE responses ADD COLUMN owner TEXT;
    CREATE TABLE instances (
        id TEXT PRIMARY KEY,
        started_at INTEGER NOT NULL,
        heartbeat_at INTEGER NOT NULL
    );
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)
BUSY_TIMEOUT_MS = 30_000
# a blob without a row (or a temporary one) older than this is a crash's leftover
ORPHAN_GRACE_S = 3600.0


class SqlDatabase(ABC):
    """The rows (SQL) and the blobs of the stores.

    `shared` is True where other server processes use the same database at
    once (replicas): then nothing may assume this process wrote every row.
    `instance_id` names this server process in the rows it owns."""

    dialect: str
    shared: bool
    blobs: BlobStore
    data_dir: Path

    def __init__(self) -> None:
        self.instance_id = f"inst_{uuid.uuid4().hex[:16]}"

    @abstractmethod
    def read(self, sql: str, args: Sequence[object] = ()) -> list[Row]: ...

    @abstractmethod
    def write(self) -> contextlib.AbstractContextManager[Conn]:
        """A write transaction: committed on exit, rolled back on an exception. Writes are
        serialized (one at a time across every process using the database)."""

    @abstractmethod
    def json_text(self, column: str, key: str) -> str:
        """An SQL expression: the top-level `key` of the JSON text in `column`, as text."""

    @abstractmethod
    def check_room(self, nbytes: int = 0) -> None:
        """StorageFullError unless nbytes more (and a margin) can be stored: refuse a write
        before any work goes into it."""

    def close(self) -> None:
        return None

    # blobs

    def write_blob(self, data: bytes) -> str:
        """Store bytes durably under a fresh name (returned); record the name in a transaction after."""
        return self.blobs.write(data)

    def open_blob(self, name: str) -> BinaryIO:
        return self.blobs.open(name)

    def read_blob(self, name: str) -> bytes:
        return self.blobs.read(name)

    def delete_blob(self, name: str) -> None:
        self.blobs.delete(name)

    @property
    def blob_dir(self) -> Path:
        """The blob directory (only for a directory blob store)."""
        if not isinstance(self.blobs, DirBlobStore):
            raise AttributeError(f"the blob store {self.blobs.url} is not a directory")
        return self.blobs.path

    def sweep_orphans(self, grace_s: float = ORPHAN_GRACE_S) -> int:
        """Delete blobs no `files` row names (and temporary ones) older than grace_s:
        what a crash between a blob's write and its row left behind. Returns how many."""
        referenced = {row[0] for row in self.read("SELECT blob FROM files")}
        swept = self.blobs.sweep(referenced, grace_s)
        if swept:
            logger.info("removed %d blobs a crash left without a row in %s", swept, self.blobs.url)
        return swept


class SqliteDatabase(SqlDatabase):
    """The embedded database: `<data_dir>/mistralrs-serve.sqlite3`, blobs in `<data_dir>/blobs`
    unless another blob store is given."""

    dialect = "sqlite"
    shared = False

    def __init__(self, data_dir: str | os.PathLike[str], blobs: BlobStore | None = None) -> None:
        super().__init__()
        self.data_dir = Path(data_dir).expanduser()
        self.path = self.data_dir / "mistralrs-serve.sqlite3"
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create the data directory {self.data_dir}: {e}") from None
        self.blobs = blobs if blobs is not None else DirBlobStore(self.data_dir / "blobs")
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
    def write(self) -> Iterator[Conn]:
        conn = self.connection()
        with self.full_disk_errors():
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield cast(Conn, conn)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def full_disk_errors(self) -> contextlib.AbstractContextManager[None]:
        """Turn a full disk (OSError ENOSPC/EDQUOT, SQLite's SQLITE_FULL) into StorageFullError."""
        return full_disk_errors(self.data_dir, _is_full)

    def read(self, sql: str, args: Sequence[object] = ()) -> list[Row]:
        return self.connection().execute(sql, args).fetchall()

    def json_text(self, column: str, key: str) -> str:
        return f"json_extract({column}, '$.{key}')"

    def _migrate(self) -> None:
        try:
            with self.write() as conn:
                conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
                row = conn.execute("SELECT version FROM schema_version").fetchone()
                version = row[0] if row else 0
                check_schema_version(version, self.path)
                for script in MIGRATIONS[version:]:
                    for statement in statements(script):
                        conn.execute(statement)
                if row is None:
                    conn.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
                else:
                    conn.execute("UPDATE schema_version SET version = ?", (max(version, SCHEMA_VERSION),))
        except sqlite3.DatabaseError as e:
            raise StoreError(f"cannot open the database {self.path}: {e}") from None

    def check_room(self, nbytes: int = 0) -> None:
        check_disk_room(self.data_dir, nbytes)
        self.blobs.check_room(nbytes)

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def check_schema_version(version: int, where: object) -> None:
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"the database {where} has schema version {version}, newer than this server's "
            f"{SCHEMA_VERSION}: upgrade mistralrs-serve or use another store"
        )


def _is_full(e: BaseException) -> bool:
    if isinstance(e, OSError):
        return is_full_os_error(e)
    if not isinstance(e, sqlite3.Error):
        return False
    code = getattr(e, "sqlite_errorcode", None)  # Python >= 3.11
    return code == sqlite3.SQLITE_FULL if code is not None else "disk is full" in str(e)


def statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def default_data_dir() -> Path:
    """$MISTRALRS_SERVE_DATA_DIR, else the XDG data directory for the app."""
    env = os.environ.get("MISTRALRS_SERVE_DATA_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "mistralrs-serve"


def open_database(
    store: str | None, data_dir: str | os.PathLike[str], blob_store: str | None = None
) -> SqlDatabase:
    """The database a server uses: `store` None or "sqlite" is the embedded one under data_dir,
    a postgresql:// URL a server database; blobs go to blob_store (a directory or
    s3://bucket/prefix), by default `<data_dir>/blobs`."""
    from mistralrs_serve.store.blobs import open_blob_store

    blobs = open_blob_store(blob_store) if blob_store else None
    if store in (None, "", "sqlite"):
        return SqliteDatabase(data_dir, blobs)
    assert store is not None
    if store.split("://", 1)[0] in ("postgresql", "postgres"):
        from mistralrs_serve.store.postgres import PostgresDatabase

        return PostgresDatabase(store, data_dir, blobs or DirBlobStore(Path(data_dir).expanduser() / "blobs"))
    raise StoreError(f"unknown store {store!r}: give 'sqlite' or a postgresql:// URL")
