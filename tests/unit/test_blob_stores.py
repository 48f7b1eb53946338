"""The blob stores behind stored files: a directory, and an S3-compatible bucket
(moto's S3 server on loopback, spoken to by boto3 as any S3 endpoint is)."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mistralrs_serve.store.blobs import BlobStore, DirBlobStore, S3BlobStore, StoreError, open_blob_store
from mistralrs_serve.store.db import SqliteDatabase
from mistralrs_serve.store.files import SqlFileStore, read_all


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    old = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ.update(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def bucket(endpoint: str, name: str) -> str:
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return f"s3://{name}/blobs?endpoint={endpoint}"


@pytest.fixture(params=["dir", "s3"])
def blobs(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    if request.param == "dir":
        return open_blob_store(tmp_path / "blobs")
    endpoint = request.getfixturevalue("s3_endpoint")
    return open_blob_store(bucket(endpoint, f"b{time.time_ns()}"))


def test_write_read_open_delete(blobs: BlobStore) -> None:
    name = blobs.write(b"\x00bytes\xff" * 1000)
    assert blobs.read(name) == b"\x00bytes\xff" * 1000
    with blobs.open(name) as stream:
        assert stream.read(6) == b"\x00bytes"
    blobs.delete(name)
    blobs.delete(name)  # gone already: nothing happens
    with pytest.raises(FileNotFoundError):
        blobs.read(name)


def test_sweep_spares_referenced_and_recent_blobs(blobs: BlobStore) -> None:
    kept, orphan = blobs.write(b"kept"), blobs.write(b"orphan")
    assert blobs.sweep({kept}, grace_s=3600) == 0, "a blob younger than the grace may be a replica's upload"
    assert blobs.sweep({kept}, grace_s=-60) == 1
    assert blobs.read(kept) == b"kept"
    with pytest.raises(FileNotFoundError):
        blobs.read(orphan)


def test_files_over_a_bucket(s3_endpoint: str, tmp_path: Path) -> None:
    store = SqlFileStore(SqliteDatabase(tmp_path, open_blob_store(bucket(s3_endpoint, "files"))))
    made = store.create(b"hello bucket", filename="a.txt", purpose="user_data")
    assert read_all(store, made.id)[1] == b"hello bucket"
    store.delete(made.id)
    assert not (tmp_path / "blobs").exists(), "no bytes went to the data directory"


def test_bad_blob_store_urls(s3_endpoint: str, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="unknown blob store"):
        open_blob_store("ftp://host/x")
    with pytest.raises(StoreError, match="names no bucket"):
        S3BlobStore(f"s3:///x?endpoint={s3_endpoint}")
    with pytest.raises(StoreError, match="cannot reach the bucket"):
        S3BlobStore(f"s3://no-such-bucket/x?endpoint={s3_endpoint}")
    assert isinstance(open_blob_store(f"file://{tmp_path}/b"), DirBlobStore)
