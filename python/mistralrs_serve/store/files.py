"""Stored files: uploads, and the files requests carry inline or by URL.

`FileStore` is what the endpoints and attachments use; `SqlFileStore` keeps
the rows in the embedded database and the bytes as blobs beside it. Another
backend (a server database shared by replicas) implements the same protocol.
Every method blocks (SQLite, fsync): async callers run them on a worker thread.
"""

from __future__ import annotations

import mimetypes
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, Literal, Protocol

import orjson

from mistralrs_serve.errors import InvalidRequestError, NotFoundError
from mistralrs_serve.store.db import Row, SqlDatabase

# What OpenAI accepts on upload; `user_data` is the purpose of request attachments.
UPLOAD_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
MIN_EXPIRES_S, MAX_EXPIRES_S = 3600, 2_592_000
MAX_LIST_LIMIT = 10_000
ListOrder = Literal["asc", "desc"]


@dataclass(frozen=True)
class StoredFile:
    """One stored file's metadata (its bytes are read with `FileStore.open`)."""

    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    content_type: str
    expires_at: int | None = None

    def to_openai(self) -> dict[str, Any]:
        """OpenAI's file object (`status` is always `processed`: nothing runs after an upload)."""
        obj: dict[str, Any] = {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
        }
        if self.expires_at is not None:
            obj["expires_at"] = self.expires_at
        return obj


@dataclass(frozen=True)
class FilePage:
    data: list[StoredFile]
    has_more: bool

    def to_openai(self) -> dict[str, Any]:
        """OpenAI's list shape; an empty page has empty-string ids, as the schema wants strings."""
        return {
            "object": "list",
            "data": [f.to_openai() for f in self.data],
            "first_id": self.data[0].id if self.data else "",
            "last_id": self.data[-1].id if self.data else "",
            "has_more": self.has_more,
        }


class FileStore(Protocol):
    """Files by id. Unknown, deleted and expired ids raise NotFoundError."""

    def create(
        self,
        content: bytes,
        *,
        filename: str,
        purpose: str,
        content_type: str | None = None,
        expires_after_s: int | None = None,
    ) -> StoredFile: ...

    def get(self, file_id: str) -> StoredFile: ...

    def list(
        self,
        *,
        purpose: str | None = None,
        limit: int = MAX_LIST_LIMIT,
        order: ListOrder = "desc",
        after: str | None = None,
    ) -> FilePage: ...

    def open(self, file_id: str) -> tuple[StoredFile, BinaryIO]:
        """The file and its bytes as a binary stream, which the caller closes."""
        ...

    def delete(self, file_id: str) -> None: ...


def safe_filename(name: str | None, default: str = "file") -> str:
    """The last path component of name, printable characters only (it goes into headers and prompts)."""
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    return "".join(c for c in base if c.isprintable()).strip() or default


def content_type_for(filename: str, given: str | None) -> str:
    """The declared type unless it is missing or generic; then a guess from the name."""
    if given and given.split(";")[0].strip() not in ("", "application/octet-stream"):
        return given
    guessed, _ = mimetypes.guess_type(filename)
    return guessed or given or "application/octet-stream"


def check_expires_after(seconds: int | None) -> None:
    if seconds is not None and not MIN_EXPIRES_S <= seconds <= MAX_EXPIRES_S:
        raise InvalidRequestError(
            f"expires_after.seconds must be between {MIN_EXPIRES_S} and {MAX_EXPIRES_S}; got {seconds}",
            "expires_after.seconds",
        )


def check_list_args(limit: int, order: str) -> None:
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise InvalidRequestError(f"limit must be between 1 and {MAX_LIST_LIMIT}; got {limit}", "limit")
    if order not in ("asc", "desc"):
        raise InvalidRequestError(f"order must be 'asc' or 'desc'; got {order!r}", "order")


