"""Tools of MCP servers (`--mcp-config`) as server-side function tools, through the
official `mcp` SDK over stdio or streamable HTTP.

The config file is JSON in the shape most MCP clients read:

    {"mcpServers": {
        "files": {"command": "npx", "args": ["-y", "some-mcp-server"], "env": {"KEY": "v"}},
        "search": {"url": "http://127.0.0.1:9000/mcp", "headers": {"Authorization": "Bearer x"}}}}

A server has either `command` (stdio; optional `args`, `env` merged over a minimal
inherited environment, `cwd` relative to the file) or `url` (streamable HTTP;
optional `headers`). Optional for both: `timeout` (seconds per call), `disabled`,
and `type` ("stdio", "http", "streamable-http"; SSE is refused).

The model sees each tool as `<server>__<tool>`: characters outside `[A-Za-z0-9_-]`
become `_`, a name over 64 characters keeps 55 and gains `_` and 8 hex digits of a
hash of the original names, and a name already taken (by an earlier server in the
file or an earlier tool) gains `_2`, `_3`, ... The tool's inputSchema is its parameters."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx2
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp.types import (
    CONNECTION_CLOSED,
    CallToolResult,
    EmbeddedResource,
    TextContent,
    TextResourceContents,
    Tool,
)

from mistralrs_serve.agent.dispatch import DEFAULT_MAX_OUTPUT_BYTES, cap_text
from mistralrs_serve.agent.tool import ServerTool, ToolContext, ToolOutput, ToolSpec
from mistralrs_serve.errors import MistralrsServeError

logger = logging.getLogger(__name__)

MAX_NAME_CHARS = 64  # OpenAI's limit on a function name
_INVALID_NAME_CHARS = re.compile(r"[^A-Za-z0-9_-]")
_KNOWN_KEYS = {"command", "args", "env", "cwd", "url", "headers", "timeout", "disabled", "type"}
_STDIO_TYPES = {"stdio"}
_HTTP_TYPES = {"http", "streamable-http", "streamable_http", "streamableHttp"}
_MAX_TOOL_PAGES = 100  # a server whose tools/list cursor never ends cannot hang startup
_CLOSE_TIMEOUT_S = 10.0


class McpConfigError(MistralrsServeError, ValueError):
    """The MCP config file is unreadable or invalid, or one of its servers could not be
    started; the message names the file and the server."""


class McpCallError(MistralrsServeError):
    """A call that did not reach a result (timeout, cancel, a dead server); the message is for the model."""


@dataclass(frozen=True)
class McpServerConfig:
    name: str
    command: str | None = None  # a stdio server's executable...
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    url: str | None = None  # ...or a streamable HTTP server's endpoint
    headers: dict[str, str] = field(default_factory=dict)
    call_timeout_s: float | None = None  # None: the tool set's default

    def describe(self) -> str:
        return f"stdio: {self.command}" if self.command is not None else f"streamable HTTP: {self.url}"


def load_mcp_config(path: str | Path) -> list[McpServerConfig]:
    """The enabled servers of an MCP config file, in file order; McpConfigError when invalid."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise McpConfigError(f"MCP config {file}: cannot read it: {exc}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise McpConfigError(f"MCP config {file}: not valid JSON: {exc}") from None
    servers = data.get("mcpServers") if isinstance(data, dict) else None
    if not isinstance(servers, dict):
        raise McpConfigError(f'MCP config {file}: expected a JSON object {{"mcpServers": {{name: server}}}}')
    configs = []
    for name, entry in servers.items():
        config = _server_config(name, entry, f"MCP config {file}, server {name!r}", file.parent)
        if config is not None:
            configs.append(config)
    return configs


def _server_config(name: str, entry: Any, where: str, base_dir: Path) -> McpServerConfig | None:
    if not name.strip():
        raise McpConfigError(f"{where}: a server needs a non-empty name")
    if not isinstance(entry, dict):
        raise McpConfigError(f"{where}: expected a JSON object, got {type(entry).__name__}")
    if entry.get("disabled") is True:
        logger.info("%s is disabled", where)
        return None
    unknown = sorted(set(entry) - _KNOWN_KEYS)
    if unknown:
        logger.warning("%s: ignoring unknown keys %s", where, ", ".join(unknown))
    kind = _transport_kind(entry, where)
    timeout_s = entry.get("timeout")
    if timeout_s is not None and (
        isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or timeout_s <= 0
    ):
        raise McpConfigError(f'{where}: "timeout" must be a positive number of seconds')
    if kind == "stdio":
        cwd = _optional_str(entry, "cwd", where)
        return McpServerConfig(
            name=name,
            command=_optional_str(entry, "command", where),
            args=tuple(_str_list(entry.get("args", []), "args", where)),
            env=_str_map(entry.get("env", {}), "env", where),
            cwd=str(base_dir / cwd) if cwd is not None else None,
            call_timeout_s=timeout_s,
        )
    url = _optional_str(entry, "url", where) or ""
    if not url.startswith(("http://", "https://")):
        raise McpConfigError(f'{where}: "url" must be an http:// or https:// URL, got {url!r}')
    return McpServerConfig(
        name=name,
        url=url,
        headers=_str_map(entry.get("headers", {}), "headers", where),
        call_timeout_s=timeout_s,
    )


