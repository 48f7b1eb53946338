"""The base of every format's scanner: it decides what the start of the output buffer is (content,
markup to drop, or calls) and tracks the calls whose arguments have begun streaming.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from mistralrs_serve.entrypoints.openai.tool_parsers.calls import ObjCall, RawCall
from mistralrs_serve.entrypoints.openai.tool_parsers.json_scan import (
    JsonExtent,
    dumped,
    find_first,
    loads,
    partial_suffix,
    skip_ws,
)

# The head of a call object, up to the `{` that opens its arguments (JSON whitespace only).
_CALL_HEAD = re.compile(
    r'\{[ \t\n\r]*"name"[ \t\n\r]*:[ \t\n\r]*("(?:[^"\\]|\\.)*")[ \t\n\r]*,'
    r'[ \t\n\r]*"(?:arguments|parameters)"[ \t\n\r]*:[ \t\n\r]*\{'
)


@dataclass(frozen=True)
class Head:
    """A call whose name is known and whose arguments object opens at `start` (its `{`)."""

    name: str
    start: int


@dataclass(frozen=True)
class OpenCall:
    """A call still being read: its name and its arguments so far, `buffer[start:end]`."""

    name: str
    start: int
    end: int


def leading_heads(heads: Iterable[Head | None]) -> list[Head]:
    """The calls that stream: those before the first call object without a head."""
    leading = []
    for head in heads:
        if head is None:
            break
        leading.append(head)
    return leading


def _block_end(
    buffer: str, pos: int, closers: Sequence[str], starts: Sequence[str], final: bool
) -> int | None:
    """Where a block that began streaming calls but does not read as calls ends, looking from `pos`:
    after its first closing marker, before the next opening marker, or at the end of a final output;
    None while undecided."""
    index, marker = find_first(buffer[pos:], [*closers, *starts])
    if index >= 0:
        return pos + index + (len(marker) if marker in closers else 0)
    return len(buffer) if final else None


class _MarkerSearch:
    """Finds the first of some markers at or after `start`, scanning incrementally."""

    def __init__(self, start: int) -> None:
        self._searched = start
        self._start = start
        self.found: int | None = None

    def find(self, text: str, markers: Sequence[str]) -> int | None:
        if self.found is None and markers:
            begin = max(self._start, self._searched - max(map(len, markers)) + 1)
            hits = [index for marker in markers if (index := text.find(marker, begin)) >= 0]
            self.found = min(hits) if hits else None
            self._searched = len(text)
        return self.found


@dataclass(frozen=True)
class Step:
    """A decision about the start of the buffer: its first `size` characters are content (`calls` is
    None), markup to drop (`calls` is empty), or tool calls."""

    size: int
    calls: list[RawCall] | None = None


class Scanner:
    """Decides, for one output, what the start of the buffer is; formats subclass it.

    While a call block at the start of the buffer is undecided, `open` tells the calls in it whose
    arguments have begun (see `ToolCallStreamer`); the block's decision then has these calls first.
    """

    #: markers that end arguments whose brackets never match (the format's call markers)
    terminators: tuple[str, ...] = ()

    def __init__(self) -> None:
        self._extents: dict[int, JsonExtent] = {}
        self._searches: dict[int, _MarkerSearch] = {}
        self._heads: dict[int, Head] = {}
        self.open: list[OpenCall] = []

    def step(self, buffer: str, final: bool) -> Step | None:
        """A decision, or None to wait for more text (never None when `final`)."""
        decided = self.scan(buffer, final)
        if decided is None and final and self.open:  # a format's oversight: calls that streamed stand
            heads = [Head(call.name, call.start) for call in self.open]
            decided = self.forced(buffer, heads, final, end=len(buffer))
        if decided is None and final:
            decided = Step(len(buffer))
        if decided is not None:  # the buffer shifts: offsets in it are stale
            self._extents.clear()
            self._searches.clear()
            self._heads.clear()
            self.open = []
        return decided

    def scan(self, buffer: str, final: bool) -> Step | None:
        raise NotImplementedError

    def json_end(self, buffer: str, start: int) -> int | None:
        """Where the JSON value starting at `start` ends (see `JsonExtent.scan`), remembering progress."""
        extent = self._extents.get(start)
        if extent is None:
            extent = self._extents[start] = JsonExtent(start)
        return extent.scan(buffer)

    def head(self, buffer: str, pos: int) -> Head | None:
        """The head of the call object at `pos` (`{"name": "...", "arguments": {`), if it has one yet."""
        head = self._heads.get(pos)
        if head is None:
            match = _CALL_HEAD.match(buffer, pos)
            name = loads(match.group(1)) if match else None
            if match and isinstance(name, str) and name.strip():
                head = self._heads[pos] = Head(name.strip(), match.end() - 1)
        return head

    def heads(self, buffer: str, pos: int, *, many: bool = False) -> list[Head | None]:
        """The heads of the call objects in the JSON value at `pos` (an object or a list of them) and,
        with `many`, in the values that follow it after whitespace, as far as they can be read."""
        heads: list[Head | None] = []
        while pos < len(buffer) and buffer[pos] in "{[":
            end = self.json_end(buffer, pos)
            if buffer[pos] == "{":
                heads.append(self.head(buffer, pos))
            else:
                item = skip_ws(buffer, pos + 1)
                while item < len(buffer) and buffer[item] == "{":
                    heads.append(self.head(buffer, item))
                    item_end = self.json_end(buffer, item)
                    if item_end is None or item_end < 0:
                        break
                    item = skip_ws(buffer, item_end)
                    if not buffer.startswith(",", item):
                        break
                    item = skip_ws(buffer, item + 1)
            if not many or end is None or end < 0:
                break
            pos = skip_ws(buffer, end)
        return heads

    def arguments(self, buffer: str, start: int, final: bool) -> tuple[int, bool]:
        """(end, settled) of the arguments object opening at `start`: its matching `}`; when its
        brackets never match, the first of `terminators` or the end of the output. Unsettled, `end`
        is how far the arguments surely reach (what may be streamed)."""
        close = self.json_end(buffer, start)
        if close is not None and close > 0:
            return close, True
        search = self._searches.get(start)
        if search is None:
            search = self._searches[start] = _MarkerSearch(start)
        found = search.find(buffer, self.terminators)
        if found is not None and (close is not None or final):  # close is -1: brackets never match
            return found, True
        if final:
            return len(buffer), True
        if found is not None:  # maybe inside a string: held back until the brackets tell
            return found, False
        return max(start, len(buffer) - partial_suffix(buffer, self.terminators)), False

    def raw_calls(self, buffer: str, calls: list[ObjCall], heads: Sequence[Head | None]) -> list[RawCall]:
        """The calls read from complete JSON values, with the raw arguments of those with a head."""
        raw = []
        for number, (name, arguments) in enumerate(calls):
            head = heads[number] if number < len(heads) else None
            if head is None:
                raw.extend(dumped([(name, arguments)]))
            else:
                raw.append((head.name, buffer[head.start : self.arguments(buffer, head.start, True)[0]]))
        return raw

    def pending(self, buffer: str, heads: Sequence[Head]) -> Step | None:
        """Waits for more text (always None), telling the calls of `heads` as far as they are read."""
        self.open = [
            OpenCall(head.name, head.start, self.arguments(buffer, head.start, False)[0]) for head in heads
        ]
        return None

    def forced(
        self,
        buffer: str,
        heads: Sequence[Head],
        final: bool,
        *,
        closers: Sequence[str] = (),
        starts: Sequence[str] = (),
        end: int | None = None,
    ) -> Step | None:
        """The decision for a block whose calls `heads` began streaming but that does not read as
        calls: those calls, with their raw arguments, and the block dropped up to `end` or else to
        `_block_end`. None while a call's arguments or the block's end are undecided."""
        settled, arguments_end = [], 0
        for head in heads:
            arguments_end, done = self.arguments(buffer, head.start, final)
            if not done:
                return self.pending(buffer, heads)
            settled.append((head.name, buffer[head.start : arguments_end]))
        if end is None:
            end = _block_end(buffer, arguments_end, closers, starts, final)
        return self.pending(buffer, heads) if end is None else Step(end, settled)
