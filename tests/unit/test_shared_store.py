"""What replicas sharing one store rely on, against SQLite and a real PostgreSQL
(the `open_db` fixture, tests/conftest.py): migrations that run once when many
servers open a database together, instances' heartbeats and the failing of
what a dead one left running, and rows that another replica has ended."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from mistralrs_serve.entrypoints.openai.responses_run import REPLICA_DIED, InstanceLease, ended_object
from mistralrs_serve.store.db import SCHEMA_VERSION, SqlDatabase, StoreError
from mistralrs_serve.store.files import SqlFileStore
from mistralrs_serve.store.responses import SqlResponseStore, StoredResponse

OpenDb = Callable[..., SqlDatabase]  # the open_db fixture (tests/conftest.py): SQLite, then PostgreSQL


def record(rid: str, status: str = "in_progress") -> StoredResponse:
    obj = {"id": rid, "object": "response", "status": status, "output": [{"status": "in_progress"}]}
    return StoredResponse(rid, 1, status, True, None, orjson.dumps(obj))


def test_many_servers_opening_at_once_migrate_once(open_db: OpenDb, tmp_path: Path) -> None:
    opened: list[SqlDatabase] = []
    errors: list[BaseException] = []

    def open_one() -> None:
        try:
            opened.append(open_db(tmp_path))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=open_one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(opened) == 8
    assert [tuple(r) for r in opened[0].read("SELECT version FROM schema_version")] == [(SCHEMA_VERSION,)]
    # every one of them works on the same tables
    files = [SqlFileStore(db) for db in opened]
    made = files[3].create(b"one store", filename="a.txt", purpose="user_data")
    assert files[5].get(made.id) == made


def test_a_newer_schema_is_refused(open_db: OpenDb, tmp_path: Path) -> None:
    db = open_db(tmp_path)
    with db.write() as conn:
        conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(StoreError, match="newer than this server's"):
        open_db(tmp_path)


def test_what_a_dead_instance_ran_fails_and_a_live_ones_does_not(open_db: OpenDb, tmp_path: Path) -> None:
    alive, dead = SqlResponseStore(open_db(tmp_path)), SqlResponseStore(open_db(tmp_path))
    alive.heartbeat()
    dead.heartbeat()
    alive.insert(record("resp_alive"), [])
    dead.insert(record("resp_dead"), [])
    assert alive.orphaned(stale_s=60) == []
    with dead.db.write() as conn:  # its heartbeat stopped two minutes ago
        conn.execute(
            "UPDATE instances SET heartbeat_at = heartbeat_at - 120 WHERE id = ?", (dead.db.instance_id,)
        )
    assert [r.id for r in alive.orphaned(stale_s=60)] == ["resp_dead"]
    lease = InstanceLease(alive, stale_s=60, every_s=3600)  # its first tick runs at once
    try:
        failed = alive.get("resp_dead")
        assert failed is not None and failed.status == "failed"
        obj = orjson.loads(failed.object_json)
        assert obj["error"]["message"] == REPLICA_DIED and obj["output"][0]["status"] == "incomplete"
        running = alive.get("resp_alive")
        assert running is not None and running.status == "in_progress"
        assert lease.tick() == 0, "failed once, not again"
    finally:
        lease.close()


def test_a_row_ended_elsewhere_is_not_overwritten(open_db: OpenDb, tmp_path: Path) -> None:
    runner_side, other_side = SqlResponseStore(open_db(tmp_path)), SqlResponseStore(open_db(tmp_path))
    runner_side.insert(record("resp_x"), [])
    stored = other_side.get("resp_x")
    assert stored is not None
    assert other_side.update("resp_x", "cancelled", ended_object(stored, "cancelled", None))
    # the job on the other replica saves its progress: refused, so it knows to stop
    assert not runner_side.update("resp_x", "in_progress", orjson.dumps({"status": "in_progress"}))
    got = runner_side.get("resp_x")
    assert got is not None and got.status == "cancelled"
    assert orjson.loads(got.object_json)["status"] == "cancelled"


def test_concurrent_writes_from_two_instances(open_db: OpenDb, tmp_path: Path) -> None:
    stores = [SqlResponseStore(open_db(tmp_path)) for _ in range(2)]

    def write(n: int) -> None:
        store = stores[n % 2]
        for i in range(20):
            rid = f"resp_{n}_{i}"
            store.insert(record(rid), [])
            assert store.update(rid, "completed", orjson.dumps({"status": "completed"}))

    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert stores[0].unfinished() == []
    assert len(stores[1].db.read("SELECT id FROM responses WHERE status = 'completed'")) == 160
