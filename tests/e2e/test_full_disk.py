"""A data directory on a disk that fills up: a small tmpfs mounted by the test
(root only: elsewhere the test is skipped, saying why). Writes are refused with
a 507 in OpenAI's envelope, nothing half-written stays behind, what was stored
before reads back intact, requests that store nothing go on, and once space
is freed the same writes succeed."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from live_server import start_server, stop_server
from mistralrs_serve.config import ServerConfig
from mistralrs_serve.errors import StorageFullError
from mistralrs_serve.store.db import SqliteDatabase
from mistralrs_serve.store.files import SqlFileStore

DISK_BYTES = 8 << 20


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Write one file until the disk refuses another byte."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for size in (1 << 20, 1 << 16, 1 << 12, 1 << 8, 1):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * size):
                    pass
    finally:
        os.close(fd)
    return filler


def test_the_store_refuses_writes_on_a_full_disk_and_keeps_what_it_has(small_disk: Path) -> None:
    db = SqliteDatabase(small_disk / "data")
    files = SqlFileStore(db)
    kept = files.create(b"kept" * 1000, filename="kept.txt", purpose="user_data")
    filler = fill(small_disk)
    # past the up-front check (as when two writers race for the last bytes): the write itself fails
    with pytest.raises(StorageFullError, match="data directory is full"):
        db.write_blob(os.urandom(300_000))
    assert [p for p in db.blob_dir.iterdir() if p.name != kept_blob(db, kept.id)] == []
    with pytest.raises(StorageFullError):
        files.create(b"x" * 10, filename="x.txt", purpose="user_data")
    with pytest.raises(StorageFullError), db.write() as conn:  # SQLite's own "disk is full"
        conn.execute("INSERT INTO sessions VALUES ('s', 0, 0, NULL, ?)", ("x" * 5_000_000,))
    assert files.get(kept.id) == kept
    with db.write() as conn:  # the connection is usable again
        conn.execute("SELECT 1")
    filler.unlink()
    again = files.create(b"again", filename="again.txt", purpose="user_data")
    assert files.get(again.id).bytes == 5


def kept_blob(db: SqliteDatabase, file_id: str) -> str:
    return str(db.read("SELECT blob FROM files WHERE id = ?", (file_id,))[0][0])


def test_a_full_data_disk_is_a_507_and_loses_nothing(small_disk: Path, default_runner: Any) -> None:
    live = start_server(ServerConfig(data_dir=str(small_disk / "data")), lambda: default_runner.client)
    try:
        client, http = live.client(), live.http()
        before = client.files.create(file=("a.txt", b"stored before" * 100), purpose="user_data")
        stored = http.post("/v1/responses", json={"input": "Hi", "max_output_tokens": 4, "temperature": 0})
        assert stored.status_code == 200, stored.text
        filler = fill(small_disk)

        with pytest.raises(openai.APIStatusError) as refused:
            client.files.create(file=("b.txt", b"no room"), purpose="user_data")
        assert refused.value.status_code == 507
        body: Any = refused.value.body
        assert body["code"] == "insufficient_storage" and body["type"] == "server_error", body
        assert "full" in body["message"]
        for request in (
            {"input": "Hi", "max_output_tokens": 4},
            {"input": "Hi", "max_output_tokens": 4, "stream": True},
            {"input": "Hi", "max_output_tokens": 4, "background": True},
        ):
            r = http.post("/v1/responses", json=request)
            assert r.status_code == 507 and r.json()["error"]["code"] == "insufficient_storage", r.text
        _still_serves(client, http, before.id, stored)
        assert not [p for p in (small_disk / "data" / "blobs").iterdir() if p.name.endswith(".tmp")]

        filler.unlink()
        after = client.files.create(file=("c.txt", b"room again"), purpose="user_data")
        assert client.files.content(after.id).content == b"room again"
        again = http.post("/v1/responses", json={"input": "Hi", "max_output_tokens": 4})
        assert again.status_code == 200, again.text
    finally:
        stop_server(live)


def _still_serves(client: openai.OpenAI, http: httpx.Client, file_id: str, stored: httpx.Response) -> None:
    """Reads and requests that store nothing are untouched by the full disk."""
    assert client.files.content(file_id).content == b"stored before" * 100
    assert http.get(f"/v1/responses/{stored.json()['id']}").content == stored.content
    unstored = http.post("/v1/responses", json={"input": "Hi", "max_output_tokens": 4, "store": False})
    assert unstored.status_code == 200, unstored.text
    chat = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert chat.choices[0].message.content is not None
    assert http.get("/health").status_code == 200


def test_errno_of_a_full_disk_is_enospc(small_disk: Path) -> None:
    """The fixture's disk really fills (the tests above rely on it)."""
    fill(small_disk)
    with pytest.raises(OSError) as full:
        (small_disk / "more").write_bytes(b"x" * 8192)
    assert full.value.errno == errno.ENOSPC
