"""Agent sessions: the SQLite store (round trips, TTL, the cap, history
matching, a reopen) and the SessionManager (ids, splicing, hidden tool rounds,
working directories, close hooks, import validation)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from mistralrs_serve.agent.sessions import AgentSession, SessionManager, check_session_id, splice
from mistralrs_serve.errors import InvalidRequestError, NotFoundError
from mistralrs_serve.store.db import SqlDatabase
from mistralrs_serve.store.sessions import SessionState, SqlSessionStore, message_key

TTL_S = 100

OpenDb = Callable[..., SqlDatabase]  # the open_db fixture (tests/conftest.py): SQLite, then PostgreSQL


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


CALL: dict[str, Any] = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "python", "arguments": '{"code": "1+1"}'},
}
TOOL_ROUND: list[dict[str, Any]] = [
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": "2"},
]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(open_db: OpenDb, tmp_path: Path, clock: Clock) -> SqlSessionStore:
    return SqlSessionStore(open_db(tmp_path), clock=clock)


@pytest.fixture
def closed() -> list[str]:
    return []


@pytest.fixture
def manager(store: SqlSessionStore, tmp_path: Path, closed: list[str]) -> SessionManager:
    return SessionManager(store, tmp_path, ttl_s=TTL_S, max_sessions=3, on_close=closed.append)


def state(*messages: dict[str, Any], hidden: list[int] | None = None) -> SessionState:
    return SessionState(messages=list(messages), hidden=hidden or [])


# the store


def test_put_get_delete(store: SqlSessionStore, clock: Clock) -> None:
    s = SessionState([user("hi"), assistant("hello")], approvals={"python": "approve"}, files=["file-1"])
    stored = store.put("a", s, ttl_s=TTL_S)
    assert (stored.created_at, stored.updated_at, stored.expires_at) == (1_000_000, 1_000_000, 1_000_100)
    got = store.get("a")
    assert got.state == s and got.created_at == 1_000_000
    clock.now += 10
    replaced = store.put("a", state(user("x")), ttl_s=TTL_S)
    assert replaced.created_at == 1_000_000 and replaced.updated_at == 1_000_010, "a replace keeps created_at"
    assert store.get("a").state.messages == [user("x")]
    store.delete("a")
    for call in (store.get, store.delete, lambda i: store.touch(i, ttl_s=TTL_S)):
        with pytest.raises(NotFoundError):
            call("a")
    with pytest.raises(NotFoundError):
        store.get("never")


def test_ttl_expiry_and_purge(store: SqlSessionStore, clock: Clock) -> None:
    store.put("old", state(user("1")), ttl_s=TTL_S)
    clock.now += 60
    store.put("new", state(user("2")), ttl_s=TTL_S)
    clock.now += 50  # "old" is past its 100 s, "new" is not
    with pytest.raises(NotFoundError):
        store.get("old")
    assert store.ids() == ["new"]
    assert store.purge_expired() == ["old"]
    assert store.purge_expired() == []
    store.touch("new", ttl_s=TTL_S)  # used again: another 100 s from now
    clock.now += 90
    assert store.get("new").updated_at == 1_000_110
    assert store.put("forever", state(), ttl_s=None).expires_at is None


def test_expired_id_put_again_is_a_new_session(store: SqlSessionStore, clock: Clock) -> None:
    store.put("a", state(user("1")), ttl_s=TTL_S)
    clock.now += 200
    assert store.put("a", state(user("2")), ttl_s=TTL_S).created_at == 1_000_200


def test_cap_evicts_least_recently_updated(store: SqlSessionStore, clock: Clock) -> None:
    for name in ("a", "b", "c", "d"):
        store.put(name, state(user(name)), ttl_s=TTL_S)
        clock.now += 1
    store.touch("a", ttl_s=TTL_S)  # "a" is now the most recent
    assert sorted(store.evict_beyond(2)) == ["b", "c"]
    assert sorted(store.ids()) == ["a", "d"]
    assert store.evict_beyond(2) == []
    store.put("e", state(), ttl_s=TTL_S)
    assert store.evict_beyond(1, keep=["d"]) and store.ids() == ["d"], "a kept session is never evicted"


def test_find_by_history_prefix_rules(store: SqlSessionStore, clock: Clock) -> None:
    turn1 = [user("what is 2+2?"), assistant("4")]
    store.put("s1", state(*turn1), ttl_s=TTL_S)
    clock.now += 1
    turn2 = [*turn1, user("and 3+3?"), assistant("6")]
    store.put("s2", state(*turn2), ttl_s=TTL_S)
    assert store.find_by_history([*turn1, user("next")]) == "s1"
    assert store.find_by_history([*turn2, user("next")]) == "s2", "the longest match wins"
    assert store.find_by_history(turn1) is None, "an equal history is not an extension"
    assert store.find_by_history([user("what is 2+2?"), assistant("5"), user("next")]) is None, "divergent"
    assert store.find_by_history([assistant("4"), user("what is 2+2?")]) is None
    assert store.find_by_history([]) is None
    assert store.find_by_history(["not a message", user("x")]) is None
    # what a client sends back differs in fields that do not matter
    echoed = [
        {"role": "user", "content": [{"type": "text", "text": "what is 2+"}, {"type": "text", "text": "2?"}]},
        {"role": "assistant", "content": "4", "refusal": None, "tool_calls": None, "annotations": []},
        user("next"),
    ]
    assert store.find_by_history(echoed) == "s1"


def test_find_by_history_newest_on_a_tie_and_skips_expired(store: SqlSessionStore, clock: Clock) -> None:
    history = [user("hi"), assistant("hello")]
    store.put("first", state(*history), ttl_s=TTL_S)
    clock.now += 1
    store.put("second", state(*history), ttl_s=TTL_S)
    assert store.find_by_history([*history, user("again")]) == "second"
    clock.now += 1
    store.touch("first", ttl_s=TTL_S)
    assert store.find_by_history([*history, user("again")]) == "first"
    store.delete("first")
    assert store.find_by_history([*history, user("again")]) == "second"
    clock.now += TTL_S + 5
    assert store.find_by_history([*history, user("again")]) is None, "expired sessions do not match"


def test_find_by_history_matches_the_visible_history(store: SqlSessionStore) -> None:
    """The tool rounds the loop ran are stored but hidden: the client never sends them back."""
    stored = state(user("compute"), *TOOL_ROUND, assistant("it is 2"), hidden=[1, 2])
    store.put("agent", stored, ttl_s=TTL_S)
    assert store.find_by_history([user("compute"), assistant("it is 2"), user("thanks")]) == "agent"
    assert store.find_by_history([user("compute"), *TOOL_ROUND, assistant("it is 2"), user("x")]) is None


def test_a_reopened_store_sees_the_sessions(open_db: OpenDb, tmp_path: Path, clock: Clock) -> None:
    history = [user("remember me"), assistant("ok")]
    first = SqlSessionStore(open_db(tmp_path), clock=clock)
    first.put("kept", SessionState(history, approvals={"shell": "deny"}), ttl_s=TTL_S)
    first.put("gone", state(user("bye")), ttl_s=TTL_S)
    first.delete("gone")
    first.db.close()
    again = SqlSessionStore(open_db(tmp_path), clock=clock)
    assert again.get("kept").state.approvals == {"shell": "deny"}
    assert again.find_by_history([*history, user("back")]) == "kept", "the index is rebuilt at open"
    assert again.ids() == ["kept"]


def test_a_stale_index_entry_is_checked_against_the_row(
    open_db: OpenDb, store: SqlSessionStore, tmp_path: Path
) -> None:
    """Another writer (a second store over the file) replaced the session: the hint is not trusted."""
    history = [user("a"), assistant("b")]
    store.put("s", state(*history), ttl_s=TTL_S)
    other = SqlSessionStore(open_db(tmp_path), clock=store.clock)
    other.put("s", state(user("other")), ttl_s=TTL_S)
    assert store.find_by_history([*history, user("c")]) is None


def test_concurrent_puts_and_lookups(store: SqlSessionStore) -> None:
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for k in range(10):
                history = [user(f"{n}-{k}"), assistant("ok")]
                store.put(f"t{n}-{k}", state(*history), ttl_s=TTL_S)
                assert store.find_by_history([*history, user("more")]) == f"t{n}-{k}"
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(store.ids()) == 80


def test_message_key_ignores_what_clients_add() -> None:
    a = {"role": "assistant", "content": None, "tool_calls": [CALL]}
    b = {"role": "assistant", "content": "", "refusal": None, "tool_calls": [dict(CALL, type="function")]}
    assert message_key(a) == message_key(b)
    assert message_key(user("x")) != message_key(assistant("x"))


# the manager


def test_session_ids_are_checked() -> None:
    assert check_session_id("user-42_chat") == "user-42_chat"
    for bad in ("", "../etc", "a/b", "a b", "x" * 129, 42, None, "é"):
        with pytest.raises(InvalidRequestError) as e:
            check_session_id(bad)
        assert e.value.param == "session_id"


def test_resolve_creates_finds_and_matches(manager: SessionManager, tmp_path: Path) -> None:
    new = manager.resolve(None, [user("hi")])
    assert new.is_new and new.id.startswith("sess_") and new.messages == [user("hi")]
    assert new.workdir == tmp_path / "sessions" / new.id / "work" and new.workdir.is_dir()
    manager.save(new, [user("hi"), assistant("hello")])
    again = manager.resolve(None, [user("hi"), assistant("hello"), user("more")])
    assert again.id == new.id and not again.is_new
    other = manager.resolve(None, [user("hi"), assistant("bye"), user("more")])
    assert other.id != new.id, "a divergent history starts a new session"
    named = manager.resolve("mine", [user("x")])
    assert named.id == "mine" and named.is_new
    assert manager.resolve("mine", [user("x")]).is_new is False
    with pytest.raises(InvalidRequestError):
        manager.resolve("../../x", [user("x")])


def run_turn(manager: SessionManager, session: AgentSession, answer: str) -> list[dict[str, Any]]:
    """What the loop does: run session.messages, add one tool round and the answer, save."""
    messages = [*session.messages, *TOOL_ROUND, assistant(answer)]
    manager.save(session, messages, approvals={"python": "auto"}, files=["file-a"])
    return messages


def test_tool_rounds_are_kept_and_hidden(manager: SessionManager, store: SqlSessionStore) -> None:
    first = manager.resolve(None, [user("compute")])
    run_turn(manager, first, "it is 2")
    stored = store.get(first.id).state
    assert (
        stored.hidden == [1, 2] and stored.approvals == {"python": "approve"} and stored.files == ["file-a"]
    )
    # the client sends back what it saw, plus its next question
    second = manager.resolve(None, [user("compute"), assistant("it is 2"), user("double it")])
    assert second.id == first.id and second.approvals == {"python": "approve"}
    assert second.messages == [user("compute"), *TOOL_ROUND, assistant("it is 2"), user("double it")]
    assert second.hidden == {1, 2} and second.remembered("python") is True
    run_turn(manager, second, "4")
    assert store.get(first.id).state.hidden == [1, 2, 5, 6]


def test_explicit_id_with_only_the_new_turn_continues(manager: SessionManager) -> None:
    first = manager.resolve("chat", [user("compute")])
    run_turn(manager, first, "it is 2")
    second = manager.resolve("chat", [user("double it")])
    assert second.messages == [user("compute"), *TOOL_ROUND, assistant("it is 2"), user("double it")]
    assert second.hidden == {1, 2}


def test_editing_an_earlier_turn(manager: SessionManager) -> None:
    first = manager.resolve("chat", [user("compute")])
    run_turn(manager, first, "it is 2")
    edited = manager.resolve("chat", [user("compute"), assistant("it is two"), user("ok")])
    # the tool round before the edit is kept; the edited answer replaces the stored one
    assert edited.messages == [user("compute"), *TOOL_ROUND, assistant("it is two"), user("ok")]


def test_splice_without_a_stored_history() -> None:
    assert splice(SessionState(), [user("a")], explicit=True) == ([user("a")], [])
    stored = state(user("a"), assistant("b"))
    assert splice(stored, [user("z")], explicit=False) == ([user("z")], [])


def test_delete_removes_the_workdir_and_closes(manager: SessionManager, closed: list[str]) -> None:
    session = manager.resolve("gone", [user("x")])
    (session.workdir / "out.txt").write_text("data")
    manager.delete("gone")
    assert not session.workdir.parent.exists() and closed == ["gone"]
    with pytest.raises(NotFoundError):
        manager.export("gone")
    with pytest.raises(NotFoundError):
        manager.delete("gone")


def test_cap_and_ttl_remove_workdirs(manager: SessionManager, clock: Clock, closed: list[str]) -> None:
    sessions = []
    for name in ("a", "b", "c", "d"):  # the cap is 3
        sessions.append(manager.resolve(name, [user(name)]))
        clock.now += 1
    assert closed == ["a"] and not sessions[0].workdir.exists() and sessions[3].workdir.exists()
    clock.now += TTL_S
    assert sorted(manager.purge()) == ["b", "c", "d"]
    assert sorted(closed) == ["a", "b", "c", "d"] and not any(s.workdir.exists() for s in sessions)


def test_a_failing_close_hook_does_not_stop_the_delete(manager: SessionManager, closed: list[str]) -> None:
    def broken(session_id: str) -> None:
        raise RuntimeError("boom")

    manager._close_hooks.insert(0, broken)
    manager.resolve("x", [user("x")])
    manager.delete("x")
    assert closed == ["x"]


def test_orphan_workdirs_are_removed_at_start(store: SqlSessionStore, tmp_path: Path) -> None:
    (tmp_path / "sessions" / "orphan" / "work").mkdir(parents=True)
    store.put("alive", SessionState(), ttl_s=TTL_S)
    (tmp_path / "sessions" / "alive" / "work").mkdir(parents=True)
    SessionManager(store, tmp_path, ttl_s=TTL_S, max_sessions=3)
    assert not (tmp_path / "sessions" / "orphan").exists() and (tmp_path / "sessions" / "alive").exists()


def test_export_import_round_trip(manager: SessionManager, closed: list[str]) -> None:
    session = manager.resolve("src", [user("compute")])
    run_turn(manager, session, "it is 2")
    exported = manager.export("src")
    assert exported["object"] == "session" and exported["id"] == "src"
    assert exported["hidden_messages"] == [1, 2] and exported["approvals"] == {"python": "approve"}
    copy = manager.import_("dst", exported)
    assert copy["id"] == "dst" and copy["messages"] == exported["messages"] and closed == []
    assert manager.resolve("dst", [user("next")]).hidden == {1, 2}
    manager.import_("src", {"messages": [user("replaced")]})
    assert closed == ["src"], "a replaced session's interpreter is closed"
    assert manager.export("src")["messages"] == [user("replaced")]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ([], None),
        ({}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [42]}, "messages[0]"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"text": "no type"}]}]}, "messages[0].content"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        ({"messages": [{"role": "user", "tool_calls": []}]}, "messages[0].tool_calls"),
        (
            {"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": 1}}]}]},
            "messages[0].tool_calls[0]",
        ),
        ({"messages": [user("x")], "hidden_messages": [1]}, "hidden_messages"),
        ({"messages": [user("x")], "hidden_messages": [True]}, "hidden_messages"),
        ({"messages": [user("x"), user("y")], "hidden_messages": [0, 0]}, "hidden_messages"),
        ({"messages": [], "approvals": {"python": "maybe"}}, "approvals"),
        ({"messages": [], "files": [1]}, "files"),
        ({"messages": [], "mesages": []}, "mesages"),
    ],
)
def test_bad_imports_are_refused(manager: SessionManager, body: Any, param: str | None) -> None:
    with pytest.raises(InvalidRequestError) as e:
        manager.import_("x", body)
    assert e.value.param == param
    with pytest.raises(NotFoundError):
        manager.export("x")
