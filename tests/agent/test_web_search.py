"""Web search (agent/web_search.py, search_options.py, page_fetch.py) against the
fake web of fake_web.py on loopback: the SearXNG and DuckDuckGo backends,
ranking and domain filters, open_page's readable text and its limits, and
every rule the spec sets on web search tool entries, each a 400 naming the field."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
from mistralrs_serve.agent import web_search
from mistralrs_serve.agent.page_fetch import FetchLimits
from mistralrs_serve.agent.tool import ToolContext, ToolOutput
from mistralrs_serve.agent.web_search import (
    DuckDuckGoBackend,
    SearchError,
    SearchOptions,
    SearchResult,
    SearxngBackend,
    UnservableToolError,
    WebSearch,
    rank,
)
from mistralrs_serve.config import AgentConfig
from mistralrs_serve.entrypoints.openai import file_fetch
from mistralrs_serve.errors import InvalidRequestError

from tests.agent.fake_web import FakePage, FakeWeb, fake_web, redirect

KETTLE_HTML = """<!doctype html><html><head><title>Kettle Corp</title></head><body>
<nav><a href="/">Home</a> | <a href="/shop">Shop our catalogue</a> | <a href="/login">Login</a></nav>
<article><h1>How an electric kettle works</h1>
<p>An electric kettle heats water with a coiled element under its base; a thermostat made of a
bimetallic strip bends as the steam reaches it and switches the current off.</p>
<p>Most kettles hold between one and two litres and boil a full load in about four minutes,
drawing up to three kilowatts from the mains.</p></article>
<footer>Copyright 2026 Kettle Corp. All rights reserved. Cookie settings. Privacy policy.</footer>
</body></html>"""


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def ctx(tmp_path: Path | None = None) -> ToolContext:
    session = SimpleNamespace(id="sess_test", workdir=tmp_path or Path("."))
    return ToolContext(session=session, cancelled=asyncio.Event())


def call(tool: Any, **arguments: Any) -> ToolOutput:
    async def go() -> ToolOutput:
        return await tool.run(arguments, ctx())

    return run(go())


def tools(web: FakeWeb | None = None, options: SearchOptions | None = None, **cfg: Any) -> dict[str, Any]:
    cfg.setdefault("allow_private_urls", True)  # the fake web is on loopback
    config = AgentConfig(enable_search=True, search_url=web.base_url if web else None, **cfg)
    limits = FetchLimits(max_bytes=64 << 10, read_timeout_s=1.0, total_timeout_s=3.0)
    searcher = WebSearch(config, fetch_limits=limits, search_timeout_s=3.0)
    return {t.spec.name: t for t in searcher.tools(options or SearchOptions())}


def results(*hosts: str) -> list[dict[str, Any]]:
    return [{"title": f"About {h}", "url": f"https://{h}/page", "content": f"text from {h}"} for h in hosts]


# --- the SearXNG backend ---


def test_searxng_backend_maps_results() -> None:
    with fake_web(results=results("a.example", "b.example")) as web:
        for base in (web.base_url, web.base_url + "/", web.base_url + "/search"):
            found = run(SearxngBackend(base).search("kettle  física", 5))
            assert found == [
                SearchResult("About a.example", "https://a.example/page", "text from a.example"),
                SearchResult("About b.example", "https://b.example/page", "text from b.example"),
            ]
        assert web.queries == ["kettle  física"] * 3
        assert all(path.startswith("/search?") and "format=json" in path for path in web.requests)
        assert len(run(SearxngBackend(web.base_url).search("x", 1))) == 1


def test_searxng_backend_skips_malformed_rows() -> None:
    rows = [{"title": None, "url": "https://ok.example/", "content": 7}, "junk", {"title": "no url"}]
    with fake_web(results=rows) as web:
        found = run(SearxngBackend(web.base_url).search("q", 5))
    assert found[0] == SearchResult("", "https://ok.example/", "")
    assert found[1].url == ""  # dropped later by rank()
    assert len(found) == 2


@pytest.mark.parametrize(
    ("status", "message"), [(500, "HTTP 500"), (403, "search.formats"), (502, "HTTP 502")]
)
def test_searxng_backend_failures(status: int, message: str) -> None:
    with fake_web() as web:
        web.search_status = status
        with pytest.raises(SearchError, match=message):
            run(SearxngBackend(web.base_url).search("q", 5))


def test_searxng_backend_not_json_and_unreachable() -> None:
    with fake_web({"/notjson/search": FakePage("<html>hi</html>")}) as web:
        with pytest.raises(SearchError, match="without a results list"):
            run(SearxngBackend(web.url("/notjson")).search("q", 5))
        dead = web.base_url
    with pytest.raises(SearchError, match="failed: ConnectError"):
        run(SearxngBackend(dead).search("q", 5))


def test_searxng_backend_timeout() -> None:
    with fake_web() as web:
        web.search_delay_s = 2.0
        with pytest.raises(SearchError, match="timed out"):
            run(SearxngBackend(web.base_url, timeout_s=0.3).search("q", 5))


# --- the DuckDuckGo backend, with ddgs replaced (nothing leaves the machine) ---


class FakeDDGS:
    rows: ClassVar[list[dict[str, Any]]] = []
    error: ClassVar[Exception | None] = None
    calls: ClassVar[list[tuple[str, dict[str, Any]]]] = []

    def __init__(self, timeout: int | None = 5) -> None:
        self.timeout = timeout

    def text(self, query: str, **kwargs: Any) -> list[dict[str, Any]]:
        FakeDDGS.calls.append((query, kwargs))
        if FakeDDGS.error is not None:
            raise FakeDDGS.error
        return FakeDDGS.rows


def test_duckduckgo_backend_maps_results(monkeypatch: pytest.MonkeyPatch) -> None:
    from ddgs.exceptions import DDGSException

    monkeypatch.setattr(web_search, "DDGS", FakeDDGS)
    FakeDDGS.rows = [{"title": "Kettle\n facts", "href": "https://k.example/", "body": "boils  water"}]
    FakeDDGS.calls = []
    assert run(DuckDuckGoBackend().search("kettle", 3)) == [
        SearchResult("Kettle facts", "https://k.example/", "boils water")
    ]
    assert FakeDDGS.calls == [("kettle", {"max_results": 3, "backend": "duckduckgo", "region": "us-en"})]
    FakeDDGS.error = DDGSException("No results found.")
    assert run(DuckDuckGoBackend().search("kettle", 3)) == []
    FakeDDGS.error = DDGSException("https://html.duckduckgo.com/html 202 Ratelimit")
    with pytest.raises(SearchError, match=r"DuckDuckGo search failed: .*Ratelimit"):
        run(DuckDuckGoBackend().search("kettle", 3))
    FakeDDGS.error = None


def test_duckduckgo_is_the_default_backend() -> None:
    assert isinstance(WebSearch(AgentConfig(enable_search=True)).backend, DuckDuckGoBackend)
    backend = WebSearch(AgentConfig(enable_search=True, search_url="http://127.0.0.1:9/")).backend
    assert isinstance(backend, SearxngBackend) and backend.endpoint == "http://127.0.0.1:9/search"


# --- ranking, caps, domain filters ---


def test_rank_dedups_filters_and_caps() -> None:
    found = [
        SearchResult("one", "https://a.example/x", ""),
        SearchResult("dup", "http://A.example/x/#top", ""),
        SearchResult("ftp", "ftp://b.example/x", ""),
        SearchResult("empty", "", ""),
        SearchResult("two", "https://b.example/x?page=2", ""),
        SearchResult("three", "https://c.example/", ""),
        SearchResult("four", "https://d.example/", ""),
    ]
    assert [r.title for r in rank(found, SearchOptions(), 10)] == ["one", "two", "three", "four"]
    assert [r.title for r in rank(found, SearchOptions(), 2)] == ["one", "two"]


def test_domain_filters_include_subdomains() -> None:
    options = SearchOptions.from_tool(
        {
            "type": "web_search",
            "filters": {
                "allowed_domains": ["Python.org", "https://docs.rs/"],
                "blocked_domains": ["*.wiki.python.org"],
            },
        },
        "tools[0]",
    )
    assert options.allowed_domains == ("python.org", "docs.rs")
    assert options.blocked_domains == ("wiki.python.org",)
    assert options.allows("https://python.org/")
    assert options.allows("https://docs.python.org/3/library/")
    assert options.allows("http://DOCS.RS:8080/serde")
    assert not options.allows("https://wiki.python.org/moin")
    assert not options.allows("https://en.wiki.python.org/")
    assert not options.allows("https://notpython.org/")
    assert not options.allows("https://python.org.evil.example/")
    assert not options.allows("ftp://python.org/")
    blocked_only = SearchOptions(blocked_domains=("example.com",))
    assert blocked_only.allows("https://other.org/") and not blocked_only.allows("https://a.b.example.com/")


def test_search_tool_output_citations_and_details() -> None:
    with fake_web(results=results("a.example", "b.example", "a.example", "c.example")) as web:
        found = call(tools(web, search_max_results=2)["web_search"], query="  electric   kettles ")
    assert not found.is_error
    assert web.queries == ["electric kettles"]
    assert "[1] About a.example\nURL: https://a.example/page\ntext from a.example" in found.text
    assert "[2] About b.example" in found.text and "c.example" not in found.text
    assert [(c.url, c.title) for c in found.citations] == [
        ("https://a.example/page", "About a.example"),
        ("https://b.example/page", "About b.example"),
    ]
    assert found.details == {
        "action": {
            "type": "search",
            "query": "electric kettles",
            "queries": ["electric kettles"],
            "sources": [
                {"type": "url", "url": "https://a.example/page"},
                {"type": "url", "url": "https://b.example/page"},
            ],
        }
    }


@pytest.mark.parametrize(
    ("size", "count", "snippet_chars"), [("low", 2, 200), ("medium", 4, 400), ("high", 8, 800)]
)
def test_context_size_sets_counts_and_snippets(size: str, count: int, snippet_chars: int) -> None:
    long = [{"title": f"r{i}", "url": f"https://r{i}.example/", "content": "w" * 2000} for i in range(30)]
    options = SearchOptions.from_tool({"type": "web_search_preview", "search_context_size": size}, "tools[0]")
    with fake_web(results=long) as web:
        found = call(tools(web, options, search_max_results=4)["web_search"], query="q")
    assert len(found.citations) == count
    assert "w" * snippet_chars + "…" in found.text and "w" * (snippet_chars + 1) not in found.text


def test_search_applies_domain_filters() -> None:
    options = SearchOptions(allowed_domains=("python.org",), blocked_domains=("wiki.python.org",))
    rows = results("python.org", "evil.example", "wiki.python.org", "docs.python.org", "mail.python.org")
    with fake_web(results=rows) as web:
        found = call(tools(web, options, search_max_results=2)["web_search"], query="asyncio")
    assert web.queries == ["asyncio site:python.org"]
    assert [c.url for c in found.citations] == ["https://python.org/page", "https://docs.python.org/page"]
    assert (
        "Only these domains are allowed: python.org; these domains are blocked: wiki.python.org."
        in tools(None, options)["web_search"].spec.description
    )


def test_no_results_is_an_answer_not_an_error() -> None:
    with fake_web(results=results("evil.example")) as web:
        found = call(tools(web, SearchOptions(allowed_domains=("good.example",)))["web_search"], query="q")
    assert not found.is_error and found.text.startswith('No results for "q"') and not found.citations


def test_bad_arguments_are_tool_errors() -> None:
    named = tools()
    for bad in ({}, {"query": ""}, {"query": 3}):
        out = call(named["web_search"], **bad)
        assert out.is_error and isinstance(out.details["action"]["query"], str)
    for bad in ({}, {"url": None}, {"url": "file:///etc/passwd"}, {"url": "javascript:alert(1)"}):
        out = call(named["open_page"], **bad)
        assert out.is_error and out.details["action"]["type"] == "open_page"
        assert out.details["action"]["url"] in (None, bad.get("url"))


# --- backend failures become tool errors ---


class BrokenBackend:
    name = "Broken"

    def __init__(self, error: Exception | None = None, delay_s: float = 0.0) -> None:
        self.error, self.delay_s = error, delay_s

    async def search(self, query: str, max_results: int) -> list[SearchResult]:
        await asyncio.sleep(self.delay_s)
        if self.error:
            raise self.error
        return []


@pytest.mark.parametrize(
    ("backend", "message"),
    [
        (BrokenBackend(SearchError("the engine said no")), "the engine said no"),
        (BrokenBackend(KeyError("results")), "the search failed: KeyError"),
        (BrokenBackend(delay_s=5.0), "the Broken search timed out after 0.2 s"),
    ],
)
def test_backend_failure_is_error_output(backend: BrokenBackend, message: str) -> None:
    searcher = WebSearch(AgentConfig(enable_search=True), backend, search_timeout_s=0.2)
    found = call(searcher.tools(SearchOptions())[0], query="q")
    assert found.is_error and message in found.text
    assert found.details["action"] == {"type": "search", "query": "q", "queries": ["q"], "sources": []}


def test_searxng_down_is_error_output() -> None:
    with fake_web() as web:
        web.search_status = 500
        found = call(tools(web)["web_search"], query="q")
    assert found.is_error and "HTTP 500" in found.text


def test_cancel_stops_a_search() -> None:
    searcher = WebSearch(AgentConfig(enable_search=True), BrokenBackend(delay_s=30.0))

    async def go() -> ToolOutput:
        context = ctx()
        asyncio.get_running_loop().call_later(0.1, context.cancelled.set)
        return await searcher.tools(SearchOptions())[0].run({"query": "q"}, context)

    start = time.monotonic()
    found = run(go())
    assert found.is_error and "cancelled" in found.text and time.monotonic() - start < 5


# --- open_page ---


def test_open_page_reads_the_article() -> None:
    with fake_web({"/kettle": KETTLE_HTML}) as web:
        page = call(tools(web)["open_page"], url=web.url("/kettle"))
    assert not page.is_error
    assert "bimetallic strip" in page.text and "three kilowatts" in page.text
    for boilerplate in ("Shop our catalogue", "Login", "All rights reserved", "Cookie settings"):
        assert boilerplate not in page.text
    assert page.text.startswith("How an electric kettle works\nURL: " + web.url("/kettle"))
    assert [(c.url, c.title) for c in page.citations] == [
        (web.url("/kettle"), "How an electric kettle works")
    ]
    assert page.details == {"action": {"type": "open_page", "url": web.url("/kettle")}}


def test_open_page_text_types() -> None:
    pages = {
        "/notes.txt": FakePage("plain notes\nline two", "text/plain; charset=utf-8"),
        "/data.json": FakePage(json.dumps({"kettle": "on"}), "application/json"),
        "/latin1": FakePage("caf\xe9".encode("latin-1"), "text/plain; charset=iso-8859-1"),
        "/untyped": FakePage(b"just words", ""),
        "/image.png": FakePage(b"\x89PNG\r\n\x1a\n" + bytes(100), "image/png"),
        "/blob": FakePage(bytes(range(256)), ""),
        "/missing": FakePage("gone", "text/plain", status=404),
    }
    with fake_web(pages) as web:
        open_page = tools(web)["open_page"]
        assert "plain notes\nline two" in call(open_page, url=web.url("/notes.txt")).text
        assert '{"kettle": "on"}' in call(open_page, url=web.url("/data.json")).text
        assert "café" in call(open_page, url=web.url("/latin1")).text
        assert "just words" in call(open_page, url=web.url("/untyped")).text
        image = call(open_page, url=web.url("/image.png"))
        assert image.is_error and "image/png" in image.text and "reads HTML, text and PDF" in image.text
        assert call(open_page, url=web.url("/blob")).is_error
        missing = call(open_page, url=web.url("/missing"))
        assert missing.is_error and "HTTP 404" in missing.text


def test_open_page_size_cap() -> None:
    chunk = "<p>" + "kettle facts " * 500 + "</p>"
    with fake_web({"/endless": FakePage(chunk, "text/html", endless=True)}) as web:
        start = time.monotonic()
        page = call(tools(web)["open_page"], url=web.url("/endless"))
    assert not page.is_error and time.monotonic() - start < 3
    assert "kettle facts" in page.text and "[the page goes on" in page.text
    assert len(page.text) < 13_000  # the medium budget, and far from the endless body


def test_open_page_timeout() -> None:
    with fake_web({"/slow": FakePage(KETTLE_HTML, delay_s=3.0)}) as web:
        start = time.monotonic()
        page = call(tools(web)["open_page"], url=web.url("/slow"))
    assert page.is_error and "timed out" in page.text and time.monotonic() - start < 2.5


def test_open_page_refuses_private_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    with fake_web({"/kettle": KETTLE_HTML, "/away": redirect("/kettle")}) as web:
        private = call(tools(web, allow_private_urls=False)["open_page"], url=web.url("/kettle"))
        assert private.is_error and "--allow-private-urls" in private.text
        assert web.requests == []
        # 127.0.0.1 stands for a public address here; the redirect's target does not
        monkeypatch.setattr(file_fetch, "is_refused_address", lambda a: str(a) != "127.0.0.1")
        web.pages["/to-private"] = redirect(f"http://127.0.0.2:{web.base_url.rsplit(':', 1)[1]}/kettle")
        hop = call(tools(web, allow_private_urls=False)["open_page"], url=web.url("/to-private"))
        assert hop.is_error and "127.0.0.2" in hop.text and "refuses those" in hop.text
        ok = call(tools(web, allow_private_urls=False)["open_page"], url=web.url("/away"))
        assert not ok.is_error and "bimetallic" in ok.text
        assert web.requests == ["/to-private", "/away", "/kettle"]


def test_open_page_applies_domain_filters_on_every_hop() -> None:
    with fake_web({"/kettle": KETTLE_HTML}) as web:
        port = web.base_url.rsplit(":", 1)[1]
        web.pages["/to-localhost"] = redirect(f"http://localhost:{port}/kettle")
        only_ip = tools(web, SearchOptions(allowed_domains=("127.0.0.1",)))["open_page"]
        assert not call(only_ip, url=web.url("/kettle")).is_error
        hop = call(only_ip, url=web.url("/to-localhost"))
        assert hop.is_error and "outside the domains" in hop.text
        blocked = tools(web, SearchOptions(blocked_domains=("localhost",)))["open_page"]
        assert call(blocked, url=f"http://localhost:{port}/kettle").is_error
        assert web.requests == ["/kettle", "/to-localhost"]


def test_open_page_redirect_limit() -> None:
    pages: dict[str, FakePage | str] = {f"/hop{i}": redirect(f"/hop{i + 1}") for i in range(7)}
    with fake_web(pages) as web:
        page = call(tools(web)["open_page"], url=web.url("/hop0"))
    assert page.is_error and "more than 5 redirects" in page.text


# --- the spec's rules on tool entries, each a 400 naming the field ---


def refused(tool: dict[str, Any], param: str, kind: type[InvalidRequestError] = InvalidRequestError) -> str:
    with pytest.raises(InvalidRequestError) as e:
        SearchOptions.from_tool(tool, "tools[2]")
    assert type(e.value) is kind
    assert e.value.param == param
    return str(e.value)


def test_web_search_rejections() -> None:
    ws = {"type": "web_search"}
    refused({**ws, "search_content_types": ["text", "image"]}, "tools[2].search_content_types")
    refused({**ws, "search_content_types": ["video"]}, "tools[2].search_content_types")
    refused({**ws, "image_settings": {"size": "small"}}, "tools[2].image_settings")
    refused({**ws, "external_web_access": "no"}, "tools[2].external_web_access")
    refused({**ws, "search_context_size": "huge"}, "tools[2].search_context_size")
    refused({**ws, "filters": ["python.org"]}, "tools[2].filters")
    refused({**ws, "filters": {"allowed_domains": "python.org"}}, "tools[2].filters.allowed_domains")
    message = refused(
        {**ws, "filters": {"blocked_domains": [f"d{i}.example" for i in range(101)]}},
        "tools[2].filters.blocked_domains",
    )
    assert "at most 100" in message
    for bad in (
        "",
        "exa mple.com",
        "https://example.com/docs",
        "example.com:8080",
        "ftp://example.com",
        7,
        "-bad.example",
        "a" * 64 + ".example",
        "user@example.com",
        "ex_ample.com",
    ):
        refused(
            {**ws, "filters": {"allowed_domains": ["ok.example", bad]}}, "tools[2].filters.allowed_domains[1]"
        )
    refused({**ws, "user_location": {"type": "exact"}}, "tools[2].user_location.type")
    refused({**ws, "user_location": {"type": "approximate", "city": 3}}, "tools[2].user_location.city")


def test_external_web_access_false_is_unservable() -> None:
    message = refused(
        {"type": "web_search", "external_web_access": False},
        "tools[2].external_web_access",
        UnservableToolError,
    )
    assert "live web" in message
    # invalid input stays a plain 400 even when the tool is also unservable
    refused(
        {"type": "web_search", "external_web_access": False, "image_settings": {}},
        "tools[2].image_settings",
    )


def test_web_search_accepts_the_full_shape() -> None:
    options = SearchOptions.from_tool(
        {
            "type": "web_search_2025_08_26",
            "external_web_access": True,
            "search_content_types": ["text"],
            "filters": {
                "allowed_domains": [f"d{i}.example" for i in range(99)] + ["D0.example."],
                "blocked_domains": None,
            },
            "search_context_size": "high",
            "user_location": {"type": "approximate", "country": "FR", "city": "Lyon", "region": None},
            "return_token_budget": 1000,
        },
        "tools[0]",
    )
    assert len(options.allowed_domains) == 99 and options.search_context_size == "high"
    assert options.user_location == {"country": "FR", "city": "Lyon"}
    assert SearchOptions.from_tool(
        {"type": "web_search", "filters": {"allowed_domains": ["bücher.de"]}}, "t"
    ).allowed_domains == ("xn--bcher-kva.de",)
    assert SearchOptions.from_tool({"type": "web_search", "filters": None}, "t") == SearchOptions()


def test_web_search_preview_rules() -> None:
    preview = {"type": "web_search_preview"}
    refused({**preview, "filters": {"allowed_domains": ["python.org"]}}, "tools[2].filters")
    refused({**preview, "return_token_budget": 500}, "tools[2].return_token_budget")
    refused({**preview, "search_content_types": ["image"]}, "tools[2].search_content_types")
    refused({**preview, "search_context_size": "max"}, "tools[2].search_context_size")
    for external in (False, True, "anything"):  # ignored on the preview tool
        assert SearchOptions.from_tool({**preview, "external_web_access": external}, "t") == SearchOptions()
    options = SearchOptions.from_tool(
        {
            "type": "web_search_preview_2025_03_11",
            "search_context_size": "low",
            "filters": None,
            "user_location": {"type": "approximate", "timezone": "Europe/Paris"},
        },
        "t",
    )
    assert options.search_context_size == "low" and options.user_location == {"timezone": "Europe/Paris"}
    refused({"type": "function"}, "tools[2].type")


def test_web_search_options_rules() -> None:
    def refused_chat(opts: Any, param: str) -> None:
        with pytest.raises(InvalidRequestError) as e:
            SearchOptions.from_web_search_options(opts)
        assert e.value.param == param

    assert SearchOptions.from_web_search_options({}) == SearchOptions()
    chat = SearchOptions.from_web_search_options(
        {
            "search_context_size": "low",
            "user_location": {"type": "approximate", "approximate": {"country": "US", "city": "Boston"}},
            "filters": {"blocked_domains": ["example.com"]},
        }
    )
    assert chat == SearchOptions(
        blocked_domains=("example.com",),
        search_context_size="low",
        user_location={"country": "US", "city": "Boston"},
    )
    refused_chat([], "web_search_options")
    refused_chat({"search_context_size": 3}, "web_search_options.search_context_size")
    refused_chat({"user_location": {"approximate": {}}}, "web_search_options.user_location.type")
    refused_chat({"user_location": {"type": "approximate"}}, "web_search_options.user_location.approximate")
    refused_chat(
        {"user_location": {"type": "approximate", "approximate": {"country": ["US"]}}},
        "web_search_options.user_location.approximate.country",
    )
    refused_chat({"filters": {"allowed_domains": ["a b"]}}, "web_search_options.filters.allowed_domains[0]")
