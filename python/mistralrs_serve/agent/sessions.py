"""Agent sessions: what an agentic request continues from one turn to the next.

A session has an id, a working directory (`<data_dir>/sessions/<id>/work`,
where code and shell run) and a stored state (store/sessions.py): the whole
conversation, including the server-side tool rounds the client never saw, the
tool approvals remembered with `remember_for_session`, and the ids of the
files it produced. `SessionManager.resolve` finds a request's session (by
`session_id`, else by the history its messages extend, else a new one) and
splices the stored conversation with the request's messages; `save` stores the
conversation after the request. Expired sessions and those past the cap are
deleted with their directories, and the close hooks (the code interpreter's
process) run for them. Every method blocks (SQLite, file system): async
callers run them on a worker thread.

Splicing, as mistral.rs does it: walk the stored conversation and the request's
messages together; stored hidden messages (tool rounds) are kept, visible ones
must equal the request's next message (compared as `message_key`), and at the
first difference the stored history ends and the rest of the request follows,
so editing an earlier turn works. With an explicit `session_id`, a request
whose messages share nothing with the stored history is the next turn: it is
appended to the whole stored conversation.
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mistralrs_serve.errors import InvalidRequestError, NotFoundError
from mistralrs_serve.store.sessions import SessionState, SessionStore, StoredSession, message_key

logger = logging.getLogger(__name__)

MAX_SESSION_ID_CHARS = 128
_SESSION_ID = re.compile(r"[A-Za-z0-9_-]+")
ROLES = ("system", "developer", "user", "assistant", "tool")
DECISIONS = ("approve", "deny")
# The keys of an exported session; a PUT may send the export back as it is.
_EXPORT_ONLY_KEYS = ("id", "object", "created_at", "updated_at", "expires_at")
_IMPORT_KEYS = ("messages", "hidden_messages", "approvals", "files")

CloseHook = Callable[[str], None]


def check_session_id(session_id: Any, param: str = "session_id") -> str:
    """The id if it is 1-128 characters of letters, digits, '_' and '-' (it names a directory)."""
    if (
        not isinstance(session_id, str)
        or len(session_id) > MAX_SESSION_ID_CHARS
        or not _SESSION_ID.fullmatch(session_id)
    ):
        raise InvalidRequestError(
            f"{param} must be 1 to {MAX_SESSION_ID_CHARS} characters of letters, digits, '_' and '-'; "
            f"got {session_id!r}"[:400],
            param,
        )
    return session_id


def new_session_id() -> str:
    return f"sess_{uuid.uuid4().hex}"


@dataclass
class AgentSession:
    """One request's session (implements agent.tool.SessionHandle).

    `messages` is the conversation to run: the stored one spliced with the
    request's messages; `hidden` the indices in it of the tool rounds the
    client never saw. The loop appends to a copy of `messages` and passes the
    result to `SessionManager.save`."""

    id: str
    workdir: Path
    is_new: bool
    created_at: int
    updated_at: int
    expires_at: int | None
    messages: list[dict[str, Any]]
    hidden: frozenset[int] = frozenset()
    request_messages: list[dict[str, Any]] = field(default_factory=list)
    approvals: dict[str, str] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)

    def remembered(self, tool_name: str) -> bool | None:
        """True or False when a `remember_for_session` answer approved or denied this tool; else None."""
        decision = self.approvals.get(tool_name)
        return None if decision is None else decision == "approve"

    def remember(self, tool_name: str, approved: bool) -> None:
        """Keep the answer for the rest of the session (stored by the next save)."""
        self.approvals[tool_name] = "approve" if approved else "deny"

    def add_files(self, file_ids: Iterable[str]) -> None:
        self.files.extend(f for f in file_ids if f not in self.files)


def splice(
    state: SessionState, incoming: Sequence[Any], *, explicit: bool
) -> tuple[list[dict[str, Any]], list[int]]:
    """The conversation to run and its hidden indices (see the module's docstring)."""
    hidden = set(state.hidden)
    out: list[dict[str, Any]] = []
    out_hidden: list[int] = []
    j = 0
    for i, message in enumerate(state.messages):
        if i in hidden:
            out_hidden.append(len(out))
            out.append(message)
        elif j < len(incoming) and _same(message, incoming[j]):
            out.append(incoming[j])
            j += 1
        else:
            break
    if j == 0:
        if explicit and state.messages:
            return [*state.messages, *incoming], sorted(hidden)
        return list(incoming), []
    return [*out, *incoming[j:]], out_hidden


def _same(stored: Mapping[str, Any], given: Any) -> bool:
    return isinstance(given, Mapping) and message_key(stored) == message_key(given)


class SessionManager:
    """Sessions for the agent loop and the /v1/sessions routes. Thread-safe."""

    PURGE_EVERY_S = 60.0

    def __init__(
        self,
        store: SessionStore,
        data_dir: str | Path,
        *,
        ttl_s: int | None,
        max_sessions: int,
        on_close: CloseHook | None = None,
    ) -> None:
        self.store = store
        self.root = Path(data_dir) / "sessions"
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self._close_hooks: list[CloseHook] = [on_close] if on_close is not None else []
        self._lock = threading.Lock()
        self._next_purge = 0.0
        self._remove_orphans()

    def add_close_hook(self, hook: CloseHook) -> None:
        """hook(session_id) runs when a session is deleted, replaced, expires or is evicted."""
        self._close_hooks.append(hook)

    def workdir(self, session_id: str) -> Path:
        return self.root / session_id / "work"

    def resolve(self, session_id: str | None, messages: Sequence[Any]) -> AgentSession:
        """The request's session: by explicit id (found or created under that id), else
        the stored session whose visible history the messages extend, else a new one."""
        self._maybe_purge()
        stored: StoredSession | None = None
        if session_id is not None:
            stored = self._existing(check_session_id(session_id))
        else:
            found = self.store.find_by_history(messages)
            stored = self._existing(found) if found is not None else None
        is_new = stored is None
        if stored is None:
            stored = self._create(session_id if session_id is not None else new_session_id())
        conversation, hidden = splice(stored.state, messages, explicit=session_id is not None)
        workdir = self.workdir(stored.id)
        workdir.mkdir(parents=True, exist_ok=True)
        return AgentSession(
            id=stored.id,
            workdir=workdir,
            is_new=is_new,
            created_at=stored.created_at,
            updated_at=stored.updated_at,
            expires_at=stored.expires_at,
            messages=conversation,
            hidden=frozenset(hidden),
            request_messages=list(messages),
            approvals=dict(stored.state.approvals),
            files=list(stored.state.files),
        )

    def save(
        self,
        session: AgentSession,
        messages: Sequence[dict[str, Any]],
        *,
        approvals: Mapping[str, str] | None = None,
        files: Iterable[str] = (),
    ) -> StoredSession:
        """Store the conversation after a request: `session.messages` (or the request's
        own messages) followed by what the loop added. Of the added messages, all but a
        final assistant message (the answer the client got) are hidden tool rounds.
        `approvals` (tool name -> "approve"/"auto" or "deny") are remembered with the
        session's own."""
        for tool_name, verdict in (approvals or {}).items():
            if verdict in ("approve", "auto", "deny"):
                session.remember(tool_name, verdict != "deny")
        session.add_files(files)
        state = SessionState(
            messages=list(messages),
            hidden=_hidden_after(session, messages),
            approvals=dict(session.approvals),
            files=list(session.files),
        )
        stored = self.store.put(session.id, state, ttl_s=self.ttl_s)
        self._closed(self.store.evict_beyond(self.max_sessions, keep=[session.id]))
        return stored

    def export(self, session_id: str) -> dict[str, Any]:
        return session_object(self.store.get(check_session_id(session_id)))

    def import_(self, session_id: str, body: Any) -> dict[str, Any]:
        """Create or replace a session from an exported object. A replaced session's
        close hooks run (its interpreter's state belongs to the old history); its
        working directory stays."""
        check_session_id(session_id)
        state = parse_import(body)
        replaced = self._existing(session_id) is not None
        stored = self.store.put(session_id, state, ttl_s=self.ttl_s)
        if replaced:
            self._run_hooks(session_id)
        self._closed(self.store.evict_beyond(self.max_sessions, keep=[session_id]))
        return session_object(stored)

    def delete(self, session_id: str) -> None:
        """Delete the session, its working directory and its processes (NotFoundError if unknown)."""
        check_session_id(session_id)
        try:
            self.store.delete(session_id)
        finally:  # a directory left by a crash goes too
            self._closed([session_id])

    def purge(self) -> list[str]:
        """Delete the expired sessions and those past the cap; their ids."""
        ids = self.store.purge_expired() + self.store.evict_beyond(self.max_sessions)
        self._closed(ids)
        return ids

    def _existing(self, session_id: str) -> StoredSession | None:
        try:
            stored = self.store.get(session_id)
            self.store.touch(session_id, ttl_s=self.ttl_s)  # most recently used: last to be evicted
        except NotFoundError:
            return None
        return stored

    def _create(self, session_id: str) -> StoredSession:
        stored = self.store.put(session_id, SessionState(), ttl_s=self.ttl_s)
        self._closed(self.store.evict_beyond(self.max_sessions, keep=[session_id]))
        return stored

    def _maybe_purge(self) -> None:
        with self._lock:
            if time.monotonic() < self._next_purge:
                return
            self._next_purge = time.monotonic() + self.PURGE_EVERY_S
        self.purge()

    def _closed(self, session_ids: Iterable[str]) -> None:
        for session_id in session_ids:
            shutil.rmtree(self.root / session_id, ignore_errors=True)
            self._run_hooks(session_id)

    def _run_hooks(self, session_id: str) -> None:
        for hook in self._close_hooks:
            try:
                hook(session_id)
            except Exception:  # one broken hook must not keep a session's other resources alive
                logger.exception("a session close hook failed for %s", session_id)

    def _remove_orphans(self) -> None:
        """Directories of sessions that are gone (deleted while the server was down)."""
        if not self.root.is_dir():
            return
        # directories first: a session's row is written before its directory, so every
        # directory listed here whose session exists is in the ids read after
        names = [p.name for p in self.root.iterdir() if p.is_dir()]
        known = set(self.store.ids())
        for name in names:
            if name not in known:
                shutil.rmtree(self.root / name, ignore_errors=True)


def _hidden_after(session: AgentSession, messages: Sequence[dict[str, Any]]) -> list[int]:
    if list(messages[: len(session.messages)]) == session.messages:
        base, hidden = len(session.messages), set(session.hidden)
    elif list(messages[: len(session.request_messages)]) == session.request_messages:
        base, hidden = len(session.request_messages), set()
    else:  # not a continuation of this request: nothing known to be hidden
        return []
    last = len(messages) - 1
    for i in range(base, len(messages)):
        if not (i == last and messages[i].get("role") == "assistant"):
            hidden.add(i)
    return sorted(hidden)


def session_object(stored: StoredSession) -> dict[str, Any]:
    """The session as the API serves it (GET, PUT)."""
    state = stored.state
    return {
        "id": stored.id,
        "object": "session",
        "created_at": stored.created_at,
        "updated_at": stored.updated_at,
        "expires_at": stored.expires_at,
        "messages": state.messages,
        "hidden_messages": state.hidden,
        "approvals": state.approvals,
        "files": state.files,
    }


def parse_import(body: Any) -> SessionState:
    """A session's state from a PUT body (an exported session, or just its `messages`)."""
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object with a 'messages' list")
    for key in body:
        if key not in _IMPORT_KEYS and key not in _EXPORT_ONLY_KEYS:
            raise InvalidRequestError(
                f"unknown field {key!r}; a session has {', '.join(_IMPORT_KEYS)}"[:400], str(key)[:100]
            )
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise InvalidRequestError("'messages' is required: a list of chat messages", "messages")
    for i, message in enumerate(messages):
        _check_message(message, f"messages[{i}]")
    return SessionState(
        messages=messages,
        hidden=_hidden_indices(body.get("hidden_messages", []), len(messages)),
        approvals=_approvals(body.get("approvals", {})),
        files=_file_ids(body.get("files", [])),
    )


def _check_message(message: Any, where: str) -> None:
    if not isinstance(message, dict):
        raise InvalidRequestError(f"{where} must be a chat message object", where)
    role = message.get("role")
    if role not in ROLES:
        raise InvalidRequestError(
            f"{where}.role must be one of {', '.join(ROLES)}; got {role!r}", f"{where}.role"
        )
    content = message.get("content")
    if not (content is None or isinstance(content, str) or _is_parts(content)):
        raise InvalidRequestError(
            f"{where}.content must be a string, a list of content part objects or null", f"{where}.content"
        )
    if role == "tool" and not isinstance(message.get("tool_call_id"), str):
        raise InvalidRequestError(
            f"{where}.tool_call_id is required on a tool message", f"{where}.tool_call_id"
        )
    calls = message.get("tool_calls")
    if calls is not None:
        if role != "assistant" or not isinstance(calls, list):
            raise InvalidRequestError(
                f"{where}.tool_calls must be a list, on an assistant message", f"{where}.tool_calls"
            )
        for k, call in enumerate(calls):
            _check_call(call, f"{where}.tool_calls[{k}]")


def _is_parts(content: Any) -> bool:
    return isinstance(content, list) and all(
        isinstance(p, dict) and isinstance(p.get("type"), str) for p in content
    )


def _check_call(call: Any, where: str) -> None:
    function = call.get("function") if isinstance(call, dict) else None
    if (
        not isinstance(function, dict)
        or not isinstance(function.get("name"), str)
        or not isinstance(function.get("arguments"), str)
    ):
        raise InvalidRequestError(
            f"{where} must be {{'id', 'type': 'function', 'function': {{'name', 'arguments'}}}} "
            "with the name and the arguments (JSON text) as strings",
            where,
        )


def _hidden_indices(value: Any, num_messages: int) -> list[int]:
    if not isinstance(value, list) or not all(type(i) is int and 0 <= i < num_messages for i in value):
        raise InvalidRequestError(
            f"hidden_messages must be a list of indices into messages (0 to {num_messages - 1})",
            "hidden_messages",
        )
    if len(set(value)) != len(value):
        raise InvalidRequestError("hidden_messages has an index twice", "hidden_messages")
    return sorted(value)


def _approvals(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and v in DECISIONS for k, v in value.items()
    ):
        raise InvalidRequestError(
            "approvals must be an object from tool names to 'approve' or 'deny'", "approvals"
        )
    return dict(value)


def _file_ids(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(f, str) for f in value):
        raise InvalidRequestError("files must be a list of file ids", "files")
    return list(dict.fromkeys(value))