def _transport_kind(entry: dict[str, Any], where: str) -> str:
    has_command, has_url = "command" in entry, "url" in entry
    kind = entry.get("type")
    if kind == "sse":
        raise McpConfigError(f"{where}: the SSE transport is not supported; use streamable HTTP")
    if kind is not None and kind not in _STDIO_TYPES | _HTTP_TYPES:
        raise McpConfigError(f'{where}: unknown "type" {kind!r}; expected "stdio" or "http"')
    if has_command and has_url:
        raise McpConfigError(f'{where}: has both "command" and "url"; give one')
    if not has_command and not has_url:
        raise McpConfigError(f'{where}: needs "command" (a stdio server) or "url" (a streamable HTTP server)')
    if kind in _STDIO_TYPES and not has_command:
        raise McpConfigError(f'{where}: "type" is stdio but there is no "command"')
    if kind in _HTTP_TYPES and not has_url:
        raise McpConfigError(f'{where}: "type" is {kind} but there is no "url"')
    return "stdio" if has_command else "http"


def _optional_str(entry: dict[str, Any], key: str, where: str) -> str | None:
    value = entry.get(key)
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise McpConfigError(f'{where}: "{key}" must be a non-empty string')
    return value


def _str_list(value: Any, key: str, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise McpConfigError(f'{where}: "{key}" must be a list of strings')
    return value


def _str_map(value: Any, key: str, where: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(item, str) for item in value.values()):
        raise McpConfigError(f'{where}: "{key}" must be an object of string values')
    return value


def function_name(server: str, tool: str, taken: set[str]) -> str:
    """The name the model calls `tool` of `server` by (the rule: module docstring); adds it to `taken`."""
    name = _INVALID_NAME_CHARS.sub("_", f"{server}__{tool}")
    if len(name) > MAX_NAME_CHARS:
        digest = hashlib.sha256(f"{server}\0{tool}".encode()).hexdigest()[:8]
        name = f"{name[: MAX_NAME_CHARS - 9]}_{digest}"
    unique, number = name, 2
    while unique in taken:
        suffix = f"_{number}"
        unique, number = name[: MAX_NAME_CHARS - len(suffix)] + suffix, number + 1
    taken.add(unique)
    return unique


@dataclass(eq=False)  # kept in a set by identity
class _Call:
    name: str
    arguments: dict[str, Any]
    future: asyncio.Future[CallToolResult]


class _McpServer:
    """One MCP server's connection. The SDK's client holds anyio task groups and cancel
    scopes that must be entered and left by one task, so one long-lived task owns the
    client from connect to close and runs each call (sent through a queue) in its task
    group; a caller only waits on a future. A connection found closed is opened again
    on the next call."""

    def __init__(self, config: McpServerConfig, connect_timeout_s: float) -> None:
        self.config = config
        self.tools: list[Tool] = []
        self._connect_timeout_s = connect_timeout_s
        self._calls: asyncio.Queue[_Call | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._is_broken = False
        self._reconnect_lock = asyncio.Lock()

    async def connect(self) -> None:
        """Open the connection and list the tools; raises McpCallError with the reason on failure."""
        ready: asyncio.Future[list[Tool]] = asyncio.get_running_loop().create_future()
        self._calls, self._is_broken = asyncio.Queue(), False
        self._task = asyncio.create_task(self._own(ready, self._calls), name=f"mcp-{self.config.name}")
        try:
            self.tools = await asyncio.wait_for(asyncio.shield(ready), self._connect_timeout_s)
        except BaseException as exc:
            ready.cancel()
            await self._cancel()
            if isinstance(exc, asyncio.TimeoutError):
                raise McpCallError(f"did not connect within {self._connect_timeout_s:g} s") from None
            raise
        logger.info("MCP server %r (%s): %d tools", self.config.name, self.config.describe(), len(self.tools))

    async def _own(self, ready: asyncio.Future[list[Tool]], calls: asyncio.Queue[_Call | None]) -> None:
        accepted: set[_Call] = set()
        failure = "the connection to the MCP server was closed"
        try:
            async with AsyncExitStack() as stack:
                client = await self._open(stack)
                ready.set_result(await _list_tools(client))
                async with anyio.create_task_group() as group:
                    while (call := await calls.get()) is not None:
                        accepted.add(call)
                        group.start_soon(self._serve, client, call, accepted)
                    group.cancel_scope.cancel()  # close: calls still running end here
        except Exception as exc:
            failure = _describe(exc, self.config)
            if not ready.done():
                ready.set_exception(McpCallError(failure))
            else:
                logger.warning("MCP server %r failed: %s", self.config.name, failure)
        finally:
            self._is_broken = True
            while not calls.empty():
                if (queued := calls.get_nowait()) is not None:
                    accepted.add(queued)
            for call in accepted:
                if not call.future.done():
                    call.future.set_exception(McpCallError(failure))

    async def _open(self, stack: AsyncExitStack) -> Client:
        config = self.config
        if config.command is not None:
            params = StdioServerParameters(
                command=config.command, args=list(config.args), env=config.env or None, cwd=config.cwd
            )
            return await stack.enter_async_context(Client(params))
        assert config.url is not None  # an invariant of McpServerConfig: command or url
        # the SDK's own timeouts: a server may hold a response stream open for minutes
        http = httpx2.AsyncClient(headers=config.headers, timeout=httpx2.Timeout(30.0, read=300.0))
        await stack.enter_async_context(http)
        return await stack.enter_async_context(Client(streamable_http_client(config.url, http_client=http)))

    async def _serve(self, client: Client, call: _Call, accepted: set[_Call]) -> None:
        if call.future.done():  # given up on while queued
            accepted.discard(call)
            return
        with anyio.CancelScope() as scope:
            call.future.add_done_callback(lambda future: scope.cancel() if future.cancelled() else None)
            try:
                result: CallToolResult | BaseException = await client.call_tool(call.name, call.arguments)
            except Exception as exc:
                result = exc
            if not call.future.done():
                if isinstance(result, BaseException):
                    call.future.set_exception(result)
                else:
                    call.future.set_result(result)
        accepted.discard(call)

    async def call(
        self, name: str, arguments: dict[str, Any], timeout_s: float, cancelled: asyncio.Event
    ) -> CallToolResult:
        """The CallToolResult of one call; McpCallError when there is none (the message says why)."""
        await self._ensure_connected()
        future: asyncio.Future[CallToolResult] = asyncio.get_running_loop().create_future()
        self._calls.put_nowait(_Call(name, arguments, future))
        stop = asyncio.ensure_future(cancelled.wait())
        waiting: set[asyncio.Future[Any]] = {future, stop}
        try:
            done, _ = await asyncio.wait(waiting, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            future.cancel()  # a no-op once answered; else the call is cancelled in the server's task
        if future not in done:
            if cancelled.is_set():
                raise McpCallError("the call was cancelled")
            raise McpCallError(f"the MCP server did not answer within {timeout_s:g} s")
        try:
            return future.result()
        except MCPError as exc:
            if exc.code == CONNECTION_CLOSED:
                self._is_broken = True
                raise McpCallError(
                    f"the MCP server closed the connection ({exc}); it is restarted on the next call"
                ) from None
            raise McpCallError(f"the MCP server answered with an error: {exc}") from None
        except McpCallError:
            raise
        except Exception as exc:
            raise McpCallError(f"the call failed: {_describe(exc, self.config)}") from None

    async def _ensure_connected(self) -> None:
        async with self._reconnect_lock:
            if not self._is_broken and self._task is not None and not self._task.done():
                return
            logger.warning("MCP server %r: connecting again", self.config.name)
            await self.aclose()
            try:
                await self.connect()
            except McpCallError as exc:
                raise McpCallError(
                    f"the MCP server is not running and could not be started again: {exc}"
                ) from None

    async def aclose(self) -> None:
        task = self._task
        if task is None or task.done():
            await self._cancel()
            return
        self._calls.put_nowait(None)
        try:
            await asyncio.wait_for(asyncio.shield(task), _CLOSE_TIMEOUT_S)
        except asyncio.TimeoutError:
            logger.warning("MCP server %r did not close within %g s", self.config.name, _CLOSE_TIMEOUT_S)
        await self._cancel()

    async def _cancel(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def _list_tools(client: Client) -> list[Tool]:
    tools: list[Tool] = []
    cursor: str | None = None
    for _ in range(_MAX_TOOL_PAGES):
        page = await client.list_tools(cursor=cursor)
        tools.extend(page.tools)
        cursor = page.next_cursor
        if cursor is None:
            break
    return tools


def _describe(exc: BaseException, config: McpServerConfig) -> str:
    """One line for a failure, from the first leaf of an exception group (anyio wraps them)."""
    while getattr(exc, "exceptions", None):  # BaseExceptionGroup (a builtin from Python 3.11)
        exc = exc.exceptions[0]  # type: ignore[attr-defined]
    if isinstance(exc, FileNotFoundError) and config.command is not None:
        return f"cannot start {config.command!r}: no such file or command"
    if isinstance(exc, OSError) and config.command is not None:
        return f"cannot start {config.command!r}: {exc.strerror or exc}"
    if isinstance(exc, MCPError) and exc.code == CONNECTION_CLOSED:
        return "the connection was closed (did the server exit? a stdio server's stderr is in this log)"
    if isinstance(exc, httpx2.HTTPError):
        return f"cannot reach {config.url}: {exc or type(exc).__name__}"
    return f"{type(exc).__name__}: {exc}"


def result_text(result: CallToolResult) -> str:
    """What the model reads of a tool result: the text parts, other parts named briefly."""
    parts = [_content_text(block) for block in result.content]
    if not parts and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content, ensure_ascii=False))
    return "\n".join(parts)


def _content_text(block: Any) -> str:
    if isinstance(block, TextContent):
        return block.text
    if isinstance(block, EmbeddedResource):
        if isinstance(block.resource, TextResourceContents):
            return block.resource.text
        return f"[resource {block.resource.uri} ({block.resource.mime_type or 'binary'})]"
    kind = getattr(block, "type", "content")
    if kind == "resource_link":
        return f"[resource link: {getattr(block, 'name', '')} {getattr(block, 'uri', '')}]"
    data = getattr(block, "data", "")
    # base64: 3 bytes per 4 characters, less one per "=" of padding
    size = (
        f", {len(data) * 3 // 4 - (len(data) - len(data.rstrip('=')))} bytes"
        if isinstance(data, str) and data
        else ""
    )
    return f"[{kind}: {getattr(block, 'mime_type', None) or 'unknown type'}{size}]"


@dataclass
class McpTool:
    """One tool of one MCP server, as a server-side function tool (a `ServerTool`)."""

    spec: ToolSpec
    server: _McpServer
    remote_name: str  # the tool's name on its server
    timeout_s: float
    max_output_bytes: int

    async def run(self, arguments: dict[str, Any], ctx: ToolContext) -> ToolOutput:
        details = {"mcp_server": self.server.config.name, "mcp_tool": self.remote_name}
        try:
            result = await self.server.call(self.remote_name, arguments, self.timeout_s, ctx.cancelled)
        except McpCallError as exc:
            message = f"Error running tool {self.spec.name} (MCP server {self.server.config.name!r}): {exc}"
            return ToolOutput(text=message, is_error=True, details=details)
        text = cap_text(result_text(result), self.max_output_bytes)
        return ToolOutput(text=text, is_error=bool(result.is_error), details=details)


class McpToolSet:
    """The tools of every server in an MCP config file, connected for the server's lifetime:
    `await McpToolSet.start(path)` at startup, `tools()` per request, `await aclose()` at shutdown."""

    def __init__(self, servers: list[_McpServer], tools: list[McpTool]) -> None:
        self._servers = servers
        self._tools = tools

    @classmethod
    async def start(
        cls,
        config_path: str | Path,
        *,
        call_timeout_s: float = 60.0,
        connect_timeout_s: float = 30.0,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
    ) -> McpToolSet:
        """Connect to every enabled server (at once) and list its tools. McpConfigError names
        the file and the server when the file is invalid or a server cannot be reached."""
        configs = load_mcp_config(config_path)
        servers = [_McpServer(config, connect_timeout_s) for config in configs]
        results = await asyncio.gather(*(server.connect() for server in servers), return_exceptions=True)
        for server, result in zip(servers, results, strict=True):
            if isinstance(result, BaseException):
                await asyncio.gather(*(s.aclose() for s in servers))
                if not isinstance(result, Exception):
                    raise result
                where = (
                    f"MCP config {config_path}, server {server.config.name!r} ({server.config.describe()})"
                )
                raise McpConfigError(f"{where}: {result}") from result
        taken: set[str] = set()
        tools = [
            _mcp_tool(server, tool, taken, call_timeout_s, max_output_bytes)
            for server in servers
            for tool in server.tools
        ]
        return cls(servers, tools)

    def tools(self) -> list[ServerTool]:
        return list(self._tools)

    async def aclose(self) -> None:
        await asyncio.gather(*(server.aclose() for server in self._servers))


def _mcp_tool(server: _McpServer, tool: Tool, taken: set[str], timeout_s: float, max_bytes: int) -> McpTool:
    name = function_name(server.config.name, tool.name, taken)
    description = (
        tool.description or tool.title or f"The tool {tool.name} of the MCP server {server.config.name}."
    )
    parameters = dict(tool.input_schema) or {"type": "object", "properties": {}}
    spec = ToolSpec(name=name, description=description, parameters=parameters, kind="function")
    return McpTool(spec, server, tool.name, server.config.call_timeout_s or timeout_s, max_bytes)
