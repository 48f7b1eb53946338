"""Fetching a web page for the agent's `open_page` tool, as text a model can read.

The guards of a request's `file_url` (entrypoints/openai/file_fetch.py) apply:
http(s) only, every address of every hop checked (private ones refused unless
the server allows them) and the connection pinned to the checked address,
redirects followed by hand. On top: an optional URL predicate checked on each
hop (the request's domain filters), a byte cap (the body is streamed and
reading stops there), connect/read timeouts and an overall deadline. HTML
becomes its readable text through trafilatura (navigation and boilerplate
dropped, title kept); other text types are read as they are, PDFs through
pypdf; anything else is refused with a message saying so."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urljoin

import httpx
import trafilatura

from mistralrs_serve.entrypoints.openai.attachments import pdf_text
from mistralrs_serve.entrypoints.openai.file_fetch import pinned_request
from mistralrs_serve.errors import InvalidRequestError

MAX_REDIRECTS = 5
USER_AGENT = "Mozilla/5.0 (compatible; mistralrs-serve page fetch)"
_HTML_TYPES = ("text/html", "application/xhtml+xml")
_TEXT_TYPES = ("application/json", "application/xml", "application/javascript", "application/x-yaml")
_PRIVATE_HINT = "start the server with --allow-private-urls to allow them"


class PageFetchError(Exception):
    """Why a page could not be read; the message is written for the model to see."""


@dataclass(frozen=True)
class FetchLimits:
    max_bytes: int = 2 << 20  # of the body; reading stops there and the page is marked truncated
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 10.0
    total_timeout_s: float = 30.0  # a server that drips bytes never trips the read timeout


@dataclass(frozen=True)
class Page:
    url: str  # after redirects
    title: str
    text: str
    content_type: str
    is_truncated: bool = False  # the body was over FetchLimits.max_bytes


@dataclass(frozen=True)
class _Body:
    content: bytes
    content_type: str  # lower case, without parameters
    charset: str | None
    url: str
    is_truncated: bool


async def fetch_page(
    url: str,
    *,
    allow_private: bool,
    limits: FetchLimits | None = None,
    url_allowed: Callable[[str], bool] | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> Page:
    """GET `url` within the limits and return its readable text; PageFetchError when it
    cannot or may not be read. `url_allowed` vets the URL of every hop."""
    limits = limits or FetchLimits()
    try:
        body = await asyncio.wait_for(
            _fetch_body(url, allow_private, limits, url_allowed, transport), limits.total_timeout_s
        )
    except (asyncio.TimeoutError, httpx.TimeoutException):
        raise PageFetchError(f"fetching {url} timed out") from None
    except httpx.HTTPError as e:
        raise PageFetchError(f"fetching {url} failed: {type(e).__name__}: {e}") from None
    # parsing a large page takes a while; keep it off the event loop
    return await asyncio.to_thread(readable_page, body)


async def _fetch_body(
    url: str,
    allow_private: bool,
    limits: FetchLimits,
    url_allowed: Callable[[str], bool] | None,
    transport: httpx.AsyncBaseTransport | None,
) -> _Body:
    timeout = httpx.Timeout(limits.read_timeout_s, connect=limits.connect_timeout_s)
    # trust_env off: a proxy from the environment would connect somewhere other than the checked address
    async with httpx.AsyncClient(
        timeout=timeout, follow_redirects=False, trust_env=False, transport=transport
    ) as client:
        for _ in range(MAX_REDIRECTS + 1):
            if url_allowed is not None and not url_allowed(url):
                raise PageFetchError(f"{url} is outside the domains this request allows")
            request = await _pinned(client, url, allow_private)
            response = await client.send(request, stream=True)
            try:
                if response.is_redirect and "location" in response.headers:
                    url = urljoin(url, response.headers["location"])
                    continue
                if response.status_code >= 400:
                    raise PageFetchError(f"fetching {url} failed: HTTP {response.status_code}")
                return await _read_body(response, url, limits.max_bytes)
            finally:
                await response.aclose()
    raise PageFetchError(f"fetching {url} took more than {MAX_REDIRECTS} redirects")


async def _pinned(client: httpx.AsyncClient, url: str, allow_private: bool) -> httpx.Request:
    try:
        # resolves the host name: blocking, so on a worker thread
        request = await asyncio.to_thread(
            pinned_request, client, url, allow_private, "url", what="url", private_hint=_PRIVATE_HINT
        )
    except InvalidRequestError as e:
        raise PageFetchError(str(e)) from None
    request.headers["User-Agent"] = USER_AGENT
    request.headers["Accept"] = "text/html,application/xhtml+xml,text/plain;q=0.9,*/*;q=0.5"
    return request


async def _read_body(response: httpx.Response, url: str, max_bytes: int) -> _Body:
    content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type and not _is_readable_type(content_type):
        raise PageFetchError(
            f"{url} is {content_type}, not a web page or text; open_page reads HTML, text and PDF"
        )
    chunks, size, is_truncated = [], 0, False
    async for chunk in response.aiter_bytes():
        chunks.append(chunk[: max_bytes - size])
        size += len(chunks[-1])
        if size >= max_bytes:
            is_truncated = True
            break
    charset = response.charset_encoding
    return _Body(b"".join(chunks), content_type, charset, str(url), is_truncated)


def _is_readable_type(content_type: str) -> bool:
    return (
        content_type.startswith("text/")
        or content_type in _HTML_TYPES
        or content_type in _TEXT_TYPES
        or content_type == "application/pdf"
        or content_type.endswith(("+json", "+xml"))
    )


def readable_page(body: _Body) -> Page:
    """The text of a fetched body: trafilatura for HTML, pypdf for PDF, the text itself otherwise."""
    kind = body.content_type or _sniff(body.content)
    if kind == "application/pdf":
        text, _ = pdf_text(body.content, 1 << 20)
        if text is None:
            raise PageFetchError(f"{body.url}: the PDF could not be read (damaged, encrypted or cut short)")
        return Page(body.url, "", text, kind, body.is_truncated)
    if kind in _HTML_TYPES:
        title, text = _html_text(body)
        return Page(body.url, title, text, kind, body.is_truncated)
    if kind == "application/octet-stream":
        raise PageFetchError(f"{body.url} is binary data, not a web page or text")
    return Page(body.url, "", _decode(body), kind, body.is_truncated)


def _html_text(body: _Body) -> tuple[str, str]:
    html: str | bytes = _decode(body) if body.charset else body.content
    doc = trafilatura.bare_extraction(
        html, url=body.url, with_metadata=True, include_comments=False, include_tables=True
    )
    title = getattr(doc, "title", None) or ""
    text = getattr(doc, "text", None) or ""
    if not text.strip():
        # no main content found (a short or unusual page): all of its visible text
        text = trafilatura.html2txt(html) or ""
    return title.strip(), text.strip()


def _decode(body: _Body) -> str:
    try:
        return body.content.decode(body.charset or "utf-8", errors="replace")
    except LookupError:  # a charset Python does not know
        return body.content.decode("utf-8", errors="replace")


def _sniff(content: bytes) -> str:
    """A content type for a response that gave none."""
    head = content[:1024].lstrip().lower()
    if head.startswith(b"%pdf-"):
        return "application/pdf"
    if head.startswith((b"<!doctype html", b"<html")) or b"<body" in head:
        return "text/html"
    if b"\x00" in content[:8192]:
        return "application/octet-stream"
    return "text/plain"
