"""Formats that write a marker then a JSON list of calls: Mistral `[TOOL_CALLS][...]` (and its newer
`[TOOL_CALLS]name[ARGS]{...}`), and Granite `<|tool_call|>[...]`.
"""

from __future__ import annotations

import re

from mistralrs_serve.entrypoints.openai.tool_parsers.calls import random_alphanumerics
from mistralrs_serve.entrypoints.openai.tool_parsers.json_scan import (
    calls_from_values,
    loads,
    match_literal,
    skip_ws,
)
from mistralrs_serve.entrypoints.openai.tool_parsers.marked import MarkedFormat, MarkedScanner
from mistralrs_serve.entrypoints.openai.tool_parsers.scanner import Head, Scanner, Step, leading_heads


class MarkerJsonFormat(MarkedFormat):
    """A marker followed by a JSON list of call objects (Mistral Nemo `[TOOL_CALLS][...]`, Granite
    `<|tool_call|>[...]`); also reads Mistral's newer `[TOOL_CALLS]name[ARGS]{...}`."""

    def __init__(self, name: str, marker: str) -> None:
        self.name = name
        self.starts = (marker,)
        self.terminators = (marker,)

    def _grammar_frame(self, parallel: bool) -> tuple[str, str, str]:
        return self.starts[0] + "[", ", ", "]"

    def block(self, scanner: MarkedScanner, buffer: str, marker: str, final: bool) -> Step | None:
        pos = skip_ws(buffer, len(marker))
        if pos == len(buffer):
            return None
        if buffer[pos] not in "{[":
            return _named_call(scanner, buffer, marker, pos, final)
        end = scanner.json_end(buffer, pos)
        heads = scanner.heads(buffer, pos)
        if end is None and not final:
            return scanner.pending(buffer, leading_heads(heads))
        if end is not None and end > 0:
            calls = calls_from_values([loads(buffer[pos:end])], require_arguments=False)
            if calls:
                return Step(end, scanner.raw_calls(buffer, calls, heads))
        leading = leading_heads(heads)
        if not leading:
            return Step(len(marker))
        value_end = end if end is not None and end > 0 else None
        return scanner.forced(buffer, leading, final, starts=self.starts, end=value_end)


_MISTRAL_NAME = re.compile(r"[A-Za-z0-9_.:-]+")
_MISTRAL_CALL_ID = re.compile(r"[A-Za-z0-9]*")


def _named_call(scanner: Scanner, buffer: str, marker: str, pos: int, final: bool) -> Step | None:
    """`name[ARGS]{...}` (or `name[CALL_ID]id[ARGS]{...}`) after the marker."""
    name = _MISTRAL_NAME.match(buffer, pos)
    if name is None:
        return Step(len(marker))
    pos = name.end()
    if pos == len(buffer):
        return None
    after_id = match_literal(buffer, pos, "[CALL_ID]")
    if after_id is not None and after_id > 0:
        pos = _MISTRAL_CALL_ID.match(buffer, after_id).end()  # type: ignore[union-attr]
        if pos == len(buffer):
            return None
    after_args = match_literal(buffer, pos, "[ARGS]")
    if after_args is None or (after_id is None and after_args < 0):
        return None
    if after_args < 0:
        return Step(len(marker))
    start = skip_ws(buffer, after_args)
    if start == len(buffer):
        return None
    if buffer[start] != "{":
        return Step(len(marker))
    # The name and the arguments' "{" are read: a call, whatever its arguments turn out to be.
    end, settled = scanner.arguments(buffer, start, final)
    if not settled:
        return scanner.pending(buffer, [Head(name.group(), start)])
    return Step(end, [(name.group(), buffer[start:end])])


class MistralFormat(MarkerJsonFormat):
    """Mistral Small 3.2 and later: `[TOOL_CALLS]name[ARGS]{...}` for each call; tool-call ids
    are 9 alphanumerics, as Mistral's templates demand of the ids a client sends back."""

    def __init__(self, name: str, *, named: bool) -> None:
        super().__init__(name, "[TOOL_CALLS]")
        self._named = named

    def new_call_id(self) -> str:
        return random_alphanumerics(9)

    def _grammar_frame(self, parallel: bool) -> tuple[str, str, str]:
        return ("", "", "") if self._named else super()._grammar_frame(parallel)

    def _call_text(self, name: str) -> tuple[str, str]:
        return (f"[TOOL_CALLS]{name}[ARGS]", "") if self._named else super()._call_text(name)
