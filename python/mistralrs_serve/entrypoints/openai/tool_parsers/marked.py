"""The base of formats that write calls in blocks opened by a marker, after any content: the scanner
that finds the blocks and the `auto_grammar` that allows text up to the marker.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mistralrs_serve.entrypoints.openai.tool_parsers.format import ToolCallFormat
from mistralrs_serve.entrypoints.openai.tool_parsers.grammar import ANY, lark_string, regex_literal
from mistralrs_serve.entrypoints.openai.tool_parsers.json_scan import find_first, partial_suffix
from mistralrs_serve.entrypoints.openai.tool_parsers.scanner import Scanner, Step


class MarkedScanner(Scanner):
    """Content with call blocks that begin with one of `starts`; `fmt.block` reads a block."""

    def __init__(self, fmt: MarkedFormat, tools: Sequence[Mapping[str, Any]] | None) -> None:
        super().__init__()
        self._format = fmt
        self.tools = tools
        self.terminators = fmt.terminators

    def scan(self, buffer: str, final: bool) -> Step | None:
        index, marker = find_first(buffer, self._format.starts)
        if index > 0:
            return Step(index)
        if index < 0:
            keep = 0 if final else partial_suffix(buffer, self._format.starts)
            return Step(len(buffer) - keep) if keep < len(buffer) else None
        decided = self._format.block(self, buffer, marker, final)
        if decided is None and final and not self.open:
            decided = Step(len(marker))  # never closed and unreadable: the marker is text
        return decided


class MarkedFormat(ToolCallFormat):
    starts: tuple[str, ...] = ()
    #: markers that end arguments whose brackets never match (see `Scanner.arguments`)
    terminators: tuple[str, ...] = ()

    def _scanner(self, tools: Sequence[Mapping[str, Any]] | None) -> Scanner:
        return MarkedScanner(self, tools)

    def auto_grammar(self, tools: Sequence[Mapping[str, Any]], *, parallel: bool) -> str:
        """An llguidance Lark grammar for what the model may write when it may call `tools`: text
        without the marker that opens calls, or text up to that marker and then the calls exactly
        as `call_grammar` has them.

        Lexemes do not backtrack, so text before the calls cannot be a lexeme that excludes the
        marker: it would swallow a marker's first characters before the marker shows. It is a lazy
        lexeme that ends with the marker (`suffix`), the calls less that marker after it. When the
        server puts a special token in the marker's place, text never holds it: the last branch,
        text and then the marker as a literal of its own, takes it."""
        (marker,) = self.starts
        calls, rules = self._calls_grammar(tools, parallel=parallel, opened=marker)
        literal = regex_literal(marker)
        return self._complete_grammar(
            [
                f"start: TEXT | text_to_marker opened_calls | TEXT? {lark_string(marker)} opened_calls",
                f"TEXT: /{ANY}/ & ~/{ANY}{literal}{ANY}/",
                f"text_to_marker[suffix=/{literal}/]: /{ANY}/",
                "opened_calls: " + calls,
                *rules,
            ]
        )

    def block(self, scanner: MarkedScanner, buffer: str, marker: str, final: bool) -> Step | None:
        """The call block at the start of `buffer` (which starts with `marker`); None while undecided.

        An unreadable block gives `Step(len(marker))`: the marker becomes text, and the rest is
        scanned again.
        """
        raise NotImplementedError

    @staticmethod
    def closed_block(buffer: str, marker: str, close: str, final: bool) -> tuple[str, int] | None:
        """(inner text, end) of a block ending in `close`, or running to the end of a final output."""
        end = buffer.find(close, len(marker))
        if end >= 0:
            return buffer[len(marker) : end], end + len(close)
        return (buffer[len(marker) :], len(buffer)) if final else None
