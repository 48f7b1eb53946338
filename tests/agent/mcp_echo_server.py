"""A small MCP server for the MCP client tests (tests/agent/test_mcp.py), written
with the official SDK. Run as a script it serves stdio; `build_server()` gives
the same tools for the in-process streamable HTTP test.

Tools: echo(text), add(a, b), fail(message) (raises: the result has isError),
slow(seconds) (for timeouts and cancellation), pid(), crash() (the process
exits: a dead server), picture() (an image and a text part), and `dotted.name`
(a name that is not a valid function name as it stands)."""

from __future__ import annotations

import asyncio
import base64
import os
import sys

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import CallToolResult, ImageContent, TextContent

# 1x1 transparent PNG
_PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
)


def build_server(name: str = "echo") -> MCPServer:
    server: MCPServer = MCPServer(name, log_level="WARNING")

    @server.tool(description="Echo the text back.")
    def echo(text: str) -> str:
        return text

    @server.tool(description="Add two integers.")
    def add(a: int, b: int) -> str:
        return str(a + b)

    @server.tool(description="Always fails with the given message.")
    def fail(message: str) -> str:
        raise ToolError(message)  # ToolError: the client sees the message (others are hidden)

    @server.tool(description="Sleep, then say how long.")
    async def slow(seconds: float) -> str:
        await asyncio.sleep(seconds)
        return f"slept {seconds}"

    @server.tool(description="The server's process id.")
    def pid() -> str:
        return str(os.getpid())

    @server.tool(description="Exit the server process at once.")
    def crash() -> str:
        os._exit(3)

    @server.tool(description="A picture and a caption.")
    def picture() -> CallToolResult:
        image = ImageContent(data=base64.b64encode(_PNG).decode(), mime_type="image/png")
        return CallToolResult(content=[image, TextContent(text="a pixel")])

    @server.tool(name="dotted.name", description="A tool whose name has a dot.")
    def dotted() -> str:
        return "dotted ok"

    return server


if __name__ == "__main__":
    build_server(sys.argv[1] if len(sys.argv) > 1 else "echo").run()
