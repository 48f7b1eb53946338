"""What the tool-call parsers give: complete calls, streaming deltas, and the tuples they pass
between them before a call gets its id.
"""

from __future__ import annotations

import secrets
import string
from dataclasses import dataclass, field
from typing import Any

# A call read from a JSON value or XML, before it gets an id: (function name, arguments object).
ObjCall = tuple[str, dict[str, Any]]
# A call as it will be told, before it gets an id: (function name, JSON text of the arguments).
RawCall = tuple[str, str]

_ID_ALPHABET = string.ascii_letters + string.digits


def random_alphanumerics(length: int) -> str:
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(length))


@dataclass(frozen=True)
class ToolCall:
    """One complete tool call."""

    id: str
    name: str
    arguments: str  # JSON text of the arguments object (as the model wrote it, where it wrote JSON)


@dataclass
class ToolCallDelta:
    """A piece of one call in OpenAI's streaming shape; `id` and `name` only on a call's first delta."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class ParsedDelta:
    """What one piece of model output adds: content text and pieces of tool calls."""

    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
