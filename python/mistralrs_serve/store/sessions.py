"""Stored agent sessions: a conversation's history, the tool approvals it
remembers and the files it produced, kept across requests and restarts.

`SessionStore` is what `agent/sessions.py` uses; `SqlSessionStore` keeps one
row per session in the `sessions` table, its state as JSON. A request without
a `session_id` finds its session by history: each session keeps the chained
SHA-256 of its visible history (`history_hash`), and `find_by_history` hashes
every prefix of the incoming messages in one pass and looks the hashes up in
an in-memory index (hash -> ids), read from the table when the store opens
and kept up to date by its writes. The table has no column for the hash and no
migration may add one, so the index is a hint: a hit is checked against the
row (its `history_hash`, expiry) before it is returned. Every method blocks
(SQLite): async callers run them on a worker thread.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from mistralrs_serve.errors import NotFoundError
from mistralrs_serve.store.db import SqlDatabase

# The fields of a chat message that decide whether two messages are the same
# turn; the rest (refusal, annotations, reasoning, audio, nulls) varies between
# what the server sent and what a client sends back.
_KEY_FIELDS = ("role", "name", "tool_call_id")
_NO_LIMIT = 2**63 - 1  # LIMIT with no bound that SQLite and PostgreSQL both take
_HISTORY_SEED = hashlib.sha256(b"mistralrs-serve session history v1").digest()


@dataclass
class SessionState:
    """What a session keeps. `messages` is the whole conversation, OpenAI chat
    message dicts, including the rounds of server-side tool calls the client
    never saw; `hidden` holds those messages' indices, so that the visible
    history (what the client sends back on its next turn) can be matched."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    hidden: list[int] = field(default_factory=list)
    approvals: dict[str, str] = field(default_factory=dict)  # tool name -> "approve" | "deny"
    files: list[str] = field(default_factory=list)  # ids of the files the session produced

    def visible(self) -> list[dict[str, Any]]:
        hidden = set(self.hidden)
        return [m for i, m in enumerate(self.messages) if i not in hidden]

    def to_json(self) -> bytes:
        visible = self.visible()
        return orjson.dumps(
            {
                "history_hash": history_hash(visible),
                "num_visible": len(visible),
                "messages": self.messages,
                "hidden": self.hidden,
                "approvals": self.approvals,
                "files": self.files,
            }
        )

    @staticmethod
    def from_json(raw: str | bytes) -> SessionState:
        data = orjson.loads(raw)
        return SessionState(
            messages=data.get("messages", []),
            hidden=data.get("hidden", []),
            approvals=data.get("approvals", {}),
            files=data.get("files", []),
        )


@dataclass(frozen=True)
class StoredSession:
    id: str
    created_at: int
    updated_at: int
    expires_at: int | None
    state: SessionState


class SessionStore(Protocol):
    """Sessions by id. Unknown and expired ids raise NotFoundError."""

    def get(self, session_id: str) -> StoredSession: ...

    def put(self, session_id: str, state: SessionState, *, ttl_s: int | None) -> StoredSession:
        """Create or replace; a replaced session keeps its created_at."""
        ...

    def delete(self, session_id: str) -> None: ...

    def touch(self, session_id: str, *, ttl_s: int | None) -> None:
        """Mark it used now (updated_at) and push its expiry to now + ttl_s."""
        ...

    def purge_expired(self) -> list[str]:
        """Delete the expired sessions; their ids."""
        ...

    def evict_beyond(self, max_sessions: int, keep: Iterable[str] = ()) -> list[str]:
        """Delete the least recently updated sessions past the first max_sessions
        (never those in `keep`); their ids."""
        ...

    def find_by_history(self, messages: Sequence[Any]) -> str | None:
        """The session whose visible history the messages strictly extend: the
        longest such history, the most recently updated on a tie."""
        ...

    def ids(self) -> list[str]: ...


def message_key(message: Mapping[str, Any]) -> bytes:
    """The canonical bytes of a chat message for history matching: its role,
    name, tool call id, content (text parts joined) and tool calls (id, name,
    arguments), with empty fields left out."""
    key: dict[str, Any] = {k: message[k] for k in _KEY_FIELDS if message.get(k) not in (None, "")}
    content = _content_key(message.get("content"))
    if content not in (None, "", []):
        key["content"] = content
    calls = message.get("tool_calls")
    if isinstance(calls, list) and calls:
        key["tool_calls"] = [_call_key(c) for c in calls]
    return orjson.dumps(key, option=orjson.OPT_SORT_KEYS)


