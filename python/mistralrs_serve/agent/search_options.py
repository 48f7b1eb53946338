"""What a request asks of web search, read and checked from a Responses/Chat
`web_search` or `web_search_preview` tool entry or the Chat extension
`web_search_options`, following the spec's "Rejected non-default values".

Two kinds of refusal: `InvalidRequestError` for input that is wrong (a 400
naming the field), and its subclass `UnservableToolError` for a well-formed
tool this server cannot serve as asked (`external_web_access: false`): the
coordinator (hosted_tools.py) leaves such a tool out with a warning unless
`tool_choice` forces it, because Codex sends it on every turn."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal, cast
from urllib.parse import urlsplit

from mistralrs_serve.errors import InvalidRequestError

WEB_SEARCH_TYPES = frozenset({"web_search", "web_search_2025_08_26"})
WEB_SEARCH_PREVIEW_TYPES = frozenset({"web_search_preview", "web_search_preview_2025_03_11"})
MAX_DOMAINS = 100
MAX_RESULTS = 20  # of one search, whatever the options ask
ContextSize = Literal["low", "medium", "high"]
_CONTEXT_SIZES = ("low", "medium", "high")
_LOCATION_FIELDS = ("country", "region", "city", "timezone")
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


class UnservableToolError(InvalidRequestError):
    """A valid hosted tool this server cannot serve as asked; dropped with a warning unless forced."""


@dataclass(frozen=True)
class SearchOptions:
    """One request's web search settings. Domains are normalized (lower case, IDNA) and match
    their subdomains too; both lists empty means every domain."""

    allowed_domains: tuple[str, ...] = ()
    blocked_domains: tuple[str, ...] = ()
    search_context_size: ContextSize = "medium"
    max_results: int | None = None  # None: the server's search_max_results, scaled by context size
    # accepted and kept, not used: the backends search without a location
    user_location: dict[str, Any] | None = None

    @classmethod
    def from_tool(cls, tool: dict[str, Any], param: str) -> SearchOptions:
        """A `tools[i]` entry of type web_search(_2025_08_26) or web_search_preview(_…); `param`
        is where it sits (`tools[0]`), for the errors' field names."""
        kind = tool.get("type")
        if kind in WEB_SEARCH_TYPES:
            return _web_search_tool(tool, param)
        if kind in WEB_SEARCH_PREVIEW_TYPES:
            return _web_search_preview_tool(tool, param)
        raise InvalidRequestError(f"{param}.type {kind!r} is not a web search tool", f"{param}.type")

    @classmethod
    def from_web_search_options(
        cls, opts: dict[str, Any], param: str = "web_search_options"
    ) -> SearchOptions:
        """The Chat Completions extension `web_search_options` (OpenAI's shape, plus `filters`
        as for the Responses `web_search` tool)."""
        if not isinstance(opts, dict):
            raise InvalidRequestError(f"{param} must be an object", param)
        allowed, blocked = _filters(opts.get("filters"), f"{param}.filters")
        return cls(
            allowed_domains=allowed,
            blocked_domains=blocked,
            search_context_size=_context_size(opts.get("search_context_size"), param),
            user_location=_chat_user_location(opts.get("user_location"), f"{param}.user_location"),
        )

    def allows(self, url: str) -> bool:
        """Whether the domain filters let `url` through (an http(s) URL with a host)."""
        host = url_host(url)
        if host is None:
            return False
        if any(_within(host, d) for d in self.blocked_domains):
            return False
        return not self.allowed_domains or any(_within(host, d) for d in self.allowed_domains)

    @property
    def has_filters(self) -> bool:
        return bool(self.allowed_domains or self.blocked_domains)


def _web_search_tool(tool: dict[str, Any], param: str) -> SearchOptions:
    external = tool.get("external_web_access")
    if external is not None and not isinstance(external, bool):
        raise InvalidRequestError(
            f"{param}.external_web_access must be a boolean", f"{param}.external_web_access"
        )
    _no_image_search(tool, param)
    if external is False:
        raise UnservableToolError(
            f"{param}.external_web_access: false (cache-only search) is not supported: this server "
            "only searches the live web",
            f"{param}.external_web_access",
        )
    allowed, blocked = _filters(tool.get("filters"), f"{param}.filters")
    return SearchOptions(
        allowed_domains=allowed,
        blocked_domains=blocked,
        search_context_size=_context_size(tool.get("search_context_size"), param),
        user_location=_user_location(tool.get("user_location"), f"{param}.user_location"),
    )


def _web_search_preview_tool(tool: dict[str, Any], param: str) -> SearchOptions:
    # external_web_access is ignored here, as the spec says: the preview tool has no such field
    for key in ("filters", "return_token_budget"):
        if tool.get(key) is not None:
            raise InvalidRequestError(
                f"{param}.{key} is not supported on web_search_preview; use the web_search tool "
                "for domain filters",
                f"{param}.{key}",
            )
    _no_image_search(tool, param)
    return SearchOptions(
        search_context_size=_context_size(tool.get("search_context_size"), param),
        user_location=_user_location(tool.get("user_location"), f"{param}.user_location"),
    )


