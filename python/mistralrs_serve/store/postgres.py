"""The server database that replicas share: PostgreSQL through psycopg 3 and
a connection pool, under the same stores and SQL as the embedded SQLite.

The schema has the same versions as SQLite's (`PG_MIGRATIONS[N - 1]` matches
`MIGRATIONS[N - 1]`), in PostgreSQL's types; tables that the stores page by
insertion order keep it in a `rowid` column, as SQLite has one built in.
Migrations run in one transaction holding an advisory lock, so replicas that
start together migrate once: the others wait, then find the work done.
Writes hold another transaction-scoped advisory lock, which gives them the
one-writer-at-a-time semantics the stores were written for (SQLite's
`BEGIN IMMEDIATE`); reads never wait for it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from mistralrs_serve.errors import StoreUnavailableError
from mistralrs_serve.store.blobs import BlobStore, StoreError, full_disk_errors
from mistralrs_serve.store.db import (
    SCHEMA_VERSION,
    Conn,
    Cursor,
    Row,
    SqlDatabase,
    check_schema_version,
    statements,
)

logger = logging.getLogger(__name__)

# pg_advisory_xact_lock keys: "mrs" + a letter
MIGRATE_LOCK = 0x6D72_7300 + ord("m")
WRITE_LOCK = 0x6D72_7300 + ord("w")

PG_MIGRATIONS: list[str] = [
    """
    CREATE TABLE files (
        rowid BIGSERIAL UNIQUE,
        id TEXT PRIMARY KEY,
        object_json TEXT NOT NULL,
        purpose TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        expires_at BIGINT,
        bytes BIGINT NOT NULL,
        content_type TEXT NOT NULL,
        blob TEXT NOT NULL
    );
    CREATE INDEX files_by_created ON files (created_at, id);
    CREATE TABLE responses (
        id TEXT PRIMARY KEY,
        created_at BIGINT NOT NULL,
        status TEXT NOT NULL,
        background INTEGER NOT NULL,
        previous_response_id TEXT,
        object_json TEXT NOT NULL,
        state_json TEXT
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
    """
    CREATE TABLE sessions (
        rowid BIGSERIAL UNIQUE,
        id TEXT PRIMARY KEY,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        expires_at BIGINT,
        state_json TEXT NOT NULL
    );
    CREATE INDEX sessions_by_updated ON sessions (updated_at, id);
    CREATE INDEX sessions_by_history ON sessions (((state_json::jsonb) ->> 'history_hash'));
    CREATE TABLE skills (
        rowid BIGSERIAL UNIQUE,
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        object_json TEXT NOT NULL
    );
    CREATE TABLE skill_versions (
        skill_id TEXT NOT NULL REFERENCES skills (id) ON DELETE CASCADE,
        version INTEGER NOT NULL,
        created_at BIGINT NOT NULL,
        object_json TEXT NOT NULL,
        path TEXT NOT NULL,
        PRIMARY KEY (skill_id, version)
    );
    """,
    """
    ALTER TABLE responses ADD COLUMN owner TEXT;
    CREATE TABLE instances (
        id TEXT PRIMARY KEY,
        started_at BIGINT NOT NULL,
        heartbeat_at BIGINT NOT NULL
    );
    """,
]
assert len(PG_MIGRATIONS) == SCHEMA_VERSION, "PostgreSQL's schema follows SQLite's versions"


class PgRow(tuple[Any, ...]):
    """A result row: by position, as a tuple, or by column name, as sqlite3.Row."""

    _index: dict[str, int]

    def __new__(cls, values: Sequence[Any], index: dict[str, int]) -> PgRow:
        row = super().__new__(cls, values)
        row._index = index
        return row

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return tuple.__getitem__(self, self._index[key])
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._index)


def _row_factory(cursor: Any) -> Any:
    index = {column.name: i for i, column in enumerate(cursor.description or ())}
    return lambda values: PgRow(values, index)


@functools.lru_cache(maxsize=512)
def _pg_sql(sql: str) -> str:
    """The stores' SQL (`?` placeholders) in psycopg's (`%s`, a literal % doubled)."""
    return sql.replace("%", "%%").replace("?", "%s")


