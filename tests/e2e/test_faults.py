"""Faults under the real CLI server (a subprocess): `kill -9` in the middle of
concurrent stored writes and background runs, and the model file truncated
and removed while it serves. (The full data disk is test_full_disk.py; a body
sent a byte at a time is test_http_security.py.)"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from live_server import free_port
from mistralrs_serve.models.default_model import default_model_path
from openai_schema import check
from server_process import kill_hard, start, stop

LOAD_S = 8.0  # how long the writers run before the kill


class Acked:
    """What the server acknowledged (answered 2xx for) before it was killed."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.files: dict[str, str] = {}  # id -> sha256 of the bytes sent
        self.deleted: set[str] = set()
        self.responses: dict[str, bytes] = {}  # id -> the body served
        self.background: set[str] = set()
        self.errors: list[str] = []  # a writer's unexpected answer (the test fails on any)


def _writer(base: str, acked: Acked, stop_at: float, seed: int, work: Callable[..., None]) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=base, timeout=60) as http:
        while time.monotonic() < stop_at:
            try:
                work(http, acked, rng)
            except httpx.TransportError:
                return  # the server is gone
            except AssertionError as e:
                acked.errors.append(str(e))
                return


def _upload(http: httpx.Client, acked: Acked, rng: random.Random) -> None:
    data = rng.randbytes(rng.randint(1, 300_000))
    r = http.post("/v1/files", files={"file": ("f.bin", data)}, data={"purpose": "user_data"})
    assert r.status_code == 200, r.text
    with acked.lock:
        acked.files[r.json()["id"]] = hashlib.sha256(data).hexdigest()
        live = sorted(set(acked.files) - acked.deleted)
        victim = rng.choice(live) if rng.random() < 0.2 else None
        if victim is not None:
            acked.deleted.add(victim)  # claimed: no other writer deletes it too
    if victim is not None:
        try:
            gone = http.delete(f"/v1/files/{victim}")
        except httpx.TransportError:
            with acked.lock:  # not acknowledged: it may or may not be gone
                acked.deleted.discard(victim)
                acked.files.pop(victim)
            raise
        assert gone.status_code == 200, gone.text


def _respond(http: httpx.Client, acked: Acked, rng: random.Random) -> None:
    body = {"input": f"Say the number {rng.randint(0, 999)}.", "max_output_tokens": 6, "temperature": 0}
    r = http.post("/v1/responses", json=body)
    assert r.status_code == 200, r.text
    with acked.lock:
        acked.responses[r.json()["id"]] = r.content


def _background(http: httpx.Client, acked: Acked, rng: random.Random) -> None:
    body = {"input": "Count to a hundred.", "background": True, "max_output_tokens": rng.randint(4, 60)}
    r = http.post("/v1/responses", json=body)
    assert r.status_code == 200, r.text
    with acked.lock:
        acked.background.add(r.json()["id"])
    time.sleep(0.3)


def _integrity(db_path: Path) -> str:
    conn = sqlite3.connect(db_path)
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


def test_kill_9_mid_writes_loses_nothing_acknowledged(tmp_path: Path) -> None:
    """Writers upload and delete files, store responses and start background ones; the
    server is killed while they run. After a restart every acknowledged object is
    there byte for byte, every acknowledged delete stays done, no background response
    is left running, the database checks clean, and the blobs the kill orphaned go."""
    data_dir, log, port = tmp_path / "data", tmp_path / "server.log", free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start(data_dir, port, log)
    acked = Acked()
    try:
        stop_at = time.monotonic() + 3600
        works = [_upload, _upload, _upload, _respond, _background]
        threads = [
            threading.Thread(target=_writer, args=(base, acked, stop_at, i, w), daemon=True)
            for i, w in enumerate(works)
        ]
        for t in threads:
            t.start()
        time.sleep(LOAD_S)
        kill_hard(proc)  # with requests in flight
        for t in threads:
            t.join(timeout=60)
        assert not acked.errors, acked.errors
        assert len(acked.files) >= 5 and acked.responses and acked.background, vars(acked)

        assert _integrity(data_dir / "mistralrs-serve.sqlite3") == "ok"
        old = time.time() - 2 * 3600  # past the orphan grace, so the restart sweeps what the kill left
        for blob in (data_dir / "blobs").iterdir():
            os.utime(blob, (old, old))
        proc = start(data_dir, port, log)
        with httpx.Client(base_url=base, timeout=60) as http:
            _check_after_restart(http, acked)
        rows = sqlite3.connect(data_dir / "mistralrs-serve.sqlite3").execute("SELECT blob FROM files")
        assert {p.name for p in (data_dir / "blobs").iterdir()} == {r[0] for r in rows}
    finally:
        stop(proc)


