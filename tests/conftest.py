"""Shared fixtures: the default model is loaded once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import torch

# Triton kernels run under Triton's interpreter without a GPU; the variable
# must be set before Triton is first imported (pytest imports this file first).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import tempfile

import pytest

# Stored responses and files of servers started by tests go to a scratch
# directory, never to the user's data directory.
os.environ.setdefault("MISTRALRS_SERVE_DATA_DIR", tempfile.mkdtemp(prefix="mistralrs-serve-test-data-"))

# Test data lives in the repository (tests/data/README.md says where each file comes from).
DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="session")
def default_runner():  # type: ignore[no-untyped-def]
    from mistralrs_serve import Runner, Which

    return Runner(which=Which.Default())


@pytest.fixture(scope="session")
def pg_server():  # type: ignore[no-untyped-def]
    """A PostgreSQL server for the test session (tests/pg_server.py); CI installs the package."""
    from tests import pg_server as pg

    if not pg.available():
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not installed: ci/test.sh installs Debian's postgresql")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    with pg.postgres_server() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def open_db(request, tmp_path):  # type: ignore[no-untyped-def]
    """Opens the store's database of one test, as a server would: SQLite under the data
    directory, or a fresh PostgreSQL database (blobs under the data directory); each call
    opens it again (a restart, another replica)."""
    from mistralrs_serve.store.blobs import DirBlobStore
    from mistralrs_serve.store.db import SqliteDatabase
    from mistralrs_serve.store.postgres import PostgresDatabase

    url = request.getfixturevalue("pg_server").create_database() if request.param == "postgresql" else None
    opened = []

    def open_(data_dir: Path = tmp_path):  # type: ignore[no-untyped-def]
        data_dir = Path(data_dir)
        if url is None:
            db = SqliteDatabase(data_dir)
        else:
            db = PostgresDatabase(url, data_dir, DirBlobStore(data_dir / "blobs"), max_size=40)
        opened.append(db)
        return db

    yield open_
    for db in opened:
        db.close()