def _no_image_search(tool: dict[str, Any], param: str) -> None:
    types = tool.get("search_content_types")
    if types is not None:
        where = f"{param}.search_content_types"
        if not isinstance(types, list) or not all(t in ("text", "image") for t in types):
            raise InvalidRequestError(f"{where} must be a list of 'text' and 'image'", where)
        if "image" in types:
            raise InvalidRequestError(f"{where}: image search is not supported; use ['text']", where)
    if tool.get("image_settings") is not None:
        raise InvalidRequestError(
            f"{param}.image_settings: image search is not supported", f"{param}.image_settings"
        )


def _context_size(value: Any, param: str) -> ContextSize:
    if value is None:
        return "medium"
    if value not in _CONTEXT_SIZES:
        where = f"{param}.search_context_size"
        raise InvalidRequestError(f"{where} must be one of low, medium or high; got {value!r}", where)
    return cast(ContextSize, value)


def _filters(filters: Any, where: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if filters is None:
        return (), ()
    if not isinstance(filters, dict):
        raise InvalidRequestError(f"{where} must be an object", where)
    allowed = _domains(filters.get("allowed_domains"), f"{where}.allowed_domains")
    blocked = _domains(filters.get("blocked_domains"), f"{where}.blocked_domains")
    return allowed, blocked


def _domains(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise InvalidRequestError(f"{where} must be a list of domain names", where)
    if len(value) > MAX_DOMAINS:
        raise InvalidRequestError(
            f"{where} has {len(value)} domains; at most {MAX_DOMAINS} are allowed", where
        )
    domains = [normalize_domain(d, f"{where}[{i}]") for i, d in enumerate(value)]
    return tuple(dict.fromkeys(domains))


def normalize_domain(value: Any, where: str) -> str:
    """`Example.COM`, `https://example.com/`, `*.example.com` and `.example.com` all become
    `example.com`; anything that is not a host name is a 400 naming `where`."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequestError(f"{where} must be a domain name such as 'example.com'", where)
    domain = value.strip().lower()
    if "://" in domain:
        scheme, _, domain = domain.partition("://")
        if scheme not in ("http", "https"):
            raise InvalidRequestError(f"{where}: {value!r} is not a domain name", where)
        domain = domain.rstrip("/")
    if "/" in domain or "?" in domain or "#" in domain:
        raise InvalidRequestError(f"{where}: {value!r} has a path; give the domain alone", where)
    if ":" in domain or "@" in domain:
        raise InvalidRequestError(f"{where}: {value!r} is not a domain name (no port, no user)", where)
    domain = domain.removeprefix("*.").removeprefix(".").removesuffix(".")
    try:
        domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        raise InvalidRequestError(f"{where}: {value!r} is not a valid domain name", where) from None
    if len(domain) > 253 or not all(_LABEL.match(label) for label in domain.split(".")):
        raise InvalidRequestError(f"{where}: {value!r} is not a valid domain name", where)
    return domain


def url_host(url: str) -> str | None:
    """The normalized host of an http(s) URL, or None."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not host:
        return None
    try:
        return host.rstrip(".").encode("idna").decode("ascii")
    except UnicodeError:
        return host.rstrip(".")


def _within(host: str, domain: str) -> bool:
    return host == domain or host.endswith("." + domain)


def _user_location(value: Any, where: str) -> dict[str, Any] | None:
    """The Responses shape: `{"type": "approximate", "country": ..., "city": ...}`."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidRequestError(f"{where} must be an object", where)
    if value.get("type", "approximate") != "approximate":
        raise InvalidRequestError(f"{where}.type must be 'approximate'", f"{where}.type")
    _location_fields(value, where)
    return {k: value[k] for k in _LOCATION_FIELDS if value.get(k) is not None}


def _chat_user_location(value: Any, where: str) -> dict[str, Any] | None:
    """The Chat shape: `{"type": "approximate", "approximate": {"country": ..., ...}}`."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidRequestError(f"{where} must be an object", where)
    if value.get("type") != "approximate":
        raise InvalidRequestError(f"{where}.type must be 'approximate'", f"{where}.type")
    approximate = value.get("approximate")
    if not isinstance(approximate, dict):
        raise InvalidRequestError(f"{where}.approximate must be an object", f"{where}.approximate")
    _location_fields(approximate, f"{where}.approximate")
    return {k: approximate[k] for k in _LOCATION_FIELDS if approximate.get(k) is not None}


def _location_fields(value: dict[str, Any], where: str) -> None:
    for key in _LOCATION_FIELDS:
        if value.get(key) is not None and not isinstance(value[key], str):
            raise InvalidRequestError(f"{where}.{key} must be a string", f"{where}.{key}")
