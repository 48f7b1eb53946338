"""The scanner for formats whose output is the calls themselves, as JSON: the plain-JSON fallback
(optionally in a ```json fence) and Llama 3 (optionally after `<|python_tag|>`).
"""

from __future__ import annotations

from mistralrs_serve.entrypoints.openai.tool_parsers.json_scan import (
    calls_from_values,
    loads,
    match_literal,
    skip_ws,
)
from mistralrs_serve.entrypoints.openai.tool_parsers.scanner import Scanner, Step, leading_heads


class JsonOutputScanner(Scanner):
    """Calls that are the output itself: JSON objects (or lists), optionally after a tag or in a
    ```json fence, separated by `;` or whitespace. Output that does not start so is all content."""

    def __init__(self, *, tag: str | None, fences: bool) -> None:
        super().__init__()
        self._tag = tag
        self._fences = fences
        self._phase = "start"  # "start", "after" (a call), or "text" (all the rest is content)
        # Arguments that never close end at a tag (the next call) or at a closing fence.
        self.terminators = (tag,) if tag is not None else ("```",) if fences else ()

    def scan(self, buffer: str, final: bool) -> Step | None:
        if self._phase == "text":
            return Step(len(buffer))
        start = skip_ws(buffer, 0)
        if start > 0:
            return Step(start)  # the content filter drops it if a call follows
        if self._phase == "after" and buffer.startswith(";"):
            return self._separator(buffer, final)
        step = self._call(buffer, final)
        if step is None and final and not self.open:
            step = self._text(buffer)
        return step

    def _text(self, buffer: str) -> Step:
        self._phase = "text"
        return Step(len(buffer))

    def _separator(self, buffer: str, final: bool) -> Step | None:
        after = skip_ws(buffer, 1)
        if after == len(buffer):
            return Step(len(buffer), []) if final else None  # a dangling ";" after the calls
        if buffer[after] in "{[":
            return Step(after, [])
        if self._tag is not None:
            after_tag = match_literal(buffer, after, self._tag)
            if after_tag is None and not final:
                return None
            if after_tag is not None and after_tag > 0:
                return Step(after, [])
        return self._text(buffer)

    def _call(self, buffer: str, final: bool) -> Step | None:
        """A call (or calls) at the start of `buffer`; None while undecided."""
        pos, fenced = 0, False
        if self._tag is not None:
            after_tag = match_literal(buffer, 0, self._tag)
            if after_tag is None:
                return None
            if after_tag > 0:
                pos = skip_ws(buffer, after_tag)
        if self._fences and self._phase == "start" and pos == 0:
            opened = self._open_fence(buffer)
            if opened is None:
                return None
            if opened < 0:
                return self._text(buffer)
            pos, fenced = opened, opened > 0
        if pos == len(buffer):
            return None
        if buffer[pos] not in "{[":
            return self._text(buffer)
        end = self.json_end(buffer, pos)
        heads = self.heads(buffer, pos)
        leading = leading_heads(heads)
        if end is None and not final:
            return self.pending(buffer, leading)
        value_end = end if end is not None and end > 0 else None  # None: unclosed or mismatched
        calls = None
        if value_end is not None:
            calls = calls_from_values([loads(buffer[pos:value_end])], require_arguments=True)
        if calls is None and not leading:
            return self._text(buffer)
        block_end = value_end
        if fenced and value_end is not None:
            closed = self._close_fence(buffer, value_end, final)
            if closed is None:
                return self.pending(buffer, leading)
            if closed > 0:
                block_end = closed
            elif not leading:
                return self._text(buffer)  # something else follows in the fence
            else:
                calls = None
        if calls is not None and block_end is not None:
            self._phase = "after"
            return Step(block_end, self.raw_calls(buffer, calls, heads))
        # Calls began streaming: markup up to the end of the value (and its fence), or else see forced.
        starts = (self._tag,) if self._tag is not None else ()
        step = self.forced(buffer, leading, final, starts=starts, end=block_end)
        if step is not None:
            self._phase = "after"
        return step

    @staticmethod
    def _open_fence(buffer: str) -> int | None:
        """Position after an opening ```json line: 0 without a fence, None while undecided, -1 for a
        fence of another language."""
        after = match_literal(buffer, 0, "```")
        if after is None or after < 0:
            return None if after is None else 0
        newline = buffer.find("\n", after)
        language = buffer[after : newline if newline >= 0 else len(buffer)].strip().lower()
        if newline < 0:
            return None if "json".startswith(language) else -1
        return skip_ws(buffer, newline + 1) if language in ("", "json") else -1

    @staticmethod
    def _close_fence(buffer: str, pos: int, final: bool) -> int | None:
        """Position after the closing fence (or the end of a final output without one, or cut off in
        it); None while undecided; -1 if something else follows."""
        pos = skip_ws(buffer, pos)
        if pos == len(buffer):
            return pos if final else None
        after = match_literal(buffer, pos, "```")
        return len(buffer) if after is None and final else after
