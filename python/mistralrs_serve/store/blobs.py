"""Where stored files' bytes live: a directory (local, or shared by every
replica over NFS or the like) or an S3-compatible bucket, chosen by URL.

A blob is written whole under a fresh name before the row that names it, so
a crash leaves at worst a blob without a row, which `sweep` removes once it
is older than a grace period (a replica may be between the two steps).
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Protocol
from urllib.parse import urlsplit

from mistralrs_serve.errors import MistralrsServeError, StorageFullError

logger = logging.getLogger(__name__)

_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# a write is refused up front when the blob directory's disk has less room than this left
MIN_FREE_BYTES = 1 << 20


class StoreError(MistralrsServeError):
    """The store cannot be used (a newer schema, a damaged file, no permission, unreachable)."""


class BlobStore(Protocol):
    url: str

    def write(self, data: bytes) -> str:
        """Store bytes durably under a fresh name, which is returned."""
        ...

    def open(self, name: str) -> BinaryIO:
        """The bytes as a stream the caller closes; FileNotFoundError when there is no such blob."""
        ...

    def read(self, name: str) -> bytes: ...

    def delete(self, name: str) -> None:
        """Remove a blob; nothing happens when it is already gone."""
        ...

    def check_room(self, nbytes: int) -> None:
        """StorageFullError when nbytes more cannot be stored (checked before any work)."""
        ...

    def sweep(self, referenced: set[str], grace_s: float) -> int:
        """Delete the blobs not in `referenced` older than grace_s; how many."""
        ...


def full_disk_error(where: object, e: BaseException) -> StorageFullError:
    logger.error("the store at %s is full: %s", where, e)
    return StorageFullError(
        f"the server's data directory is full ({e}); nothing was stored: free space on its disk "
        "or delete stored files and responses, then retry"
    )


@contextlib.contextmanager
def full_disk_errors(where: object, is_full: Callable[[BaseException], bool]) -> Iterator[None]:
    """Turn the errors is_full recognises into StorageFullError."""
    try:
        yield
    except Exception as e:
        if isinstance(e, StorageFullError) or not is_full(e):
            raise
        raise full_disk_error(where, e) from None


def is_full_os_error(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in _FULL_ERRNOS


class DirBlobStore:
    """Blobs as files in one directory, written to a temporary name, fsynced and renamed."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser()
        self.url = str(self.path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create the blob directory {self.path}: {e}") from None

    def write(self, data: bytes) -> str:
        name = uuid.uuid4().hex
        final = self.path / name
        tmp = self.path / f".{name}.tmp"
        with full_disk_errors(self.path, is_full_os_error):
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, final)
                fsync_dir(self.path)
            except BaseException:
                for path in (tmp, final):  # a partial blob would hold the space it took
                    with contextlib.suppress(OSError):
                        path.unlink()
                raise
        return name

    def open(self, name: str) -> BinaryIO:
        return (self.path / name).open("rb")

    def read(self, name: str) -> bytes:
        return (self.path / name).read_bytes()

    def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.path / name).unlink()

    def check_room(self, nbytes: int) -> None:
        check_disk_room(self.path, nbytes)

    def sweep(self, referenced: set[str], grace_s: float) -> int:
        cutoff = time.time() - grace_s
        swept = 0
        for entry in self.path.iterdir():
            with contextlib.suppress(OSError):  # gone meanwhile, or not ours to delete
                if entry.name not in referenced and entry.is_file() and entry.stat().st_mtime < cutoff:
                    entry.unlink()
                    swept += 1
        return swept


class S3BlobStore:
    """Blobs as objects under a prefix of an S3-compatible bucket (boto3).

    `s3://bucket/prefix`; the endpoint (MinIO, Ceph, R2...) comes from
    $AWS_ENDPOINT_URL or `?endpoint=http://host:port` in the URL, the
    credentials from boto3's usual chain. A put is atomic: a crash leaves no
    partial object."""

    def __init__(self, url: str) -> None:
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise StoreError(
                "an s3:// blob store needs boto3: pip install 'mistralrs-serve[postgres]'"
            ) from None
        parts = urlsplit(url)
        if not parts.netloc:
            raise StoreError(f"the blob store URL {url!r} names no bucket (s3://bucket/prefix)")
        query = dict(p.split("=", 1) for p in parts.query.split("&") if "=" in p)
        self.url = url
        self.bucket = parts.netloc
        self.prefix = parts.path.strip("/")
        self.prefix = f"{self.prefix}/" if self.prefix else ""
        endpoint = query.get("endpoint") or os.environ.get("AWS_ENDPOINT_URL")
        self.client: Any = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name=query.get("region") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
            config=Config(retries={"max_attempts": 5, "mode": "standard"}),
        )
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as e:
            raise StoreError(f"cannot reach the bucket of the blob store {url}: {e}") from None

    def write(self, data: bytes) -> str:
        name = uuid.uuid4().hex
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.prefix + name, Body=data)
        except Exception as e:
            if "EntityTooLarge" in str(e) or "QuotaExceeded" in str(e):
                raise full_disk_error(self.url, e) from None
            raise
        return name

    def open(self, name: str) -> BinaryIO:
        return io.BytesIO(self.read(name))

    def read(self, name: str) -> bytes:
        try:
            found = self.client.get_object(Bucket=self.bucket, Key=self.prefix + name)
        except self.client.exceptions.NoSuchKey:
            raise FileNotFoundError(name) from None
        data: bytes = found["Body"].read()
        return data

    def delete(self, name: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.prefix + name)

    def check_room(self, nbytes: int) -> None:
        return  # a bucket says so when it refuses a put

    def sweep(self, referenced: set[str], grace_s: float) -> int:
        cutoff = time.time() - grace_s
        swept = 0
        for page in self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix
        ):
            for obj in page.get("Contents", []):
                name = obj["Key"][len(self.prefix) :]
                if "/" in name or name in referenced or obj["LastModified"].timestamp() >= cutoff:
                    continue
                self.delete(name)
                swept += 1
        return swept


def open_blob_store(url: str | os.PathLike[str]) -> BlobStore:
    """A directory path (or file:// URL), or s3://bucket/prefix."""
    text = str(url)
    scheme = urlsplit(text).scheme
    if scheme == "s3":
        return S3BlobStore(text)
    if scheme == "file":
        return DirBlobStore(urlsplit(text).path)
    if scheme and len(scheme) > 1:
        raise StoreError(f"unknown blob store {text!r}: give a directory or s3://bucket/prefix")
    return DirBlobStore(text)


def check_disk_room(path: Path, nbytes: int) -> None:
    """StorageFullError unless path's disk has room for nbytes more, and MIN_FREE_BYTES beside."""
    try:
        st = os.statvfs(path)
    except OSError:
        return  # cannot tell: the write itself will say
    free = st.f_bavail * st.f_frsize
    if free < nbytes + MIN_FREE_BYTES:
        raise full_disk_error(path, OSError(errno.ENOSPC, f"{free} bytes free, {nbytes} to store"))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
