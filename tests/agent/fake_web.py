"""A fake web on loopback for the web search tests: a SearXNG-style JSON
search endpoint and a set of pages, served by one threaded HTTP server on
127.0.0.1. Nothing leaves the machine.

    with fake_web({"/kettle": KETTLE_HTML}) as web:
        web.results = [{"title": "Kettles", "url": web.url("/kettle"), "content": "..."}]
        cfg = AgentConfig(enable_search=True, search_url=web.base_url, allow_private_urls=True)

`GET /search?q=...&format=json` answers `{"query": q, "results": web.results}`
(`web.results` may also be a function of the query), records the query in
`web.queries`, and answers 403 for another format, as SearXNG does when json
is not enabled. Every other path is looked up in `web.pages` (a `FakePage`,
or a str served as HTML); `web.requests` records every path asked for.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

SearchResults = list[dict[str, Any]] | Callable[[str], list[dict[str, Any]]]


@dataclass
class FakePage:
    body: bytes | str = b""
    content_type: str = "text/html; charset=utf-8"
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0  # sleep before answering (timeouts)
    endless: bool = False  # send `body` again and again until the client hangs up (size caps)


def redirect(location: str, status: int = 302) -> FakePage:
    return FakePage(status=status, headers={"Location": location}, content_type="text/plain")


@dataclass
class FakeWeb:
    base_url: str  # also the SearXNG base URL: <base_url>/search
    pages: dict[str, FakePage | str] = field(default_factory=dict)
    results: SearchResults = field(default_factory=list)
    search_status: int = 200  # a failing search engine: 500, 502, ...
    search_delay_s: float = 0.0
    queries: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    def url(self, path: str) -> str:
        return self.base_url + path


class _Handler(BaseHTTPRequestHandler):
    web: FakeWeb  # set on the subclass made for each server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.web.requests.append(self.path)
        parts = urlsplit(self.path)
        if parts.path == "/search":
            self._search(parse_qs(parts.query))
            return
        page = self.web.pages.get(self.path, self.web.pages.get(parts.path))
        if page is None:
            self._send(FakePage(b"not found", "text/plain", status=404))
        else:
            self._send(FakePage(page) if isinstance(page, str) else page)

    def _search(self, params: dict[str, list[str]]) -> None:
        query = params.get("q", [""])[0]
        self.web.queries.append(query)
        time.sleep(self.web.search_delay_s)
        if params.get("format", [""])[0] != "json":
            self._send(FakePage(b"format not allowed", "text/plain", status=403))
            return
        if self.web.search_status != 200:
            self._send(FakePage(b"engine error", "text/plain", status=self.web.search_status))
            return
        results = self.web.results(query) if callable(self.web.results) else self.web.results
        body = json.dumps({"query": query, "number_of_results": len(results), "results": results})
        self._send(FakePage(body, "application/json"))

    def _send(self, page: FakePage) -> None:
        time.sleep(page.delay_s)
        body = page.body.encode() if isinstance(page.body, str) else page.body
        self.send_response(page.status)
        if page.content_type:
            self.send_header("Content-Type", page.content_type)
        for name, value in page.headers.items():
            self.send_header(name, value)
        if not page.endless:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
            while page.endless:
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client stopped reading, as it should past its cap


@contextlib.contextmanager
def fake_web(
    pages: dict[str, FakePage | str] | None = None, results: SearchResults | None = None
) -> Iterator[FakeWeb]:
    """A started fake web on 127.0.0.1 (a free port); stopped when the block ends."""
    handler = type("Handler", (_Handler,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True  # a page still sleeping must not hold up the shutdown
    web = FakeWeb(f"http://127.0.0.1:{server.server_address[1]}", dict(pages or {}), results or [])
    handler.web = web
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield web
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
