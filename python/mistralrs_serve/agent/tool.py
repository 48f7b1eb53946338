"""What the agent loop (loop.py) needs of a server-side tool, and what a tool
gets and gives back. Every executor (web search, page fetch, the Python
interpreter, the shell, the dispatch URL, MCP servers) is a `ServerTool`: the
model sees its `ToolSpec` as an ordinary function tool, the loop calls `run`
with the parsed arguments, and the `ToolOutput` goes back to the model as the
tool message (`text`) and to the client as the call's result (the rest)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

# Which hosted tool a server tool belongs to: it decides the Responses item type
# (web_search_call, code_interpreter_call, shell_call) and which flag enables it.
ToolKind = Literal["web_search", "code_interpreter", "shell", "function"]


@dataclass(frozen=True)
class ToolSpec:
    name: str  # what the model calls; unique within one request's tools
    description: str
    parameters: dict[str, Any]  # JSON Schema of the arguments object
    kind: ToolKind = "function"

    def as_chat_tool(self) -> dict[str, Any]:
        """The Chat Completions tool the model is shown (arguments constrained, strict)."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
                "strict": True,
            },
        }


@dataclass(frozen=True)
class Citation:
    """A web source the answer may cite (Responses `url_citation`)."""

    url: str
    title: str = ""


@dataclass(frozen=True)
class OutputFile:
    """A file a tool produced, stored in the Files API (Responses `container_file_citation`)."""

    file_id: str
    filename: str
    bytes: int
    content_type: str = "application/octet-stream"


@dataclass
class ToolOutput:
    text: str  # what the model reads as the tool message
    is_error: bool = False
    files: list[OutputFile] = field(default_factory=list)
    citations: list[Citation] = field(default_factory=list)
    # Per kind, for the Responses items and the chat `agentic_tool_calls` entry:
    #   web_search: {"action": {"type": "search", "query": ..., "sources": [{"type": "url", "url": ...}]}}
    #               or {"action": {"type": "open_page", "url": ...}}
    #   code_interpreter: {"code": ..., "outputs": [{"type": "logs", "logs": ...},
    #                                                {"type": "image", "url": ...}]}
    #   shell: {"commands": [...], "output": [{"stdout": ..., "stderr": ...,
    #                                          "outcome": {"type": "exit", "exit_code": N}}]}
    details: dict[str, Any] = field(default_factory=dict)


class SessionHandle(Protocol):
    """The part of an agent session a tool sees (sessions.py keeps the rest)."""

    id: str
    workdir: Path  # the session's working directory: code and shell run here


@dataclass
class ToolContext:
    session: SessionHandle
    # set when the client went away or the response was cancelled: a tool stops
    # what it runs (kills its processes) and returns as soon as it can
    cancelled: asyncio.Event
    files: Any = None  # store.files.FileStore, for tools that surface files; None: not kept


class ServerTool(Protocol):
    spec: ToolSpec

    async def run(self, arguments: dict[str, Any], ctx: ToolContext) -> ToolOutput:
        """Run one call. Failures the model can react to (a bad URL, a Python
        exception, a non-zero exit) are a ToolOutput with is_error=True, not an
        exception; raising means the tool itself is broken."""
        ...