class SqlFileStore:
    """FileStore over the store's database: a row per file, its bytes in a blob.

    Create writes the blob durably first and the row after, so a crash leaves
    at worst an orphan blob, never a row without its bytes; delete removes the
    row first for the same reason. Listing follows insertion order (rowid),
    which `created_at` (whole seconds) cannot tell apart within a second.
    """

    PURGE_EVERY_S = 60.0

    def __init__(self, db: SqlDatabase) -> None:
        self.db = db
        self._next_purge = 0.0  # expired files read as gone at once; their space comes back here

    def create(
        self,
        content: bytes,
        *,
        filename: str,
        purpose: str,
        content_type: str | None = None,
        expires_after_s: int | None = None,
    ) -> StoredFile:
        check_expires_after(expires_after_s)
        if time.monotonic() >= self._next_purge:
            self._next_purge = time.monotonic() + self.PURGE_EVERY_S
            self.purge_expired()
        now = int(time.time())
        file = StoredFile(
            id=f"file-{uuid.uuid4().hex}",
            bytes=len(content),
            created_at=now,
            filename=safe_filename(filename),
            purpose=purpose,
            content_type=content_type_for(filename, content_type),
            expires_at=now + expires_after_s if expires_after_s is not None else None,
        )
        self.db.check_room(len(content))
        blob = self.db.write_blob(content)
        try:
            with self.db.write() as conn:
                conn.execute(
                    "INSERT INTO files (id, object_json, purpose, created_at, expires_at, bytes, "
                    "content_type, blob) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        file.id,
                        orjson.dumps(file.to_openai()).decode(),
                        purpose,
                        now,
                        file.expires_at,
                        file.bytes,
                        file.content_type,
                        blob,
                    ),
                )
        except BaseException:
            self.db.delete_blob(blob)
            raise
        return file

    def get(self, file_id: str) -> StoredFile:
        return _stored_file(self._row(file_id))

    def list(
        self,
        *,
        purpose: str | None = None,
        limit: int = MAX_LIST_LIMIT,
        order: ListOrder = "desc",
        after: str | None = None,
    ) -> FilePage:
        check_list_args(limit, order)
        where, args = ["(expires_at IS NULL OR expires_at > ?)"], [int(time.time())]
        if purpose is not None:
            where.append("purpose = ?")
            args.append(purpose)  # type: ignore[arg-type]
        if after is not None:
            cursor = self.db.read("SELECT rowid FROM files WHERE id = ?", (after,))
            if not cursor:
                raise InvalidRequestError(f"after: no file with id {after!r}", "after")
            where.append("rowid < ?" if order == "desc" else "rowid > ?")
            args.append(cursor[0][0])
        direction = "DESC" if order == "desc" else "ASC"
        rows = self.db.read(
            f"SELECT * FROM files WHERE {' AND '.join(where)} ORDER BY rowid {direction} LIMIT ?",
            (*args, limit + 1),
        )
        return FilePage([_stored_file(r) for r in rows[:limit]], has_more=len(rows) > limit)

    def open(self, file_id: str) -> tuple[StoredFile, BinaryIO]:
        row = self._row(file_id)
        try:
            stream = self.db.open_blob(row["blob"])
        except FileNotFoundError:  # deleted between the row read and the open
            raise _not_found(file_id) from None
        return _stored_file(row), stream

    def delete(self, file_id: str) -> None:
        with self.db.write() as conn:
            row = conn.execute("SELECT blob, expires_at FROM files WHERE id = ?", (file_id,)).fetchone()
            if row is None or _expired(row["expires_at"]):
                raise _not_found(file_id)
            conn.execute("DELETE FROM files WHERE id = ?", (file_id,))
        self.db.delete_blob(row["blob"])

    def purge_expired(self) -> int:
        """Delete the files whose expiry has passed (they already read as gone); returns how many."""
        with self.db.write() as conn:
            rows = conn.execute(
                "DELETE FROM files WHERE expires_at IS NOT NULL AND expires_at <= ? RETURNING blob",
                (int(time.time()),),
            ).fetchall()
        for row in rows:
            self.db.delete_blob(row["blob"])
        return len(rows)

    def _row(self, file_id: str) -> Row:
        rows = self.db.read("SELECT * FROM files WHERE id = ?", (file_id,))
        if not rows or _expired(rows[0]["expires_at"]):
            raise _not_found(file_id)
        return rows[0]


def read_all(store: FileStore, file_id: str) -> tuple[StoredFile, bytes]:
    file, stream = store.open(file_id)
    with stream:
        return file, stream.read()


def iter_chunks(stream: BinaryIO, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
    with stream:
        while chunk := stream.read(chunk_bytes):
            yield chunk


def _stored_file(row: Row) -> StoredFile:
    obj = orjson.loads(row["object_json"])
    return StoredFile(
        id=row["id"],
        bytes=row["bytes"],
        created_at=row["created_at"],
        filename=obj["filename"],
        purpose=row["purpose"],
        content_type=row["content_type"],
        expires_at=row["expires_at"],
    )


def _expired(expires_at: int | None) -> bool:
    return expires_at is not None and expires_at <= time.time()


def _not_found(file_id: str) -> NotFoundError:
    return NotFoundError(f"No such file: {file_id!r}", "file_id")
