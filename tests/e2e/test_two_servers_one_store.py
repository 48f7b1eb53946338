"""Two real CLI servers (subprocesses) sharing one PostgreSQL store and one blob
directory, as replicas do: whatever one stores, the other serves; a response
created through one is fetched, continued, cancelled and deleted through the
other; a replica killed mid-response leaves it failed by the survivor; a file
uploaded through one is read through the other, byte for byte."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from live_server import free_port
from server_process import kill_hard, start, stop

from tests.pg_server import PostgresServer

LEASE_S = 3.0
LONG = {"input": "Write a very long story about a lighthouse.", "max_output_tokens": 4000, "temperature": 0}


@dataclass
class Replicas:
    bases: list[str]
    shared: Path  # the data directory (blobs, the reasoning key, sessions) they share
    flags: tuple[str, ...]  # --store and the lease

    def __iter__(self) -> Iterator[str]:
        return iter(self.bases)


@pytest.fixture(scope="module")
def replicas(pg_server: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    shared = tmp_path_factory.mktemp("replicas-data")
    flags = ("--store", pg_server.create_database(), "--replica-lease-s", str(LEASE_S))
    procs = []
    try:
        for name in ("a", "b"):
            port = free_port()
            procs.append((start(shared, port, shared / f"{name}.log", *flags), port))
        yield Replicas([f"http://127.0.0.1:{port}" for _, port in procs], shared, flags)
    finally:
        for proc, _ in procs:
            stop(proc)


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)


def raw(base: str, path: str) -> httpx.Response:
    return httpx.get(f"{base}{path}", timeout=60)


def wait_status(base: str, rid: str, wanted: set[str], timeout_s: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        obj: dict[str, Any] = orjson.loads(raw(base, f"/v1/responses/{rid}").content)
        if obj["status"] in wanted or time.monotonic() > deadline:
            return obj
        time.sleep(0.2)


def test_files_written_through_one_are_read_through_the_other(replicas: Replicas) -> None:
    a, b = replicas
    data = bytes(range(256)) * 4000
    made = client(a).files.create(file=("blob.bin", data), purpose="user_data")
    assert client(b).files.content(made.id).content == data
    assert client(b).files.retrieve(made.id).model_dump() == made.model_dump()
    client(b).files.delete(made.id)
    with pytest.raises(openai.NotFoundError):
        client(a).files.retrieve(made.id)


def test_a_response_is_fetched_continued_and_deleted_through_the_other(replicas: Replicas) -> None:
    a, b = replicas
    first = client(a).responses.create(
        model="default", input="Name a color.", max_output_tokens=8, temperature=0, store=True
    )
    assert raw(b, f"/v1/responses/{first.id}").content == raw(a, f"/v1/responses/{first.id}").content
    items_a = raw(a, f"/v1/responses/{first.id}/input_items").json()
    assert raw(b, f"/v1/responses/{first.id}/input_items").json() == items_a
    second = client(b).responses.create(
        model="default", input="And another one?", previous_response_id=first.id, max_output_tokens=8
    )
    assert second.status in ("completed", "incomplete") and second.previous_response_id == first.id
    fetched = client(a).responses.retrieve(second.id)
    assert fetched.previous_response_id == first.id
    client(b).responses.delete(first.id)
    for base in (a, b):
        assert raw(base, f"/v1/responses/{first.id}").status_code == 404


def test_a_background_response_is_cancelled_through_the_other(replicas: Replicas) -> None:
    a, b = replicas
    started = client(a).responses.create(model="default", background=True, **LONG)  # type: ignore[arg-type]
    wait_status(b, started.id, {"in_progress"})
    cancelled = client(b).responses.cancel(started.id)
    assert cancelled.status == "cancelled"
    # the job on a stops at its next save: its row stays cancelled, and a's engine idles
    time.sleep(2.5)
    assert client(a).responses.retrieve(started.id).status == "cancelled"
    metrics = raw(a, "/metrics").text
    running = [
        line for line in metrics.splitlines() if line.startswith("mistralrs_serve_num_requests_running")
    ]
    assert running and all(
        line.rstrip().endswith(" 0") or line.rstrip().endswith(" 0.0") for line in running
    ), running
    # a follower through b gets the stored end
    with httpx.stream("GET", f"{b}/v1/responses/{started.id}?stream=true", timeout=60) as r:
        body = b"".join(r.iter_bytes())
    assert b"response.incomplete" in body and b'"status":"cancelled"' in body


def test_a_killed_replica_leaves_its_response_failed_by_the_survivor(
    replicas: Replicas, tmp_path: Path
) -> None:
    a, _ = replicas
    victim_port = free_port()  # a third replica on the same store, to be killed
    victim = start(replicas.shared, victim_port, tmp_path / "victim.log", *replicas.flags)
    try:
        base = f"http://127.0.0.1:{victim_port}"
        started = client(base).responses.create(model="default", background=True, **LONG)  # type: ignore[arg-type]
        wait_status(a, started.id, {"in_progress"})
        kill_hard(victim)
        failed = wait_status(a, started.id, {"failed"}, timeout_s=LEASE_S * 6)
        assert failed["status"] == "failed", failed
        assert "replica running this response stopped" in failed["error"]["message"]
    finally:
        stop(victim)
