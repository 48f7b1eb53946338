"""Function tools run through a dispatch URL (agent/dispatch.py), against a loopback
HTTP server written here: every reply shape, every failure, the output cap and
cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
from mistralrs_serve.agent.dispatch import DispatchTool, cap_text, dispatch_tools
from mistralrs_serve.agent.tool import ToolContext, ToolOutput, ToolSpec

# path -> (status, content type, body); "/slow" and "/huge" are handled apart
REPLIES: dict[str, tuple[int, str, bytes]] = {
    "/string": (200, "application/json", json.dumps("sunny, 21 C").encode()),
    "/content": (200, "application/json", json.dumps({"content": "from content"}).encode()),
    "/list": (
        200,
        "application/json; charset=utf-8",
        json.dumps(
            {"content": [{"type": "text", "text": "one"}, "two", {"type": "image", "data": "x"}]}
        ).encode(),
    ),
    "/is_error": (
        200,
        "application/json",
        json.dumps({"content": "no such city", "is_error": True}).encode(),
    ),
    "/text": (200, "text/plain; charset=utf-8", "plain réponse".encode()),
    "/bad_json": (200, "application/json", b"{not json"),
    "/wrong_shape": (200, "application/json", json.dumps({"result": 1}).encode()),
    "/content_number": (200, "application/json", json.dumps({"content": 5}).encode()),
    "/octet": (200, "application/octet-stream", b"\x00\x01"),
    "/500": (500, "text/plain", b"database is down"),
    "/404": (404, "application/json", b""),
}


class _Handler(BaseHTTPRequestHandler):
    received: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", "0"))
        _Handler.received.append({"path": self.path, "body": json.loads(self.rfile.read(length))})
        if self.path == "/slow":
            time.sleep(4)
            self._reply(200, "application/json", json.dumps("late").encode())
        elif self.path == "/huge_text":
            self._reply(200, "text/plain", b"x" * (3 << 20))
        elif self.path == "/huge_json":
            self._reply(200, "application/json", json.dumps({"content": "y" * (3 << 20)}).encode())
        else:
            self._reply(*REPLIES[self.path])

    def _reply(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # a client that gave up
            self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


SPEC = ToolSpec(
    "get_weather", "Weather for a city.", {"type": "object", "properties": {"city": {"type": "string"}}}
)


def _ctx() -> ToolContext:
    return ToolContext(session=SimpleNamespace(id="s", workdir=Path(".")), cancelled=asyncio.Event())


def _call(url: str, **kwargs: Any) -> ToolOutput:
    tool = DispatchTool(url, SPEC, **kwargs)
    return asyncio.run(tool.run({"city": "Paris"}, _ctx()))


@pytest.mark.parametrize(
    ("path", "text"),
    [
        ("/string", "sunny, 21 C"),
        ("/content", "from content"),
        ("/list", "one\ntwo\n[image content]"),
        ("/text", "plain réponse"),
    ],
)
def test_reply_shapes(base_url: str, path: str, text: str) -> None:
    out = _call(base_url + path)
    assert (out.text, out.is_error) == (text, False)


def test_posts_name_and_arguments(base_url: str) -> None:
    _call(base_url + "/string")
    assert _Handler.received[-1] == {
        "path": "/string",
        "body": {"name": "get_weather", "arguments": {"city": "Paris"}},
    }


def test_is_error_in_reply(base_url: str) -> None:
    out = _call(base_url + "/is_error")
    assert out.is_error and out.text == "no such city"


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/500", "HTTP 500 Internal Server Error: database is down"),
        ("/404", "HTTP 404 Not Found"),
        ("/bad_json", "not valid JSON"),
        ("/wrong_shape", 'expected a JSON string, a JSON object with "content"'),
        ("/content_number", '"content" is a JSON int'),
        ("/octet", "content type 'application/octet-stream'"),
    ],
)
def test_failures_are_error_outputs(base_url: str, path: str, message: str) -> None:
    out = _call(base_url + path)
    assert out.is_error
    assert out.text.startswith("Error running tool get_weather: ")
    assert message in out.text


def test_timeout(base_url: str) -> None:
    started = time.monotonic()
    out = _call(base_url + "/slow", timeout_s=0.3)
    assert out.is_error and "did not answer within 0.3 s" in out.text
    assert time.monotonic() - started < 3


def test_unreachable_url() -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = _call(f"http://127.0.0.1:{port}/x")
    assert out.is_error and "could not reach the dispatch URL" in out.text


def test_huge_text_reply_is_capped(base_url: str) -> None:
    out = _call(base_url + "/huge_text", max_output_bytes=1000)
    assert not out.is_error
    assert out.text.startswith("x" * 1000)
    assert "[output truncated:" in out.text and len(out.text) < 1100


def test_huge_json_reply_past_body_cap_is_refused(base_url: str) -> None:
    out = _call(base_url + "/huge_json", max_output_bytes=1000)
    assert out.is_error and "JSON body over" in out.text


def test_json_reply_within_body_cap_is_capped(base_url: str) -> None:
    out = _call(base_url + "/huge_json", max_output_bytes=1 << 20)  # body cap 16 MiB
    assert not out.is_error and len(out.text) < (1 << 20) + 100 and "[output truncated:" in out.text


def test_cancel_aborts_the_post(base_url: str) -> None:
    async def scenario() -> tuple[ToolOutput, float]:
        ctx = _ctx()
        tool = DispatchTool(base_url + "/slow", SPEC, timeout_s=10)
        asyncio.get_running_loop().call_later(0.2, ctx.cancelled.set)
        started = time.monotonic()
        out = await tool.run({"city": "Paris"}, ctx)
        return out, time.monotonic() - started

    out, elapsed_s = asyncio.run(scenario())
    assert out.is_error and "cancelled" in out.text
    assert elapsed_s < 3


def test_cap_text_keeps_characters_whole() -> None:
    assert cap_text("abc", 3) == "abc"
    capped = cap_text("é" * 10, 5)  # 2 bytes each: 2 whole characters fit
    assert capped.startswith("éé\n[output truncated: 20 bytes")


def test_dispatch_tools_from_request_tools() -> None:
    tools = dispatch_tools(
        "http://127.0.0.1:1/run",
        [
            {
                "type": "function",
                "function": {"name": "a", "description": "A.", "parameters": {"type": "object"}},
            },
            {"type": "function", "name": "b"},  # Responses form, no parameters
            {"type": "web_search"},
            {"type": "function", "function": {"description": "no name"}},
        ],
        timeout_s=5,
        max_output_bytes=100,
    )
    assert [t.spec for t in tools] == [
        ToolSpec("a", "A.", {"type": "object"}, "function"),
        ToolSpec("b", "", {"type": "object", "properties": {}}, "function"),
    ]
    assert all(
        t.url == "http://127.0.0.1:1/run" and t.timeout_s == 5 and t.max_output_bytes == 100 for t in tools
    )
