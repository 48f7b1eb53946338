"""What a public-facing server owes every request and response, as one ASGI
middleware (`SecureHttp`) and one check:

- headers on every response: no MIME sniffing, no framing, no referrer, a
  content security policy that lets an API response load nothing, and
  `Cache-Control: no-store` on the API routes (answers and stored files are
  the user's);
- a deadline for a request's body: a client that sends it a byte a second
  gets a 408 in OpenAI's envelope after `body_timeout_s`, not a worker held
  for as long as it likes;
- `json_body`: a JSON body, malformed or nested deeper than MAX_JSON_DEPTH,
  is a 400 before any model or template walks it.

The API key check (constant time) and the request metrics are AuthAndMetrics
in api_server.py; CORS is Starlette's middleware, for the allowed origins only.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mistralrs_serve.errors import InvalidRequestError, RequestTimeoutError, RequestTooLargeError

MAX_JSON_DEPTH = 64
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'"),
    (b"cross-origin-opener-policy", b"same-origin"),
)
NO_STORE_PREFIXES = ("/v1/", "/tokenize", "/detokenize")


class SecureHttp:
    def __init__(self, app: ASGIApp, body_timeout_s: float) -> None:
        self.app, self.body_timeout_s = app, body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout_s
        body_done = False

        async def timed_receive() -> Message:
            nonlocal body_done
            if body_done:  # after the body: disconnect polling waits as long as it likes
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except (TimeoutError, asyncio.TimeoutError):
                raise RequestTimeoutError(
                    f"the request body did not arrive within {self.body_timeout_s:g} s"
                ) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        no_store = scope["path"].startswith(NO_STORE_PREFIXES)

        async def secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers += [(k, v) for k, v in SECURITY_HEADERS if k not in present]
                if no_store and b"cache-control" not in present:
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, timed_receive, secured)


def json_body(raw: bytes) -> Any:
    """A request body's JSON, or a 400 saying why not (malformed, or nested too deep)."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise InvalidRequestError(f"the request body is not valid JSON: {e}") from None
    check_depth(value)
    return value


def check_depth(value: Any, limit: int = MAX_JSON_DEPTH) -> None:
    """Raise a 400 when parsed JSON nests arrays and objects deeper than `limit`."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            raise InvalidRequestError(f"the request body nests deeper than {limit} levels")
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused (413) past `limit` bytes, declared or sent."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestTooLargeError(f"the request body is {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestTooLargeError(f"the request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
