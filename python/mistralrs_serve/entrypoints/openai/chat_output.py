"""What a chat request's output text becomes: reasoning, content and tool
calls, for the whole text and as a stream of deltas (the same parsers serve
both, so a streamed answer concatenates to the non-streamed one)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mistralrs_serve.entrypoints.openai.reasoning import ReasoningParser
from mistralrs_serve.entrypoints.openai.tool_parsers import (
    ParsedDelta,
    ToolCall,
    ToolCallDelta,
    ToolCallStreamer,
)


@dataclass
class OutputDelta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)

    def extend(self, other: OutputDelta) -> None:
        self.reasoning += other.reasoning
        self.add_parsed(other)

    def add_parsed(self, parsed: OutputDelta | ParsedDelta) -> None:
        """Content and tool-call pieces (a tool streamer's output, or another delta's)."""
        self.content += parsed.content
        self.tool_calls.extend(parsed.tool_calls)


class ChoiceParser:
    """Splits one choice's text: thinking first (when the template thinks),
    then tool calls out of the rest (when the request offers tools)."""

    def __init__(self, reasoning: ReasoningParser | None, tools: ToolCallStreamer | None) -> None:
        self.reasoning = reasoning
        self.tools = tools

    def feed(self, text: str) -> OutputDelta:
        reasoning, content = self.reasoning.feed(text) if self.reasoning else ("", text)
        return self._content(reasoning, content, final=False)

    def finish(self) -> OutputDelta:
        reasoning, content = self.reasoning.finish() if self.reasoning else ("", "")
        return self._content(reasoning, content, final=True)

    def _content(self, reasoning: str, content: str, final: bool) -> OutputDelta:
        if self.tools is None:
            return OutputDelta(reasoning, content)
        out = OutputDelta(reasoning)
        if content:
            out.add_parsed(self.tools.feed(content))
        if final:
            out.add_parsed(self.tools.finish())
        return out

    @property
    def calls(self) -> list[ToolCall]:
        return self.tools.calls if self.tools is not None else []


@dataclass(frozen=True)
class ParsedMessage:
    content: str | None
    reasoning: str | None
    tool_calls: list[dict[str, Any]] | None


def parse_text(parser: ChoiceParser, text: str) -> ParsedMessage:
    """A whole choice's message fields."""
    out = parser.feed(text)
    out.extend(parser.finish())
    calls = [openai_call(c) for c in parser.calls] or None
    return ParsedMessage(message_content(out.content, calls is not None), out.reasoning or None, calls)


def message_content(text: str, has_calls: bool) -> str | None:
    """A message's content: null when it only calls tools (whitespace around the calls is not an answer)."""
    return text if text.strip() or not has_calls else None


def finish_reason(reason: str | None, parser: ChoiceParser) -> str:
    """OpenAI's finish_reason: a choice that stopped after calling tools ends with "tool_calls"."""
    reason = reason or "stop"
    return "tool_calls" if reason == "stop" and parser.calls else reason


def openai_call(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def openai_call_delta(delta: ToolCallDelta) -> dict[str, Any]:
    """OpenAI's streaming shape: the first piece of a call names it, later ones add arguments."""
    out: dict[str, Any] = {"index": delta.index}
    function: dict[str, Any] = {"arguments": delta.arguments}
    if delta.id is not None:
        out["id"] = delta.id
        out["type"] = "function"
    if delta.name is not None:
        function["name"] = delta.name
    out["function"] = function
    return out
