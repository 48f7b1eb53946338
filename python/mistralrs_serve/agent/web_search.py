"""Server-side web search for the agent loop: the search backends and the two
tools the model is shown when search is on, `web_search` (query a backend,
results ranked, filtered by the request's domains, capped and numbered for
citing) and `open_page` (a page's readable text, through page_fetch.py).

Backends: DuckDuckGo through the `ddgs` library (the default), or a SearXNG
instance's JSON API when the server has `search_url`. A failing or slow
backend is a tool error the model reads, never an exception."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit, urlunsplit

import httpx
from ddgs import DDGS
from ddgs.exceptions import DDGSException

from mistralrs_serve.agent.page_fetch import FetchLimits, PageFetchError, fetch_page
from mistralrs_serve.agent.search_options import (
    MAX_RESULTS,
    SearchOptions,
    UnservableToolError,
    normalize_domain,
    url_host,
)
from mistralrs_serve.agent.tool import Citation, ServerTool, ToolContext, ToolOutput, ToolSpec
from mistralrs_serve.config import AgentConfig

__all__ = [
    "DuckDuckGoBackend",
    "SearchBackend",
    "SearchError",
    "SearchOptions",
    "SearchResult",
    "SearxngBackend",
    "UnservableToolError",
    "WebSearch",
    "normalize_domain",
]

logger = logging.getLogger(__name__)
T = TypeVar("T")
SEARCH_TIMEOUT_S = 20.0
MAX_QUERY_CHARS = 400
MAX_SITE_TERMS = 8  # allowed domains written into the backend query as site: terms


@dataclass(frozen=True)
class SearchResult:
    title: str
    url: str
    snippet: str


class SearchError(Exception):
    """A backend could not answer; the message is written for the model to see."""


class SearchBackend(Protocol):
    name: str

    async def search(self, query: str, max_results: int) -> list[SearchResult]:
        """Up to `max_results` results, best first; SearchError when the backend fails."""
        ...


class DuckDuckGoBackend:
    """DuckDuckGo's HTML results through `ddgs` (blocking: it runs on a worker thread)."""

    name = "DuckDuckGo"

    def __init__(self, timeout_s: int = 10, engine: str = "duckduckgo", region: str = "us-en") -> None:
        self.timeout_s = timeout_s
        self.engine = engine
        self.region = region

    async def search(self, query: str, max_results: int) -> list[SearchResult]:
        return await asyncio.to_thread(self._search, query, max_results)

    def _search(self, query: str, max_results: int) -> list[SearchResult]:
        try:
            rows = DDGS(timeout=self.timeout_s).text(
                query, max_results=max_results, backend=self.engine, region=self.region
            )
        except DDGSException as e:
            if "no results" in str(e).lower():  # ddgs raises rather than return nothing
                return []
            raise SearchError(f"DuckDuckGo search failed: {e}") from None
        return [_result(row.get("title"), row.get("href"), row.get("body")) for row in rows]


