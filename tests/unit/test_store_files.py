"""SqlFileStore over a scratch data directory: round trips, listing, expiry,
durability across a reopen, and 32 threads at once."""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from mistralrs_serve.errors import InvalidRequestError, NotFoundError
from mistralrs_serve.store.db import SqlDatabase
from mistralrs_serve.store.files import SqlFileStore, read_all

OpenDb = Callable[..., SqlDatabase]  # the open_db fixture (tests/conftest.py): SQLite, then PostgreSQL


@pytest.fixture
def store(open_db: OpenDb, tmp_path: Path) -> SqlFileStore:
    return SqlFileStore(open_db(tmp_path))


def test_create_get_content_delete(store: SqlFileStore) -> None:
    data = bytes(range(256)) * 41
    f = store.create(data, filename="blob.bin", purpose="user_data")
    assert f.id.startswith("file-") and f.bytes == len(data) and f.content_type == "application/octet-stream"
    assert store.get(f.id) == f
    assert read_all(store, f.id) == (f, data)
    obj = f.to_openai()
    assert obj["object"] == "file" and obj["status"] == "processed" and "expires_at" not in obj
    store.delete(f.id)
    for call in (store.get, store.delete, lambda i: store.open(i)):
        with pytest.raises(NotFoundError):
            call(f.id)
    assert not list(store.db.blob_dir.iterdir()), "the blob goes with the row"


def test_content_type_kept_or_guessed_from_the_name(store: SqlFileStore) -> None:
    assert store.create(b"a,b", filename="t.csv", purpose="user_data").content_type == "text/csv"
    given = store.create(b"{}", filename="x", purpose="user_data", content_type="application/json")
    assert given.content_type == "application/json"
    generic = store.create(
        b"%PDF", filename="r.pdf", purpose="user_data", content_type="application/octet-stream"
    )
    assert generic.content_type == "application/pdf"


def test_names_are_one_printable_path_component(store: SqlFileStore) -> None:
    assert store.create(b"x", filename="../etc/pa\nss\x00wd", purpose="user_data").filename == "passwd"
    assert (
        store.create(b"x", filename="C:\\dir\\r\u00e9sum\u00e9.pdf", purpose="user_data").filename
        == "r\u00e9sum\u00e9.pdf"
    )
    assert store.create(b"x", filename="\x07", purpose="user_data").filename == "file"


def test_list_order_purpose_limit_after(store: SqlFileStore) -> None:
    ids = [store.create(b"x", filename=f"{i}.txt", purpose="user_data").id for i in range(5)]
    other = store.create(b"y", filename="b.jsonl", purpose="batch").id
    assert [f.id for f in store.list().data] == [other, *ids[::-1]]
    asc = store.list(purpose="user_data", order="asc")
    assert [f.id for f in asc.data] == ids and not asc.has_more
    page = store.list(purpose="user_data", order="asc", limit=2)
    assert [f.id for f in page.data] == ids[:2] and page.has_more
    page = store.list(purpose="user_data", order="asc", limit=2, after=ids[1])
    assert [f.id for f in page.data] == ids[2:4] and page.has_more
    page = store.list(purpose="user_data", order="desc", limit=10, after=ids[2])
    assert [f.id for f in page.data] == ids[1::-1] and not page.has_more
    empty = store.list(purpose="vision").to_openai()
    assert empty == {"object": "list", "data": [], "first_id": "", "last_id": "", "has_more": False}
    for kwargs, param in (({"limit": 0}, "limit"), ({"limit": 10_001}, "limit"), ({"order": "up"}, "order")):
        with pytest.raises(InvalidRequestError) as e:
            store.list(**kwargs)  # type: ignore[arg-type]
        assert e.value.param == param
    with pytest.raises(InvalidRequestError) as e:
        store.list(after="file-nope")
    assert e.value.param == "after"


def test_expiry_bounds_and_expired_files_are_gone(store: SqlFileStore) -> None:
    for seconds in (3599, 2_592_001):
        with pytest.raises(InvalidRequestError) as e:
            store.create(b"x", filename="a", purpose="user_data", expires_after_s=seconds)
        assert e.value.param == "expires_after.seconds"
    f = store.create(b"x", filename="a", purpose="user_data", expires_after_s=3600)
    assert f.expires_at == f.created_at + 3600 and f.to_openai()["expires_at"] == f.expires_at
    with store.db.write() as conn:  # as if an hour had passed
        conn.execute("UPDATE files SET expires_at = ? WHERE id = ?", (int(time.time()) - 1, f.id))
    with pytest.raises(NotFoundError):
        store.get(f.id)
    assert store.list().data == []
    assert store.purge_expired() == 1
    assert not list(store.db.blob_dir.iterdir())


def test_durable_across_a_reopen(open_db: OpenDb, tmp_path: Path) -> None:
    first = SqlFileStore(open_db(tmp_path))
    payloads = {
        first.create(os.urandom(n), filename=f"{n}.bin", purpose="user_data"): n for n in (0, 1, 70_000)
    }
    contents = {f.id: read_all(first, f.id)[1] for f in payloads}
    first.db.close()
    again = SqlFileStore(open_db(tmp_path))
    for f in payloads:
        assert again.get(f.id) == f
        assert read_all(again, f.id)[1] == contents[f.id]
    assert {f.id for f in again.list().data} == set(contents)


def test_a_failed_insert_leaves_no_blob(store: SqlFileStore) -> None:
    with store.db.write() as conn:
        if store.db.dialect == "sqlite":
            conn.execute(
                "CREATE TRIGGER no_files BEFORE INSERT ON files BEGIN SELECT RAISE(ABORT, 'full'); END"
            )
        else:
            conn.execute(
                "CREATE FUNCTION no_files() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'full'; END $$ "
                "LANGUAGE plpgsql"
            )
            conn.execute(
                "CREATE TRIGGER no_files BEFORE INSERT ON files FOR EACH ROW EXECUTE FUNCTION no_files()"
            )
    with pytest.raises(Exception, match="full"):
        store.create(b"x", filename="a", purpose="user_data")
    assert not list(store.db.blob_dir.iterdir())


def test_32_threads_create_get_delete_at_once(open_db: OpenDb, tmp_path: Path) -> None:
    store = SqlFileStore(open_db(tmp_path))
    kept: dict[str, bytes] = {}
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(32)

    def work(seed: int) -> None:
        rng = random.Random(seed)
        try:
            start.wait()
            for i in range(12):
                data = rng.randbytes(rng.randrange(1, 5000))
                f = store.create(data, filename=f"{seed}-{i}.bin", purpose="user_data")
                assert read_all(store, f.id)[1] == data
                if i % 3 == 0:
                    store.delete(f.id)
                else:
                    with lock:
                        kept[f.id] = data
                store.list(limit=5)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    listed = store.list()
    assert {f.id for f in listed.data} == set(kept) and len(kept) == 32 * 8
    for file_id, data in kept.items():
        assert read_all(store, file_id)[1] == data
    assert len(list(store.db.blob_dir.iterdir())) == len(kept)
