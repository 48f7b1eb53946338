"""MCP servers' tools as server-side tools (agent/mcp_tools.py): stdio servers started
from tests/agent/mcp_echo_server.py, a streamable HTTP server run in this process on
a loopback port, and config files that must be refused at startup."""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import pytest
import uvicorn
from mcp.types import (
    AudioContent,
    BlobResourceContents,
    CallToolResult,
    EmbeddedResource,
    ResourceLink,
    TextContent,
    TextResourceContents,
)
from mistralrs_serve.agent.mcp_tools import (
    McpConfigError,
    McpToolSet,
    function_name,
    load_mcp_config,
    result_text,
)
from mistralrs_serve.agent.tool import ServerTool, ToolContext, ToolOutput

ECHO_SERVER = Path(__file__).resolve().parent / "mcp_echo_server.py"
T = TypeVar("T")


class LoopThread:
    """An event loop in a thread, so one tool set (bound to its loop) serves several tests."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def _stdio(name: str = "echo") -> dict[str, Any]:
    return {"command": sys.executable, "args": [str(ECHO_SERVER), name]}


def _write_config(tmp_path: Path, servers: Any, name: str = "mcp.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps({"mcpServers": servers}), encoding="utf-8")
    return path


def _ctx() -> ToolContext:
    return ToolContext(session=SimpleNamespace(id="s", workdir=Path(".")), cancelled=asyncio.Event())


def _by_name(toolset: McpToolSet) -> dict[str, ServerTool]:
    return {tool.spec.name: tool for tool in toolset.tools()}


@pytest.fixture(scope="module")
def loop() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.close()


@pytest.fixture(scope="module")
def stdio_tools(
    loop: LoopThread, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, ServerTool]]:
    # "a.b" and "a_b" both become a_b__<tool>: the second server's names gain _2
    config = _write_config(tmp_path_factory.mktemp("mcp"), {"a.b": _stdio(), "a_b": _stdio()})
    toolset = loop.run(McpToolSet.start(config, call_timeout_s=10, max_output_bytes=2000))
    yield _by_name(toolset)
    loop.run(toolset.aclose())


def _run(loop: LoopThread, tool: ServerTool, arguments: dict[str, Any]) -> ToolOutput:
    return loop.run(tool.run(arguments, _ctx()))


def test_stdio_tools_are_named_and_described(stdio_tools: dict[str, ServerTool]) -> None:
    names = set(stdio_tools)
    tools = ("echo", "add", "fail", "slow", "pid", "crash", "picture", "dotted_name")
    assert names == {f"a_b__{t}" for t in tools} | {f"a_b__{t}_2" for t in tools}
    echo = stdio_tools["a_b__echo"].spec
    assert echo.kind == "function" and echo.description == "Echo the text back."
    assert echo.parameters["properties"]["text"]["type"] == "string"
    assert echo.parameters["required"] == ["text"]


def test_stdio_calls(loop: LoopThread, stdio_tools: dict[str, ServerTool]) -> None:
    out = _run(loop, stdio_tools["a_b__echo"], {"text": "hi"})
    assert (out.text, out.is_error) == ("hi", False)
    assert out.details == {"mcp_server": "a.b", "mcp_tool": "echo"}
    out = _run(loop, stdio_tools["a_b__add_2"], {"a": 2, "b": 40})
    assert (out.text, out.is_error, out.details["mcp_server"]) == ("42", False, "a_b")
    assert _run(loop, stdio_tools["a_b__dotted_name"], {}).text == "dotted ok"


def test_stdio_tool_error_is_an_error_output(loop: LoopThread, stdio_tools: dict[str, ServerTool]) -> None:
    out = _run(loop, stdio_tools["a_b__fail"], {"message": "boom"})
    assert out.is_error and "boom" in out.text
    out = _run(loop, stdio_tools["a_b__add"], {"a": "x"})  # the server validates the arguments
    assert out.is_error and "validation" in out.text


def test_stdio_image_is_described(loop: LoopThread, stdio_tools: dict[str, ServerTool]) -> None:
    out = _run(loop, stdio_tools["a_b__picture"], {})
    assert out.text.splitlines() == ["[image: image/png, 66 bytes]", "a pixel"]


def test_stdio_output_is_capped(loop: LoopThread, stdio_tools: dict[str, ServerTool]) -> None:
    out = _run(loop, stdio_tools["a_b__echo"], {"text": "z" * 5000})
    assert out.text.startswith("z" * 2000) and "[output truncated: 5000 bytes" in out.text


def test_stdio_timeout_then_the_session_still_works(
    loop: LoopThread, stdio_tools: dict[str, ServerTool]
) -> None:
    slow = stdio_tools["a_b__slow"]
    started = time.monotonic()
    out = loop.run(type(slow)(**{**vars(slow), "timeout_s": 0.3}).run({"seconds": 5}, _ctx()))
    assert out.is_error and "did not answer within 0.3 s" in out.text
    assert time.monotonic() - started < 3
    assert _run(loop, stdio_tools["a_b__echo"], {"text": "still here"}).text == "still here"


def test_stdio_cancel(loop: LoopThread, stdio_tools: dict[str, ServerTool]) -> None:
    async def scenario() -> tuple[ToolOutput, float]:
        ctx = _ctx()
        asyncio.get_running_loop().call_later(0.2, ctx.cancelled.set)
        started = time.monotonic()
        out = await stdio_tools["a_b__slow_2"].run({"seconds": 5}, ctx)
        return out, time.monotonic() - started

    out, elapsed_s = loop.run(scenario())
    assert out.is_error and "cancelled" in out.text
    assert elapsed_s < 3
    assert _run(loop, stdio_tools["a_b__echo_2"], {"text": "after"}).text == "after"


def test_concurrent_calls_on_one_server(loop: LoopThread, stdio_tools: dict[str, ServerTool]) -> None:
    async def scenario() -> list[ToolOutput]:
        slow = stdio_tools["a_b__slow"]
        return await asyncio.gather(*(slow.run({"seconds": 1.0}, _ctx()) for _ in range(4)))

    started = time.monotonic()
    outs = loop.run(scenario())
    assert [o.text for o in outs] == ["slept 1.0"] * 4
    assert time.monotonic() - started < 3.0  # side by side: one after another takes 4 s


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_dead_server_is_an_error_then_restarted_and_closed(tmp_path: Path) -> None:
    async def scenario() -> None:
        toolset = await McpToolSet.start(_write_config(tmp_path, {"solo": _stdio()}), call_timeout_s=10)
        tools = _by_name(toolset)
        first_pid = int((await tools["solo__pid"].run({}, _ctx())).text)
        out = await tools["solo__crash"].run({}, _ctx())
        assert out.is_error and "closed the connection" in out.text and "'solo'" in out.text
        out = await tools["solo__echo"].run({"text": "back"}, _ctx())  # a new process
        assert (out.text, out.is_error) == ("back", False)
        second_pid = int((await tools["solo__pid"].run({}, _ctx())).text)
        assert second_pid != first_pid
        await toolset.aclose()
        deadline = time.monotonic() + 5
        while _pid_alive(second_pid) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not _pid_alive(second_pid)

    asyncio.run(scenario())


# -- streamable HTTP ---------------------------------------------------------------


def _echo_module() -> Any:
    spec = importlib.util.spec_from_file_location("mcp_echo_server_for_tests", ECHO_SERVER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve_http(app: Any, port: int) -> tuple[uvicorn.Server, threading.Thread]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    return server, thread


def _stop_http(server: uvicorn.Server, thread: threading.Thread) -> None:
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def http_server() -> Iterator[tuple[str, list[dict[bytes, bytes]]]]:
    app = _echo_module().build_server("web").streamable_http_app()
    seen_headers: list[dict[bytes, bytes]] = []

    async def recording_app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            seen_headers.append(dict(scope["headers"]))
        await app(scope, receive, send)

    port = _free_port()
    server, thread = _serve_http(recording_app, port)
    yield f"http://127.0.0.1:{port}/mcp", seen_headers
    _stop_http(server, thread)


def test_streamable_http(http_server: tuple[str, list[dict[bytes, bytes]]], tmp_path: Path) -> None:
    url, seen_headers = http_server
    config = _write_config(tmp_path, {"web": {"url": url, "headers": {"X-Api-Key": "k1"}}})

    async def scenario() -> None:
        toolset = await McpToolSet.start(config, call_timeout_s=10)
        try:
            tools = _by_name(toolset)
            assert "web__echo" in tools and "web__dotted_name" in tools
            assert (await tools["web__add"].run({"a": 1, "b": 2}, _ctx())).text == "3"
            out = await tools["web__fail"].run({"message": "over http"}, _ctx())
            assert out.is_error and "over http" in out.text
            ctx = _ctx()
            asyncio.get_running_loop().call_later(0.2, ctx.cancelled.set)
            out = await tools["web__slow"].run({"seconds": 5}, ctx)
            assert out.is_error and "cancelled" in out.text
            assert (await tools["web__echo"].run({"text": "ok"}, _ctx())).text == "ok"
        finally:
            await toolset.aclose()

    asyncio.run(scenario())
    assert seen_headers and all(h.get(b"x-api-key") == b"k1" for h in seen_headers)


def test_http_server_gone_is_an_error_then_reconnected(tmp_path: Path) -> None:
    port = _free_port()
    config = _write_config(tmp_path, {"web": {"url": f"http://127.0.0.1:{port}/mcp"}})
    echo_module = _echo_module()

    async def scenario() -> None:
        server, thread = _serve_http(echo_module.build_server("web").streamable_http_app(), port)
        toolset = await McpToolSet.start(config, call_timeout_s=10)
        echo = _by_name(toolset)["web__echo"]
        try:
            assert (await echo.run({"text": "1"}, _ctx())).text == "1"
            await asyncio.to_thread(_stop_http, server, thread)
            out = await echo.run({"text": "2"}, _ctx())
            assert out.is_error and f"cannot reach http://127.0.0.1:{port}/mcp" in out.text
            server, thread = _serve_http(echo_module.build_server("web").streamable_http_app(), port)
            assert (await echo.run({"text": "3"}, _ctx())).text == "3"
        finally:
            await toolset.aclose()
            await asyncio.to_thread(_stop_http, server, thread)

    asyncio.run(scenario())


def test_http_server_not_listening_is_a_startup_error(tmp_path: Path) -> None:
    config = _write_config(tmp_path, {"gone": {"url": f"http://127.0.0.1:{_free_port()}/mcp"}})
    with pytest.raises(
        McpConfigError, match=r"server 'gone' \(streamable HTTP: http://127\.0\.0\.1:\d+/mcp\)"
    ):
        asyncio.run(McpToolSet.start(config, connect_timeout_s=10))


# -- config files ------------------------------------------------------------------


def _start_error(path: Path, **kwargs: Any) -> str:
    with pytest.raises(McpConfigError) as info:
        asyncio.run(McpToolSet.start(path, **kwargs))
    return str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    message = _start_error(tmp_path / "nope.json")
    assert str(tmp_path / "nope.json") in message and "cannot read it" in message


def test_bad_json(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text("{mcpServers: ", encoding="utf-8")
    message = _start_error(path)
    assert str(path) in message and "not valid JSON" in message


@pytest.mark.parametrize(
    ("servers", "message"),
    [
        ({"s1": {"args": ["x"]}}, 'server \'s1\': needs "command" (a stdio server) or "url"'),
        ({"s1": {"command": "x", "url": "http://h/mcp"}}, 'server \'s1\': has both "command" and "url"'),
        ({"s1": {"command": "x", "args": "-v"}}, "server 's1': \"args\" must be a list of strings"),
        (
            {"s1": {"command": "x", "env": {"A": 1}}},
            "server 's1': \"env\" must be an object of string values",
        ),
        ({"s1": {"command": ""}}, "server 's1': \"command\" must be a non-empty string"),
        ({"s1": {"url": "ftp://h/mcp"}}, "server 's1': \"url\" must be an http:// or https:// URL"),
        ({"s1": {"url": "http://h/mcp", "headers": ["a"]}}, '"headers" must be an object of string values'),
        ({"s1": {"url": "http://h/sse", "type": "sse"}}, "the SSE transport is not supported"),
        ({"s1": {"url": "http://h/mcp", "type": "stdio"}}, '"type" is stdio but there is no "command"'),
        ({"s1": {"command": "x", "timeout": -1}}, '"timeout" must be a positive number'),
        ({"s1": "npx server"}, "server 's1': expected a JSON object, got str"),
        (["not", "an", "object"], 'expected a JSON object {"mcpServers"'),
    ],
)
def test_invalid_server_entries(tmp_path: Path, servers: Any, message: str) -> None:
    path = _write_config(tmp_path, servers)
    with pytest.raises(McpConfigError) as info:
        load_mcp_config(path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_command_that_does_not_exist(tmp_path: Path) -> None:
    path = _write_config(tmp_path, {"ghost": {"command": "/nonexistent/mcp-server-xyz"}})
    message = _start_error(path)
    assert str(path) in message and "server 'ghost'" in message
    assert "cannot start '/nonexistent/mcp-server-xyz'" in message


def test_command_that_exits_at_once(tmp_path: Path) -> None:
    path = _write_config(tmp_path, {"quitter": {"command": sys.executable, "args": ["-c", "pass"]}})
    message = _start_error(path, connect_timeout_s=10)
    assert "server 'quitter'" in message and "closed" in message


def test_server_that_never_answers_times_out(tmp_path: Path) -> None:
    script = "import time; time.sleep(30)"
    path = _write_config(tmp_path, {"mute": {"command": sys.executable, "args": ["-c", script]}})
    started = time.monotonic()
    message = _start_error(path, connect_timeout_s=1)
    assert "server 'mute'" in message and "did not connect within 1 s" in message
    assert time.monotonic() - started < 8


def test_one_bad_server_fails_startup_and_disabled_ones_are_skipped(tmp_path: Path) -> None:
    path = _write_config(tmp_path, {"ok": _stdio(), "ghost": {"command": "/nonexistent/x"}})
    assert "server 'ghost'" in _start_error(path)
    path = _write_config(tmp_path, {"off": {"command": "/nonexistent/x", "disabled": True}}, "off.json")
    assert load_mcp_config(path) == []


def test_relative_cwd_is_relative_to_the_file(tmp_path: Path) -> None:
    path = _write_config(tmp_path, {"s": {"command": "x", "cwd": "work"}})
    assert load_mcp_config(path)[0].cwd == str(tmp_path / "work")


# -- names and results ------------------------------------------------------------


def test_function_names() -> None:
    taken: set[str] = set()
    assert function_name("git hub", "search/code", taken) == "git_hub__search_code"
    assert function_name("git.hub", "search code", taken) == "git_hub__search_code_2"
    long = function_name("server", "t" * 100, taken)
    assert len(long) == 64 and long.startswith("server__ttt") and long[-9] == "_"
    assert function_name("server", "t" * 100, taken) == long[:62] + "_2"
    assert function_name("server", "t" * 99, taken) != long  # a different hash


def test_result_text_of_every_content_kind() -> None:
    result = CallToolResult(
        content=[
            TextContent(text="hello"),
            AudioContent(data=base64.b64encode(b"abcdef").decode(), mime_type="audio/wav"),
            ResourceLink(name="notes", uri="file:///notes.txt"),
            EmbeddedResource(resource=TextResourceContents(uri="file:///a.txt", text="inline text")),
            EmbeddedResource(
                resource=BlobResourceContents(uri="file:///b.bin", blob="AAAA", mime_type="x/y")
            ),
        ]
    )
    assert result_text(result).splitlines() == [
        "hello",
        "[audio: audio/wav, 6 bytes]",
        "[resource link: notes file:///notes.txt]",
        "inline text",
        "[resource file:///b.bin (x/y)]",
    ]
    assert result_text(CallToolResult(content=[], structured_content={"n": 1})) == '{"n": 1}'