class _PgConn:
    """A psycopg connection inside a transaction, spoken to in the stores' SQL."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def execute(self, sql: str, args: Sequence[object] = ()) -> Cursor:
        cursor: Cursor = self.conn.execute(_pg_sql(sql), tuple(args))
        return cursor

    def executemany(self, sql: str, args: Sequence[Sequence[object]]) -> Any:
        with self.conn.cursor() as cursor:
            cursor.executemany(_pg_sql(sql), [tuple(a) for a in args])


class PostgresDatabase(SqlDatabase):
    """`postgresql://user:password@host:port/dbname` (libpq's URL; libpq's PG* variables fill gaps)."""

    dialect = "postgresql"
    shared = True

    def __init__(
        self,
        url: str,
        data_dir: str | os.PathLike[str],
        blobs: BlobStore,
        *,
        min_size: int = 1,
        max_size: int = 16,
        timeout_s: float = 30.0,
    ) -> None:
        super().__init__()
        try:
            import psycopg
            from psycopg_pool import ConnectionPool
        except ImportError:
            raise StoreError(
                "a postgresql:// store needs psycopg 3: pip install 'mistralrs-serve[postgres]'"
            ) from None
        self._psycopg = psycopg
        self.url = url
        self.data_dir = Path(data_dir).expanduser()
        self.blobs = blobs
        self.pool = ConnectionPool(
            url,
            min_size=min_size,
            max_size=max_size,
            timeout=timeout_s,
            kwargs={"autocommit": True, "row_factory": _row_factory},
            open=False,
            name="mistralrs-serve",
        )
        try:
            self.pool.open(wait=True, timeout=timeout_s)
        except Exception as e:
            self.pool.close()
            raise StoreError(f"cannot connect to the store {redact(url)}: {e}") from None
        self._migrate()
        self.sweep_orphans()

    @contextlib.contextmanager
    def _connection(self) -> Iterator[Any]:
        psycopg = self._psycopg
        try:
            with self.pool.connection() as conn:
                yield conn
        except (psycopg.OperationalError, _pool_timeout()) as e:
            if isinstance(e, psycopg.errors.DiskFull):
                raise
            logger.error("the store %s is unavailable: %s", redact(self.url), e)
            raise StoreUnavailableError(
                f"the server's database is unavailable ({type(e).__name__}); nothing was stored: retry later"
            ) from None

    def read(self, sql: str, args: Sequence[object] = ()) -> list[Row]:
        with self._connection() as conn:
            rows: list[Row] = conn.execute(_pg_sql(sql), tuple(args)).fetchall()
            return rows

    @contextlib.contextmanager
    def write(self) -> Iterator[Conn]:
        with self._full_disk_errors(), self._connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
            yield _PgConn(conn)

    def _full_disk_errors(self) -> contextlib.AbstractContextManager[None]:
        psycopg = self._psycopg
        return full_disk_errors(redact(self.url), lambda e: isinstance(e, psycopg.errors.DiskFull))

    def json_text(self, column: str, key: str) -> str:
        return f"(({column})::jsonb ->> '{key}')"

    def check_room(self, nbytes: int = 0) -> None:
        self.blobs.check_room(nbytes)  # the database server says so itself when its disk is full

    def _migrate(self) -> None:
        psycopg = self._psycopg
        try:
            with self._connection() as conn, conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK,))
                conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
                row = conn.execute("SELECT version FROM schema_version").fetchone()
                version = row[0] if row else 0
                check_schema_version(version, redact(self.url))
                for script in PG_MIGRATIONS[version:]:
                    for statement in statements(script):
                        conn.execute(statement)
                if row is None:
                    conn.execute("INSERT INTO schema_version VALUES (%s)", (SCHEMA_VERSION,))
                elif version < SCHEMA_VERSION:
                    conn.execute("UPDATE schema_version SET version = %s", (SCHEMA_VERSION,))
                if version < SCHEMA_VERSION:
                    logger.info("migrated %s from schema %d to %d", redact(self.url), version, SCHEMA_VERSION)
        except psycopg.Error as e:
            self.pool.close()
            raise StoreError(f"cannot open the database {redact(self.url)}: {e}") from None

    def close(self) -> None:
        self.pool.close()


def _pool_timeout() -> type[Exception]:
    from psycopg_pool import PoolTimeout

    return PoolTimeout


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
