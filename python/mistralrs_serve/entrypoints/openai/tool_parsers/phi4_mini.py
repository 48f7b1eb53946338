"""Phi-4-mini: after any content, `<|tool_call|>[{"name": ..., "arguments": {...}}, ...]<|/tool_call|>`
(its chat template declares the tools in the system message, between `<|tool|>` and `<|/tool|>`).

Granite's marker and JSON list (mistral.py's `MarkerJsonFormat`) with a closing marker: the scanner
drops it after the calls, and the grammar writes it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mistralrs_serve.entrypoints.openai.tool_parsers.json_scan import match_literal, skip_ws
from mistralrs_serve.entrypoints.openai.tool_parsers.marked import MarkedScanner
from mistralrs_serve.entrypoints.openai.tool_parsers.mistral import MarkerJsonFormat
from mistralrs_serve.entrypoints.openai.tool_parsers.scanner import Scanner, Step

OPEN, CLOSE = "<|tool_call|>", "<|/tool_call|>"


class _ClosingScanner(MarkedScanner):
    """MarkedScanner that also drops the closing marker (after optional whitespace) that follows calls."""

    def __init__(self, fmt: MarkerJsonFormat, tools: Sequence[Mapping[str, Any]] | None) -> None:
        super().__init__(fmt, tools)
        self._after_calls = False

    def scan(self, buffer: str, final: bool) -> Step | None:
        if self._after_calls:
            after = match_literal(buffer, skip_ws(buffer, 0), CLOSE)
            if after is None and not final:
                return None  # the buffer so far is (whitespace and) the start of the marker
            self._after_calls = False
            if after is not None and after > 0:
                return Step(after, [])
        step = super().scan(buffer, final)
        self._after_calls = step is not None and bool(step.calls)
        return step


class Phi4MiniFormat(MarkerJsonFormat):
    """`<|tool_call|>[...]<|/tool_call|>`: call objects with "name" and "arguments"."""

    def __init__(self) -> None:
        super().__init__("phi4_mini", OPEN)
        self.terminators = (OPEN, CLOSE)

    def _scanner(self, tools: Sequence[Mapping[str, Any]] | None) -> Scanner:
        return _ClosingScanner(self, tools)

    def _grammar_frame(self, parallel: bool) -> tuple[str, str, str]:
        return OPEN + "[", ", ", "]" + CLOSE