class SearxngBackend:
    """A SearXNG instance: GET <base>/search?q=...&format=json (json must be among its
    `search.formats`). The operator chose the address, so private ones are fine here."""

    name = "SearXNG"

    def __init__(
        self, base_url: str, timeout_s: float = 10.0, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        base = base_url.rstrip("/")
        self.endpoint = base if base.endswith("/search") else base + "/search"
        self.timeout_s = timeout_s
        self.transport = transport

    async def search(self, query: str, max_results: int) -> list[SearchResult]:
        params = {"q": query, "format": "json", "pageno": "1"}
        try:
            async with httpx.AsyncClient(
                timeout=self.timeout_s, trust_env=False, transport=self.transport
            ) as client:
                response = await client.get(self.endpoint, params=params)
        except httpx.TimeoutException:
            raise SearchError(f"the SearXNG search at {self.endpoint} timed out") from None
        except httpx.HTTPError as e:
            raise SearchError(f"the SearXNG search at {self.endpoint} failed: {type(e).__name__}") from None
        if response.status_code == 403:
            raise SearchError("SearXNG refused format=json (add json to search.formats in its settings.yml)")
        if response.status_code >= 400:
            raise SearchError(f"the SearXNG search failed: HTTP {response.status_code}")
        try:
            rows = response.json().get("results")
        except (ValueError, AttributeError):
            rows = None
        if not isinstance(rows, list):
            raise SearchError("the SearXNG search answered without a results list")
        results = [
            _result(r.get("title"), r.get("url"), r.get("content")) for r in rows if isinstance(r, dict)
        ]
        return results[:max_results]


def _result(title: Any, url: Any, snippet: Any) -> SearchResult:
    return SearchResult(_text(title), _text(url).strip(), _text(snippet))


def _text(value: Any) -> str:
    return " ".join(value.split()) if isinstance(value, str) else ""


@dataclass(frozen=True)
class _Budget:
    """How much of the model's context one call may take, by search_context_size."""

    results_factor: float
    snippet_chars: int
    page_chars: int


_BUDGETS = {
    "low": _Budget(0.5, 200, 4_000),
    "medium": _Budget(1.0, 400, 12_000),
    "high": _Budget(2.0, 800, 32_000),
}


class WebSearch:
    """The web search tools of one server: `tools(options)` gives the ones a request sees."""

    def __init__(
        self,
        cfg: AgentConfig,
        backend: SearchBackend | None = None,
        *,
        fetch_limits: FetchLimits | None = None,
        search_timeout_s: float = SEARCH_TIMEOUT_S,
    ) -> None:
        self.cfg = cfg
        self.backend = backend or (SearxngBackend(cfg.search_url) if cfg.search_url else DuckDuckGoBackend())
        self.fetch_limits = fetch_limits or FetchLimits()
        self.search_timeout_s = search_timeout_s

    def tools(self, options: SearchOptions) -> list[ServerTool]:
        return [SearchTool(self, options), OpenPageTool(self, options)]

    def num_results(self, options: SearchOptions) -> int:
        if options.max_results is not None:
            return max(1, min(options.max_results, MAX_RESULTS))
        factor = _BUDGETS[options.search_context_size].results_factor
        return max(1, min(round(self.cfg.search_max_results * factor), MAX_RESULTS))


class SearchTool:
    def __init__(self, web: WebSearch, options: SearchOptions) -> None:
        self.web = web
        self.options = options
        where = _filters_note(options)
        self.spec = ToolSpec(
            name="web_search",
            description=(
                "Search the web. Returns numbered results (title, URL, snippet) to cite by URL; "
                f"read a result in full with open_page.{where}"
            ),
            parameters={
                "type": "object",
                "properties": {"query": {"type": "string", "description": "what to search for"}},
                "required": ["query"],
                "additionalProperties": False,
            },
            kind="web_search",
        )

    async def run(self, arguments: dict[str, Any], ctx: ToolContext) -> ToolOutput:
        query = arguments.get("query")
        shown = query if isinstance(query, str) else ""  # the action's query must be a string
        details: dict[str, Any] = {"action": {"type": "search", "query": shown, "sources": []}}
        if not isinstance(query, str) or not query.strip():
            return ToolOutput("web_search needs a non-empty `query` string", is_error=True, details=details)
        query = " ".join(query.split())[:MAX_QUERY_CHARS]
        details["action"].update(query=query, queries=[query])
        wanted = self.web.num_results(self.options)
        # filtering and duplicates thin the list, so ask for more than is shown
        ask = min(wanted * (4 if self.options.has_filters else 2), 50)
        try:
            found = await _until_cancelled(
                asyncio.wait_for(
                    self.web.backend.search(_backend_query(query, self.options), ask),
                    self.web.search_timeout_s,
                ),
                ctx,
            )
        except asyncio.TimeoutError:
            message = f"the {self.web.backend.name} search timed out after {self.web.search_timeout_s:g} s"
            return ToolOutput(message, is_error=True, details=details)
        except (SearchError, _Cancelled) as e:
            return ToolOutput(str(e), is_error=True, details=details)
        except Exception as e:  # a backend bug must not end the request
            logger.exception("the %s search backend failed", self.web.backend.name)
            return ToolOutput(f"the search failed: {type(e).__name__}: {e}", is_error=True, details=details)
        results = rank(found, self.options, wanted)
        details["action"]["sources"] = [{"type": "url", "url": r.url} for r in results]
        text = format_results(query, results, _BUDGETS[self.options.search_context_size].snippet_chars)
        citations = [Citation(r.url, r.title) for r in results]
        return ToolOutput(text, citations=citations, details=details)


class OpenPageTool:
    def __init__(self, web: WebSearch, options: SearchOptions) -> None:
        self.web = web
        self.options = options
        self.spec = ToolSpec(
            name="open_page",
            description=(
                "Open a web page (an http or https URL, usually one from web_search) and read its main "
                f"text.{_filters_note(options)}"
            ),
            parameters={
                "type": "object",
                "properties": {"url": {"type": "string", "description": "the page's URL"}},
                "required": ["url"],
                "additionalProperties": False,
            },
            kind="web_search",
        )

    async def run(self, arguments: dict[str, Any], ctx: ToolContext) -> ToolOutput:
        url = arguments.get("url")
        shown = url if isinstance(url, str) else None  # the action's url is a string or null
        details: dict[str, Any] = {"action": {"type": "open_page", "url": shown}}
        if not isinstance(url, str) or not url.strip():
            return ToolOutput("open_page needs a `url` string", is_error=True, details=details)
        url = url.strip()
        details["action"]["url"] = url
        if url_host(url) is None:
            return ToolOutput(f"{url!r} is not an http or https URL", is_error=True, details=details)
        try:
            page = await _until_cancelled(
                fetch_page(
                    url,
                    allow_private=self.web.cfg.allow_private_urls,
                    limits=self.web.fetch_limits,
                    url_allowed=self.options.allows if self.options.has_filters else None,
                ),
                ctx,
            )
        except (PageFetchError, _Cancelled) as e:
            return ToolOutput(str(e), is_error=True, details=details)
        max_chars = _BUDGETS[self.options.search_context_size].page_chars
        text = page.text[:max_chars]
        if len(page.text) > max_chars or page.is_truncated:
            text += f"\n\n[the page goes on; only its first {len(text)} characters are shown]"
        header = f"{page.title}\nURL: {page.url}" if page.title else f"URL: {page.url}"
        body = text if text.strip() else "(the page has no readable text)"
        return ToolOutput(f"{header}\n\n{body}", citations=[Citation(page.url, page.title)], details=details)


def rank(found: list[SearchResult], options: SearchOptions, max_results: int) -> list[SearchResult]:
    """Backend order, without duplicate URLs, non-http(s) URLs and what the domain filters
    exclude, at most `max_results`."""
    seen: set[str] = set()
    ranked = []
    for result in found:
        key = _url_key(result.url)
        if key is None or key in seen or not options.allows(result.url):
            continue
        seen.add(key)
        ranked.append(result)
        if len(ranked) == max_results:
            break
    return ranked


def _url_key(url: str) -> str | None:
    """A URL as compared for duplicates: scheme and host in lower case, no fragment or trailing slash."""
    host = url_host(url)
    if host is None:
        return None
    parts = urlsplit(url)
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    return urlunsplit(
        ("https" if parts.scheme == "http" else parts.scheme, netloc, parts.path.rstrip("/"), parts.query, "")
    )


def format_results(query: str, results: list[SearchResult], snippet_chars: int) -> str:
    if not results:
        return f'No results for "{query}". Try other words or a broader query.'
    lines = [f'Results for "{query}":', ""]
    for i, r in enumerate(results, start=1):
        snippet = r.snippet if len(r.snippet) <= snippet_chars else r.snippet[:snippet_chars].rstrip() + "…"
        lines += [f"[{i}] {r.title or r.url}", f"URL: {r.url}", snippet, ""]
    lines.append("Cite the sources you use by their URL; open_page reads a result in full.")
    return "\n".join(lines)


def _backend_query(query: str, options: SearchOptions) -> str:
    """The query with site: terms for a few allowed domains, so the backend looks there first
    (the results are filtered again whatever it answers)."""
    domains = options.allowed_domains
    if not domains or len(domains) > MAX_SITE_TERMS:
        return query
    return f"{query} " + " OR ".join(f"site:{d}" for d in domains)


def _filters_note(options: SearchOptions) -> str:
    notes = []
    if options.allowed_domains:
        notes.append("only these domains are allowed: " + ", ".join(options.allowed_domains[:20]))
    if options.blocked_domains:
        notes.append("these domains are blocked: " + ", ".join(options.blocked_domains[:20]))
    text = "; ".join(notes)
    return f" {text[:1].upper()}{text[1:]}." if notes else ""


class _Cancelled(Exception):
    def __init__(self) -> None:
        super().__init__("cancelled: the request was stopped")


async def _until_cancelled(work: Awaitable[T], ctx: ToolContext) -> T:
    """`work`'s result, or _Cancelled as soon as the request is (the work is cancelled too)."""
    task = asyncio.ensure_future(work)
    waiter = asyncio.ensure_future(ctx.cancelled.wait())
    try:
        done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        if not task.done():
            task.cancel()
    if task not in done:
        raise _Cancelled()
    return task.result()
