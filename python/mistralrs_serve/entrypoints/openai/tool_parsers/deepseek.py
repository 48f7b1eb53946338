"""DeepSeek's tool-call blocks, in the V3.1 style (`name<｜tool▁sep｜>{...}`) and the R1 / V3 style
(a ```json fence after the name).
"""

from __future__ import annotations

import re

from mistralrs_serve.entrypoints.openai.tool_parsers.grammar import (
    DS_CALL_BEGIN,
    DS_CALL_END,
    DS_CALLS_BEGIN,
    DS_CALLS_END,
    DS_SEP,
)
from mistralrs_serve.entrypoints.openai.tool_parsers.json_scan import match_literal, skip_ws
from mistralrs_serve.entrypoints.openai.tool_parsers.marked import MarkedFormat, MarkedScanner
from mistralrs_serve.entrypoints.openai.tool_parsers.scanner import Head, Step

# R1 / V3 after the separator: "name\n```json\n" up to the arguments' "{" (a name holds no "｜", so
# no marker).
_DS_FENCE_HEAD = re.compile(r"([^\n`｜]+?)\s*\n```(?:json)?\s*\n\s*\{")


class DeepSeekFormat(MarkedFormat):
    """DeepSeek: `<｜tool▁calls▁begin｜>` calls `<｜tool▁calls▁end｜>`, each call
    `<｜tool▁call▁begin｜>name<｜tool▁sep｜>{...}<｜tool▁call▁end｜>` (V3.1) or, in the R1 / V3 style,
    `<｜tool▁call▁begin｜>function<｜tool▁sep｜>name\\n```json\\n{...}\\n```<｜tool▁call▁end｜>`.
    Both are read; `fenced` picks the one the grammar writes."""

    starts = (DS_CALLS_BEGIN,)
    terminators = (DS_CALL_END, DS_CALLS_END, DS_CALL_BEGIN, "```")

    def __init__(self, name: str, *, fenced: bool) -> None:
        self.name = name
        self._fenced = fenced

    def _grammar_frame(self, parallel: bool) -> tuple[str, str, str]:
        return DS_CALLS_BEGIN, "\n" if self._fenced else "", DS_CALLS_END

    def _call_text(self, name: str) -> tuple[str, str]:
        if self._fenced:
            return f"{DS_CALL_BEGIN}function{DS_SEP}{name}\n```json\n", f"\n```{DS_CALL_END}"
        return f"{DS_CALL_BEGIN}{name}{DS_SEP}", DS_CALL_END

    def block(self, scanner: MarkedScanner, buffer: str, marker: str, final: bool) -> Step | None:
        heads: list[Head] = []
        pos, broken = len(marker), False
        while True:
            pos = skip_ws(buffer, pos)
            closed = match_literal(buffer, pos, DS_CALLS_END)
            if closed is not None and closed > 0:
                if heads:
                    return scanner.forced(buffer, heads, final, end=closed)  # every call is settled
                broken = True
                break
            opened = match_literal(buffer, pos, DS_CALL_BEGIN)
            if closed is None or opened is None:
                break  # undecided
            if opened < 0:
                broken = True
                break
            read = self._call_head(buffer, opened, final)
            if not isinstance(read, tuple):
                broken = read is False
                break
            head, fenced = read
            heads.append(head)
            end, settled = scanner.arguments(buffer, head.start, final)
            after = self._call_end(buffer, end, fenced=fenced) if settled else None
            if after is None or after < 0:
                broken = after is not None
                break
            pos = after
        if not broken and not final:
            return scanner.pending(buffer, heads)
        if not heads:
            return Step(len(marker))  # unreadable: the marker is text
        return scanner.forced(buffer, heads, final, closers=(DS_CALLS_END,), starts=self.starts)

    @staticmethod
    def _call_head(buffer: str, pos: int, final: bool) -> tuple[Head, bool] | bool | None:
        """The call after `<｜tool▁call▁begin｜>` up to its arguments' `{`, and whether it is fenced:
        `name<｜tool▁sep｜>{` or `function<｜tool▁sep｜>name\\n```json\\n{`; None while undecided, False
        if it is neither."""
        sep = buffer.find(DS_SEP, pos)
        if sep < 0:
            return False if final else None
        start = skip_ws(buffer, sep + len(DS_SEP))
        if start == len(buffer):
            return False if final else None
        fenced = buffer[start] != "{"
        if not fenced:
            name = buffer[pos:sep].strip()
        else:
            fence = _DS_FENCE_HEAD.match(buffer, start)
            if fence is None:
                return False if final or buffer.find(DS_CALL_END, start) >= 0 else None
            name, start = fence.group(1), fence.end() - 1
        return (Head(name, start), fenced) if name else False

    @staticmethod
    def _call_end(buffer: str, pos: int, *, fenced: bool) -> int | None:
        """Position after the call's end (the fence's, then `<｜tool▁call▁end｜>`) from the end of its
        arguments; None while undecided; -1 if something else follows."""
        pos = skip_ws(buffer, pos)
        if fenced:
            after = match_literal(buffer, pos, "```")
            if after is None or after < 0:
                return after
            pos = skip_ws(buffer, after)
        return match_literal(buffer, pos, DS_CALL_END)
