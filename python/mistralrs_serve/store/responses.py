"""Stored responses of the Responses API and their input items.

`ResponseStore` is what the endpoints use; `SqlResponseStore` keeps them in
the embedded database. A response's object is kept as the exact bytes it was
served as, so that a later GET (after a restart too) answers the same bytes.
Every method blocks (SQLite): async callers run them on a worker thread.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from mistralrs_serve.errors import InvalidRequestError
from mistralrs_serve.store.db import Row, SqlDatabase

UNFINISHED = ("queued", "in_progress")
_UNFINISHED_MARKS = ", ".join("?" for _ in UNFINISHED)


@dataclass(frozen=True)
class StoredResponse:
    id: str
    created_at: int
    status: str
    background: bool
    previous_response_id: str | None
    object_json: bytes  # OpenAI's Response object, as served
    state_json: bytes | None = None  # what else a background response keeps (its stream's events)


@dataclass(frozen=True)
class InputItem:
    id: str
    item_json: bytes


class ResponseStore(Protocol):
    """Where responses live. Another backend (a database shared by replicas)
    implements the same methods; the endpoints never see SQL."""

    def insert(self, record: StoredResponse, input_items: Sequence[InputItem]) -> None:
        """A new response and its input items, in one transaction."""
        ...

    def update(
        self, response_id: str, status: str, object_json: bytes, state_json: bytes | None = None
    ) -> bool:
        """The new state of a queued or in-progress response; False when it was deleted or
        ended meanwhile (by another replica's cancel): it is neither brought back nor changed."""
        ...

    def get(self, response_id: str) -> StoredResponse | None: ...

    def delete(self, response_id: str) -> bool:
        """The response and its input items; False when there was none."""
        ...

    def input_items(self, response_id: str) -> list[bytes]:
        """Every input item of a response, in the order given."""
        ...

    def page_input_items(
        self, response_id: str, *, limit: int, descending: bool, after: str | None
    ) -> tuple[list[InputItem], bool]:
        """Up to `limit` items after the item `after`, and whether more follow."""
        ...

    def unfinished(self) -> list[StoredResponse]:
        """Responses left queued or in progress (by a server that stopped)."""
        ...

    def heartbeat(self) -> None:
        """Record that this server instance is alive (replicas sharing the store)."""
        ...

    def orphaned(self, stale_s: float) -> list[StoredResponse]:
        """Unfinished responses whose owner has not sent a heartbeat for stale_s seconds."""
        ...

    def check_room(self) -> None:
        """StorageFullError when the store has no room for a response (before one runs)."""
        ...


class SqlResponseStore:
    """`ResponseStore` over the embedded database (tables `responses` and `response_input_items`)."""

    def __init__(self, db: SqlDatabase) -> None:
        self.db = db

    def check_room(self) -> None:
        self.db.check_room()

    def insert(self, record: StoredResponse, input_items: Sequence[InputItem]) -> None:
        with self.db.write() as conn:
            conn.execute(
                "INSERT INTO responses (id, created_at, status, background, previous_response_id, "
                "object_json, state_json, owner) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    record.created_at,
                    record.status,
                    int(record.background),
                    record.previous_response_id,
                    _text(record.object_json),
                    _text(record.state_json),
                    self.db.instance_id,
                ),
            )
            conn.executemany(
                "INSERT INTO response_input_items (response_id, position, item_id, item_json) "
                "VALUES (?, ?, ?, ?)",
                [(record.id, i, item.id, _text(item.item_json)) for i, item in enumerate(input_items)],
            )

    def update(
        self, response_id: str, status: str, object_json: bytes, state_json: bytes | None = None
    ) -> bool:
        with self.db.write() as conn:
            cursor = conn.execute(
                "UPDATE responses SET status = ?, object_json = ?, state_json = COALESCE(?, state_json) "
                f"WHERE id = ? AND status IN ({_UNFINISHED_MARKS})",
                (status, _text(object_json), _text(state_json), response_id, *UNFINISHED),
            )
            return cursor.rowcount > 0

    def get(self, response_id: str) -> StoredResponse | None:
        rows = self.db.read("SELECT * FROM responses WHERE id = ?", (response_id,))
        return _record(rows[0]) if rows else None

    def delete(self, response_id: str) -> bool:
        with self.db.write() as conn:
            conn.execute("DELETE FROM response_input_items WHERE response_id = ?", (response_id,))
            return conn.execute("DELETE FROM responses WHERE id = ?", (response_id,)).rowcount > 0

    def input_items(self, response_id: str) -> list[bytes]:
        rows = self.db.read(
            "SELECT item_json FROM response_input_items WHERE response_id = ? ORDER BY position",
            (response_id,),
        )
        return [row[0].encode() for row in rows]

    def page_input_items(
        self, response_id: str, *, limit: int, descending: bool, after: str | None
    ) -> tuple[list[InputItem], bool]:
        order = "DESC" if descending else "ASC"
        where, args = "response_id = ?", [response_id]
        if after is not None:
            found = self.db.read(
                "SELECT position FROM response_input_items WHERE response_id = ? AND item_id = ?",
                (response_id, after),
            )
            if not found:
                raise InvalidRequestError(f"no input item {after!r} in response {response_id}", "after")
            where += f" AND position {'<' if descending else '>'} ?"
            args.append(found[0][0])
        rows = self.db.read(
            f"SELECT item_id, item_json FROM response_input_items WHERE {where} "
            f"ORDER BY position {order} LIMIT ?",
            (*args, limit + 1),
        )
        items = [InputItem(row[0], row[1].encode()) for row in rows[:limit]]
        return items, len(rows) > limit

    def unfinished(self) -> list[StoredResponse]:
        rows = self.db.read(f"SELECT * FROM responses WHERE status IN ({_UNFINISHED_MARKS})", UNFINISHED)
        return [_record(row) for row in rows]

    def heartbeat(self) -> None:
        now = int(time.time())
        with self.db.write() as conn:
            conn.execute(
                "INSERT INTO instances (id, started_at, heartbeat_at) VALUES (?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
                (self.db.instance_id, now, now),
            )
            # instances silent for a day are gone for good; what they owned was failed long ago
            conn.execute("DELETE FROM instances WHERE heartbeat_at < ?", (now - 86_400,))

    def orphaned(self, stale_s: float) -> list[StoredResponse]:
        rows = self.db.read(
            f"SELECT * FROM responses WHERE status IN ({_UNFINISHED_MARKS}) AND (owner IS NULL OR owner "
            "NOT IN (SELECT id FROM instances WHERE heartbeat_at >= ?))",
            (*UNFINISHED, int(time.time() - stale_s)),
        )
        return [_record(row) for row in rows]


def _text(value: bytes | None) -> str | None:
    # JSON is UTF-8; SQLite TEXT keeps it readable with the sqlite3 shell
    return value.decode() if value is not None else None


def _record(row: Row) -> StoredResponse:
    state = row["state_json"]
    return StoredResponse(
        id=row["id"],
        created_at=row["created_at"],
        status=row["status"],
        background=bool(row["background"]),
        previous_response_id=row["previous_response_id"],
        object_json=row["object_json"].encode(),
        state_json=state.encode() if state is not None else None,
    )
