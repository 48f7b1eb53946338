"""file_url fetching against a loopback HTTP server: what is refused before any
connection, redirects (each re-checked), the size cap, timeouts and failures."""

from __future__ import annotations

import http.server
import ipaddress
import threading
import time
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
from mistralrs_serve.entrypoints.openai import file_fetch
from mistralrs_serve.entrypoints.openai.file_fetch import fetch_file, is_refused_address
from mistralrs_serve.errors import InvalidRequestError, PayloadTooLargeError

BODY = b"line one\nline two\n"


class Handler(http.server.BaseHTTPRequestHandler):
    hits: ClassVar[list[tuple[str, str]]] = []

    def do_GET(self) -> None:
        Handler.hits.append((self.path, self.headers.get("Host", "")))
        path = self.path
        if path.startswith("/hop/"):  # /hop/N redirects N more times, then to /notes.txt
            left = int(path.rsplit("/", 1)[1])
            self._redirect(f"/hop/{left - 1}" if left > 1 else "/notes.txt")
        elif path.startswith("/to?"):
            self._redirect(path.split("?", 1)[1])
        elif path == "/notes.txt":
            self._send(BODY, {"Content-Type": "text/plain; charset=utf-8", "Content-Length": str(len(BODY))})
        elif path == "/named":
            self._send(BODY, {"Content-Disposition": 'attachment; filename="report.md"'})
        elif path == "/big-declared":
            self._send(b"x" * 2000, {"Content-Length": "2000"})
        elif path == "/big-undeclared":  # HTTP/1.0, no length: the body ends with the connection
            self._send(b"x" * 2000, {})
        elif path == "/slow":
            time.sleep(1.0)
            self._send(BODY, {})
        else:
            self.send_error(404)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _send(self, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(200)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


class QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # the client hanging up on /slow is the point of that test


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    server = QuietServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def fetch(url: str, allow_private: bool = True, max_bytes: int = 1000) -> file_fetch.FetchedFile:
    return fetch_file(url, max_bytes=max_bytes, allow_private=allow_private, param="input[0].file_url")


def refused(url: str, match: str, **kwargs: Any) -> None:
    with pytest.raises(InvalidRequestError, match=match) as e:
        fetch(url, **kwargs)
    assert e.value.param == "input[0].file_url"


def test_fetch_with_host_header_and_name(port: int) -> None:
    Handler.hits.clear()
    got = fetch(f"http://localhost:{port}/notes.txt")
    assert (got.content, got.filename, got.content_type) == (BODY, "notes.txt", "text/plain; charset=utf-8")
    # the connection went to the checked address, under the name the caller gave
    assert Handler.hits == [("/notes.txt", f"localhost:{port}")]
    assert fetch(f"http://127.0.0.1:{port}/named").filename == "report.md"


@pytest.mark.parametrize(
    "url",
    ["ftp://example.com/a", "file:///etc/passwd", "gopher://example.com/", "javascript:alert(1)"],
)
def test_only_http_and_https(url: str) -> None:
    refused(url, "http or https")


def test_not_a_url_or_no_host() -> None:
    refused("http://", "no host|not a valid URL")
    refused("http://[::1", "not a valid URL")


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "localhost", "[::1]", "10.1.2.3", "192.168.0.1", "169.254.169.254", "224.0.0.1", "0.0.0.0"],
)
def test_private_addresses_refused_before_connecting(port: int, host: str) -> None:
    Handler.hits.clear()
    refused(f"http://{host}:{port}/notes.txt", "refuses those", allow_private=False)
    assert Handler.hits == []


def test_address_table() -> None:
    refuse = [
        "127.0.0.1",
        "::1",
        "10.0.0.1",
        "172.16.0.1",
        "100.64.0.1",
        "fe80::1",
        "ff02::1",
        "::ffff:10.0.0.1",
    ]
    allow = ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"]
    assert all(is_refused_address(ipaddress.ip_address(a)) for a in refuse)
    assert not any(is_refused_address(ipaddress.ip_address(a)) for a in allow)


def test_redirects_followed_up_to_five(port: int) -> None:
    assert fetch(f"http://127.0.0.1:{port}/hop/5").content == BODY  # 5 redirects
    refused(f"http://127.0.0.1:{port}/hop/6", "more than 5 redirects")


def test_each_redirect_is_checked_again(port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    refused(f"http://127.0.0.1:{port}/to?ftp://example.com/x", "http or https")
    # 127.0.0.1 stands for a public address here; the redirect's target does not
    monkeypatch.setattr(file_fetch, "is_refused_address", lambda a: str(a) != "127.0.0.1")
    Handler.hits.clear()
    refused(
        f"http://127.0.0.1:{port}/to?http://127.0.0.2:{port}/notes.txt", "refuses those", allow_private=False
    )
    assert [path for path, _ in Handler.hits] == [f"/to?http://127.0.0.2:{port}/notes.txt"]


@pytest.mark.parametrize("path", ["/big-declared", "/big-undeclared"])
def test_size_cap(port: int, path: str) -> None:
    with pytest.raises(PayloadTooLargeError) as e:
        fetch(f"http://127.0.0.1:{port}{path}", max_bytes=1000)
    assert e.value.param == "input[0].file_url"
    assert len(fetch(f"http://127.0.0.1:{port}{path}", max_bytes=2000).content) == 2000


def test_failures_are_400s(port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    refused(f"http://127.0.0.1:{port}/missing", "HTTP 404")
    refused("http://no-such-host.invalid/x", "cannot resolve")
    monkeypatch.setattr(file_fetch, "READ_TIMEOUT_S", 0.2)
    refused(f"http://127.0.0.1:{port}/slow", "timed out")
    closed = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    closed_port = closed.server_address[1]
    closed.server_close()
    refused(f"http://127.0.0.1:{closed_port}/x", "failed")