def _check_after_restart(http: httpx.Client, acked: Acked) -> None:
    for file_id, sha in acked.files.items():
        content = http.get(f"/v1/files/{file_id}/content")
        if file_id in acked.deleted:
            assert content.status_code == 404, file_id
        else:
            assert content.status_code == 200, content.text
            assert hashlib.sha256(content.content).hexdigest() == sha, file_id
    for response_id, body in acked.responses.items():
        assert http.get(f"/v1/responses/{response_id}").content == body  # byte for byte
    for response_id in acked.background:
        obj = http.get(f"/v1/responses/{response_id}").json()
        check("Response", obj)
        assert obj["status"] in ("completed", "failed", "incomplete"), obj
        if obj["status"] == "failed":
            assert "restarted" in obj["error"]["message"]
    listed, after = [], None
    while True:
        page = http.get("/v1/files", params={"limit": 100, **({"after": after} if after else {})}).json()
        listed += [f["id"] for f in page["data"]]
        if not page["has_more"]:
            break
        after = page["data"][-1]["id"]
    assert set(acked.files) - acked.deleted <= set(listed)
    fresh = http.post("/v1/files", files={"file": ("a.txt", b"after")}, data={"purpose": "user_data"})
    assert fresh.status_code == 200, fresh.text


@pytest.mark.parametrize("forward", ["fused", "torch"])
def test_model_file_truncated_then_removed_while_serving(tmp_path: Path, forward: str) -> None:
    """The weights the server runs on are its own once it is healthy: truncating the
    GGUF file (as copying another model over it does) and then deleting it change no
    answer, on the fused CPU forward and on the torch path. Started again over the
    damaged file, the server stays up and says why the model is not served."""
    model = tmp_path / "model.gguf"
    shutil.copy(default_model_path(), model)
    data_dir, log, port = tmp_path / "data", tmp_path / "server.log", free_port()
    flags = ["-m", str(model), *(["--no-native-forward"] if forward == "torch" else [])]
    proc = start(data_dir, port, log, *flags)
    body = {"model": "default", "messages": [{"role": "user", "content": "Name a color."}], "max_tokens": 8}
    body["temperature"] = 0
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
            with model.open("r+b") as f:
                f.truncate(4096)
            first = http.post("/v1/chat/completions", json=body)
            assert first.status_code == 200, first.text
            answer = first.json()["choices"][0]["message"]["content"]
            assert answer
            model.unlink()
            again = http.post("/v1/chat/completions", json=body)
            assert again.status_code == 200 and again.json()["choices"][0]["message"]["content"] == answer
            streamed = http.post("/v1/chat/completions", json={**body, "stream": True})
            assert streamed.status_code == 200 and b"[DONE]" in streamed.content
        stop(proc)

        shutil.copy(default_model_path(), model)
        with model.open("r+b") as f:
            f.truncate(model.stat().st_size // 2)  # the header is whole; tensors run past the end
        proc = start(data_dir, port, log, *flags, failed=True)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            chat = http.post("/v1/chat/completions", json=body)
            assert chat.status_code == 503, chat.text
            error = chat.json()["error"]
            assert error["type"] == "server_error" and "truncated" in error["message"], error
            assert str(model) in error["message"]
    finally:
        stop(proc)
