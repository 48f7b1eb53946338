"""What a public-facing server owes its clients, on real servers over the session's
engine: security headers on every response (errors and preflights included),
`Cache-Control: no-store` on the API, CORS for the allowed origins only, the API
key compared in constant time, JSON bodies nested too deep refused, a request
body that trickles in cut off with a 408, and oversize chunked uploads (no
declared length) refused as they stream."""

from __future__ import annotations

import hmac
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from live_server import LiveServer, start_server, stop_server
from mistralrs_serve.config import ServerConfig
from mistralrs_serve.entrypoints.openai.http_security import MAX_JSON_DEPTH, SECURITY_HEADERS

ALLOWED = "http://chat.example"


@pytest.fixture(scope="module")
def guarded(default_runner: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    config = ServerConfig(
        api_key="sekrit",
        cors_allowed_origins=[ALLOWED],
        body_timeout_s=1.0,
        max_file_bytes=1 << 20,
        data_dir=str(tmp_path_factory.mktemp("data")),
    )
    live = start_server(config, lambda: default_runner.client)
    yield live
    stop_server(live)


AUTH = {"authorization": "Bearer sekrit"}


def assert_secured(res: httpx.Response) -> None:
    for name, value in SECURITY_HEADERS:
        assert res.headers.get(name.decode()) == value.decode(), (res.request.url, name)


def test_every_response_has_the_headers(guarded: LiveServer) -> None:
    with guarded.http() as http:
        responses = [
            http.get("/health"),
            http.get("/v1/models", headers=AUTH),
            http.get("/v1/models"),  # 401
            http.get("/v1/nothing-here", headers=AUTH),  # 404
            http.post("/v1/chat/completions", headers=AUTH, content=b"{"),  # 400
            http.post(
                "/v1/chat/completions",
                headers=AUTH,
                json={"model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
            ),
            http.options(
                "/v1/chat/completions",
                headers={"origin": ALLOWED, "access-control-request-method": "POST"},
            ),
        ]
    assert [r.status_code for r in responses] == [200, 200, 401, 404, 400, 200, 200]
    for res in responses:
        assert_secured(res)
    assert all(r.headers["cache-control"] == "no-store" for r in responses[1:6])
    for res in responses[2:5]:
        assert set(res.json()["error"]) == {"message", "type", "param", "code"}


def test_cors_only_for_allowed_origins(guarded: LiveServer) -> None:
    with guarded.http() as http:
        ok = http.get("/v1/models", headers={**AUTH, "origin": ALLOWED})
        other = http.get("/v1/models", headers={**AUTH, "origin": "http://evil.example"})
        preflight = http.options(
            "/v1/models", headers={"origin": "http://evil.example", "access-control-request-method": "GET"}
        )
    assert ok.headers["access-control-allow-origin"] == ALLOWED
    assert "access-control-allow-origin" not in other.headers
    assert preflight.status_code == 400 and "access-control-allow-origin" not in preflight.headers


def test_the_api_key_is_compared_in_constant_time(
    guarded: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def recording(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording)
    with guarded.http() as http:
        assert http.get("/v1/models", headers={"authorization": "Bearer sekriT"}).status_code == 401
        assert http.get("/v1/models", headers=AUTH).status_code == 200
    assert calls == [(b"Bearer sekriT", b"Bearer sekrit"), (b"Bearer sekrit", b"Bearer sekrit")]


def test_deep_json_is_refused(guarded: LiveServer) -> None:
    def nested(depth: int) -> Any:
        value: Any = 1
        for _ in range(depth):
            value = [value]
        return value

    body = {"model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    with guarded.http() as http:
        deep = http.post(
            "/v1/chat/completions", headers=AUTH, json={**body, "metadata": nested(MAX_JSON_DEPTH)}
        )
        fine = http.post("/v1/chat/completions", headers=AUTH, json={**body, "metadata": nested(8)})
        responses = http.post("/v1/responses", headers=AUTH, json={"model": "default", "input": nested(200)})
    assert deep.status_code == 400 and "nests deeper" in deep.json()["error"]["message"]
    assert fine.status_code != 500
    assert responses.status_code == 400 and "nests deeper" in responses.json()["error"]["message"]


def test_a_trickling_body_gets_a_408(guarded: LiveServer) -> None:
    host, port = guarded.base_url.removeprefix("http://").split(":")
    body = json.dumps({"model": "default", "messages": [{"role": "user", "content": "hi"}]}).encode()
    start = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nhost: {host}\r\nauthorization: Bearer sekrit\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
        )
        sock.sendall(head.encode())
        answer = b""
        for byte in body:  # a byte every 0.2 s: the whole body would take over 10 s
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            sock.settimeout(0.2)
            try:
                answer += sock.recv(65536)
            except TimeoutError:
                continue
            if b"\r\n\r\n" in answer:
                break
    elapsed = time.monotonic() - start
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"request_timeout"' in rest or elapsed < 5
    assert elapsed < 5


def test_a_chunked_upload_over_the_limit_is_refused_as_it_streams(guarded: LiveServer) -> None:
    boundary = "b0undary"

    def parts() -> Iterator[bytes]:
        yield f'--{boundary}\r\ncontent-disposition: form-data; name="purpose"\r\n\r\nuser_data\r\n'.encode()
        yield (
            f'--{boundary}\r\ncontent-disposition: form-data; name="file"; filename="big.txt"\r\n'
            "content-type: text/plain\r\n\r\n"
        ).encode()
        for _ in range(64):  # 4 MiB, no content-length: chunked
            yield b"x" * (64 << 10)
        yield f"\r\n--{boundary}--\r\n".encode()

    with guarded.http() as http:
        res = http.post(
            "/v1/files",
            headers={**AUTH, "content-type": f"multipart/form-data; boundary={boundary}"},
            content=parts(),
        )
    assert res.status_code == 413 and res.json()["error"]["param"] == "file"
    assert_secured(res)
