"""Function tools executed server-side by an HTTP endpoint (`--tool-dispatch-url`).

Each call is one POST of `{"name": ..., "arguments": {...}}`. The reply is a JSON
string, a JSON object with `"content"` (a string, or a list of text parts that are
joined), or a plain-text body; `"is_error": true` (or MCP's `"isError"`) in the
object marks a failed call. HTTP errors, timeouts, unreachable URLs and replies of
another shape become an error output the model can read, never an exception."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

import httpx

from mistralrs_serve.agent.tool import ToolContext, ToolOutput, ToolSpec

logger = logging.getLogger(__name__)

DEFAULT_MAX_OUTPUT_BYTES = 64 << 10
# A JSON reply must be read whole to be parsed, so the body may be larger than what
# the model is shown; past this many times the output cap it is refused.
_BODY_CAP_FACTOR = 16
_MIN_BODY_BYTES = 1 << 20
_ERROR_SNIPPET_CHARS = 500
_EXPECTED_SHAPE = 'expected a JSON string, a JSON object with "content", or a text/plain body'


def cap_text(text: str, max_bytes: int) -> str:
    """`text` cut to at most `max_bytes` of UTF-8 (on a character boundary), with a note when cut."""
    data = text.encode("utf-8", errors="replace")
    if len(data) <= max_bytes:
        return text
    kept = data[:max_bytes].decode("utf-8", errors="ignore")
    return f"{kept}\n[output truncated: {len(data)} bytes, the first {max_bytes} shown]"


class _BadReply(Exception):
    """The endpoint answered, but not with something a tool result can be made of."""


@dataclass
class DispatchTool:
    """A request's function tool whose calls the server POSTs to `url` (a `ServerTool`)."""

    url: str
    spec: ToolSpec
    timeout_s: float = 30.0
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES

    async def run(self, arguments: dict[str, Any], ctx: ToolContext) -> ToolOutput:
        post = asyncio.ensure_future(self._post(arguments))
        cancelled = asyncio.ensure_future(ctx.cancelled.wait())
        try:
            done, _ = await asyncio.wait({post, cancelled}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            cancelled.cancel()
            if not post.done():
                post.cancel()
                # the POST's connection is closed before run returns (its task is gone)
                await asyncio.gather(post, return_exceptions=True)
        if post not in done:
            return self._error("the call was cancelled before the dispatch URL answered")
        return post.result()

    async def _post(self, arguments: dict[str, Any]) -> ToolOutput:
        body = {"name": self.spec.name, "arguments": arguments}
        # trust_env=False: the dispatch URL is the operator's own service, not reached through proxies
        async with httpx.AsyncClient(timeout=self.timeout_s, trust_env=False) as client:
            try:
                return await asyncio.wait_for(self._exchange(client, body), self.timeout_s)
            except (asyncio.TimeoutError, httpx.TimeoutException):
                return self._error(f"the dispatch URL did not answer within {self.timeout_s:g} s")
            except httpx.HTTPError as exc:
                reason = str(exc) or type(exc).__name__
                return self._error(f"could not reach the dispatch URL {self.url}: {reason}")
            except _BadReply as exc:
                return self._error(f"the dispatch URL sent a reply this server cannot use: {exc}")

    async def _exchange(self, client: httpx.AsyncClient, body: dict[str, Any]) -> ToolOutput:
        async with client.stream("POST", self.url, json=body) as response:
            data, is_whole = await self._read_capped(response)
            if response.status_code >= 400:
                snippet = data[: _ERROR_SNIPPET_CHARS * 4].decode("utf-8", errors="replace")
                reason = response.reason_phrase or "error"
                message = f"the dispatch URL answered HTTP {response.status_code} {reason}"
                return self._error(f"{message}: {snippet[:_ERROR_SNIPPET_CHARS]}" if snippet else message)
            media_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
        text, is_error = _parse_reply(data, is_whole, media_type)
        return ToolOutput(text=cap_text(text, self.max_output_bytes), is_error=is_error)

    async def _read_capped(self, response: httpx.Response) -> tuple[bytes, bool]:
        """The body, stopping once past the body cap; and whether it was read whole."""
        max_body_bytes = max(_MIN_BODY_BYTES, _BODY_CAP_FACTOR * self.max_output_bytes)
        chunks: list[bytes] = []
        num_bytes = 0
        async for chunk in response.aiter_bytes():
            chunks.append(chunk)
            num_bytes += len(chunk)
            if num_bytes > max_body_bytes:
                return b"".join(chunks)[:max_body_bytes], False
        return b"".join(chunks), True

    def _error(self, message: str) -> ToolOutput:
        logger.info("dispatch of tool %r to %s failed: %s", self.spec.name, self.url, message)
        return ToolOutput(text=f"Error running tool {self.spec.name}: {message}", is_error=True)


def _parse_reply(data: bytes, is_whole: bool, media_type: str) -> tuple[str, bool]:
    """(text, is_error) from a reply body; raises _BadReply for a body of the wrong shape."""
    is_json = media_type == "application/json" or media_type.endswith("+json")
    if not is_json and media_type and not media_type.startswith("text/"):
        raise _BadReply(f"content type {media_type!r}; {_EXPECTED_SHAPE}")
    text = data.decode("utf-8", errors="replace")
    if not is_json:
        return text, False  # plain text: a body cut at the body cap is capped again by the caller
    if not is_whole:
        raise _BadReply(f"a JSON body over {len(data)} bytes")
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise _BadReply(f"the body is not valid JSON ({exc})") from None
    return _reply_value(value)


def _reply_value(value: Any) -> tuple[str, bool]:
    if isinstance(value, str):
        return value, False
    if not isinstance(value, dict) or "content" not in value:
        raise _BadReply(f"a JSON {type(value).__name__}; {_EXPECTED_SHAPE}")
    is_error = value.get("is_error", value.get("isError", False)) is True
    return _content_text(value["content"]), is_error


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _BadReply(f'"content" is a JSON {type(content).__name__}; expected a string or a list of parts')
    parts = []
    for part in content:
        if isinstance(part, str):
            parts.append(part)
        elif isinstance(part, dict) and isinstance(part.get("text"), str):
            parts.append(part["text"])
        elif isinstance(part, dict) and isinstance(part.get("type"), str):
            parts.append(f"[{part['type']} content]")  # an image or file part: named, not shown
        else:
            raise _BadReply('a "content" part that is neither a string nor an object with "text"')
    return "\n".join(parts)


def dispatch_tools(
    url: str,
    chat_tools: list[dict[str, Any]],
    *,
    timeout_s: float = 30.0,
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
) -> list[DispatchTool]:
    """The request's function tools as tools the server runs through `url`.

    Takes Chat Completions tools (`{"type": "function", "function": {name, description,
    parameters}}`) and Responses function tools (`{"type": "function", "name": ...}`);
    other tool types are skipped (they have executors of their own)."""
    tools = []
    for tool in chat_tools:
        if not isinstance(tool, dict) or tool.get("type") != "function":
            continue
        function = tool.get("function", tool)
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            continue
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        spec = ToolSpec(
            name=function["name"],
            description=function.get("description") or "",
            parameters=parameters,
            kind="function",
        )
        tools.append(DispatchTool(url, spec, timeout_s=timeout_s, max_output_bytes=max_output_bytes))
    return tools