def _content_key(content: Any) -> Any:
    if isinstance(content, list) and all(
        isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        return "".join(p["text"] for p in content)
    return content


def _call_key(call: Any) -> Any:
    if not isinstance(call, Mapping):
        return call
    function = call.get("function")
    if not isinstance(function, Mapping):
        return dict(call)
    return {"id": call.get("id"), "name": function.get("name"), "arguments": function.get("arguments")}


def prefix_hashes(messages: Sequence[Any]) -> list[bytes]:
    """hashes[k] is the chained hash of messages[:k] (hashes[0] that of no messages).
    Chaining makes every prefix's hash one step from the last: O(total bytes)."""
    hashes = [_HISTORY_SEED]
    for message in messages:
        if not isinstance(message, Mapping):
            break  # nothing stored can match past a message that is not an object
        hashes.append(hashlib.sha256(hashes[-1] + message_key(message)).digest())
    return hashes


def history_hash(messages: Sequence[Mapping[str, Any]]) -> str:
    return prefix_hashes(messages)[-1].hex()


class SqlSessionStore:
    """SessionStore over the embedded database's `sessions` table.

    `clock` gives the time (seconds since the epoch): tests move it."""

    def __init__(self, db: SqlDatabase, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock
        self._lock = threading.Lock()
        self._by_hash: dict[str, set[str]] = {}  # history hash -> session ids
        self._hash_of: dict[str, str] = {}  # session id -> history hash
        self._load_index()

    def get(self, session_id: str) -> StoredSession:
        rows = self.db.read("SELECT * FROM sessions WHERE id = ?", (session_id,))
        if not rows or self._expired(rows[0]["expires_at"]):
            raise _not_found(session_id)
        row = rows[0]
        return StoredSession(
            id=row["id"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            expires_at=row["expires_at"],
            state=SessionState.from_json(row["state_json"]),
        )

    def put(self, session_id: str, state: SessionState, *, ttl_s: int | None) -> StoredSession:
        now = int(self.clock())
        expires_at = now + ttl_s if ttl_s is not None else None
        raw = state.to_json()
        with self.db.write() as conn:
            row = conn.execute(
                "SELECT created_at, expires_at FROM sessions WHERE id = ?", (session_id,)
            ).fetchone()
            # an expired session reads as gone, so putting its id again starts a new one
            created_at = row["created_at"] if row and not self._expired(row["expires_at"]) else now
            conn.execute(
                "INSERT INTO sessions (id, created_at, updated_at, expires_at, state_json) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET created_at = excluded.created_at, "
                "updated_at = excluded.updated_at, expires_at = excluded.expires_at, "
                "state_json = excluded.state_json",
                (session_id, created_at, now, expires_at, raw.decode()),
            )
            self._index(session_id, history_hash(state.visible()))
        return StoredSession(session_id, created_at, now, expires_at, state)

    def delete(self, session_id: str) -> None:
        with self.db.write() as conn:
            row = conn.execute(
                "DELETE FROM sessions WHERE id = ? RETURNING expires_at", (session_id,)
            ).fetchone()
            self._unindex([session_id])
        if row is None or self._expired(row["expires_at"]):
            raise _not_found(session_id)

    def touch(self, session_id: str, *, ttl_s: int | None) -> None:
        now = int(self.clock())
        expires_at = now + ttl_s if ttl_s is not None else None
        with self.db.write() as conn:
            updated = conn.execute(
                "UPDATE sessions SET updated_at = ?, expires_at = ? "
                "WHERE id = ? AND (expires_at IS NULL OR expires_at > ?)",
                (now, expires_at, session_id, now),
            ).rowcount
        if not updated:
            raise _not_found(session_id)

    def purge_expired(self) -> list[str]:
        with self.db.write() as conn:
            rows = conn.execute(
                "DELETE FROM sessions WHERE expires_at IS NOT NULL AND expires_at <= ? RETURNING id",
                (int(self.clock()),),
            ).fetchall()
            ids = [r["id"] for r in rows]
            self._unindex(ids)
        return ids

    def evict_beyond(self, max_sessions: int, keep: Iterable[str] = ()) -> list[str]:
        kept = list(keep)
        marks = ",".join("?" * len(kept))
        spared = f"WHERE id NOT IN ({marks})" if kept else ""
        with self.db.write() as conn:
            # the kept sessions count against the cap but are never chosen
            rows = conn.execute(
                f"DELETE FROM sessions WHERE id IN (SELECT id FROM sessions {spared} "
                f"ORDER BY updated_at DESC, rowid DESC LIMIT {_NO_LIMIT} OFFSET (SELECT CASE WHEN n > 0 "
                "THEN n ELSE 0 END FROM (SELECT ? - count(*) AS n FROM sessions "
                f"WHERE id IN ({marks or 'NULL'})) AS room)) RETURNING id",
                (*kept, max_sessions, *kept),
            ).fetchall()
            ids = [r["id"] for r in rows]
            self._unindex(ids)
        return ids

    def find_by_history(self, messages: Sequence[Any]) -> str | None:
        hashes = prefix_hashes(messages)
        if self.db.shared:
            return self._find_in_table(hashes)
        candidates: list[tuple[int, set[str]]] = []
        with self._lock:
            # longest first; the whole list is not a candidate: a match must be extended
            for k in range(len(hashes) - 2, 0, -1):
                ids = self._by_hash.get(hashes[k].hex())
                if ids:
                    candidates.append((k, set(ids)))
        for k, ids in candidates:
            best = self._newest_matching(ids, hashes[k].hex())
            if best is not None:
                return best
        return None

    def ids(self) -> list[str]:
        now = int(self.clock())
        rows = self.db.read("SELECT id FROM sessions WHERE expires_at IS NULL OR expires_at > ?", (now,))
        return [r["id"] for r in rows]

    def _find_in_table(self, hashes: list[bytes]) -> str | None:
        """find_by_history where other processes write the table too (replicas sharing a
        server database): the hashes are looked up in the table itself (PostgreSQL indexes
        the expression), as this process's index would miss their sessions."""
        lengths = {hashes[k].hex(): k for k in range(1, len(hashes) - 1)}
        if not lengths:
            return None
        column = self.db.json_text("state_json", "history_hash")
        marks = ",".join("?" * len(lengths))
        rows = self.db.read(
            f"SELECT id, {column} AS hash FROM sessions WHERE {column} IN ({marks}) "
            "AND (expires_at IS NULL OR expires_at > ?) ORDER BY updated_at DESC, rowid DESC",
            (*lengths, int(self.clock())),
        )
        best = max(rows, key=lambda r: lengths[r["hash"]], default=None)  # max keeps the first on a tie
        return best["id"] if best is not None else None

    def _newest_matching(self, ids: set[str], wanted: str) -> str | None:
        """Of ids, the most recently updated unexpired session whose stored hash is `wanted`
        (the index may be stale where another process wrote the table)."""
        marks = ",".join("?" * len(ids))
        rows = self.db.read(
            f"SELECT id, {self.db.json_text('state_json', 'history_hash')} AS hash FROM sessions "
            f"WHERE id IN ({marks}) AND (expires_at IS NULL OR expires_at > ?) "
            "ORDER BY updated_at DESC, rowid DESC",
            (*ids, int(self.clock())),
        )
        matching = [r["id"] for r in rows if r["hash"] == wanted]
        return matching[0] if matching else None

    def _load_index(self) -> None:
        """The hash index, read from the table once, at start; this store's writes keep it current."""
        rows = self.db.read(
            f"SELECT id, {self.db.json_text('state_json', 'history_hash')} AS hash FROM sessions"
        )
        with self._lock:
            for row in rows:
                if isinstance(row["hash"], str):
                    self._by_hash.setdefault(row["hash"], set()).add(row["id"])
                    self._hash_of[row["id"]] = row["hash"]

    def _index(self, session_id: str, digest: str) -> None:
        with self._lock:
            self._drop(session_id)
            self._by_hash.setdefault(digest, set()).add(session_id)
            self._hash_of[session_id] = digest

    def _unindex(self, session_ids: Iterable[str]) -> None:
        with self._lock:
            for session_id in session_ids:
                self._drop(session_id)

    def _drop(self, session_id: str) -> None:
        old = self._hash_of.pop(session_id, None)
        if old is not None:
            ids = self._by_hash.get(old, set())
            ids.discard(session_id)
            if not ids:
                self._by_hash.pop(old, None)

    def _expired(self, expires_at: int | None) -> bool:
        return expires_at is not None and expires_at <= self.clock()


def _not_found(session_id: str) -> NotFoundError:
    return NotFoundError(f"No such session: {session_id!r}", "session_id")
