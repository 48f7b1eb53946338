"""Tool calls in model output: parse them, stream them, and constrain them with a grammar.

Each model family writes tool calls in its own format, which its chat template shows (the markers it
renders for an assistant message with `tool_calls`). A `ToolCallFormat` knows one family's format:

- `parse(text)` splits a complete output into content text and calls;
- `streamer()` does the same incrementally, giving OpenAI-style deltas, and never lets tool markup
  (or text that may still become markup) reach a content delta;
- `call_grammar(tools, parallel=...)` gives an llguidance Lark grammar whose language is exactly one
  call (or, with `parallel`, one or more) in that format, with arguments constrained by the schema;
- `auto_grammar(tools, parallel=...)` gives one for a model that may call tools or answer: text that
  does not open call markup, or (where the family writes calls after text) text up to the marker and
  then exactly those calls, or (where the calls are the whole output) exactly those calls.

`detect_format(template_source)` picks the format from the markers a chat template uses.

Markup that does not parse as a call is content, verbatim. Whitespace that only separates content
from calls (or calls from each other) is dropped; content that is only whitespace is no content.
`parse` is the streamer run over the whole text, so both always agree.

A call's `arguments` is the JSON text of its arguments object exactly as the model wrote it, in the
formats that write that object as JSON: a Hermes JSON block, Llama 3 and plain JSON, Mistral (both
styles), Granite and DeepSeek (both styles): whenever a call object starts `{"name": ..., "arguments"
(or "parameters"): {`, and in the styles that write the name before the object (Mistral's
`name[ARGS]{...}`, DeepSeek's) whenever a `{` opens the arguments. Other calls
(arguments before the name, arguments written as a JSON string, Qwen3-Coder's XML parameters) get
`json.dumps` of the arguments and stream as one delta when the call closes.

Streaming. A call whose arguments are raw text streams as OpenAI does: a first delta with its index,
id and name (and `arguments: ""`) as soon as its block's opening markup, its name and the `{` that opens
its arguments have been read; then pieces of argument text as they arrive, whose concatenation is the
call's final `arguments`. Only what may still turn out not to belong to the arguments is held back: a
partial end marker, or an end marker met while the brackets are still open (it may be inside a string).

Once a call's first delta has gone out it is a call, whatever follows (the rule that keeps streamed and
final calls equal without buffering whole calls): its arguments run from that `{` to the matching `}`
— or, when the brackets never match, to the first of the format's markers (or the end of the output) —
and are kept even when they are not valid JSON, as OpenAI's own arguments may not be. If the rest of its
block does not read as calls, the block still ends as calls: the calls that began streaming, and the
block's remaining text dropped up to where the block ends (its closing marker, the end of its JSON value,
the next opening marker, or the end of the output). Until that `{`, nothing is committed: a block that
does not read as calls is content, verbatim.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "FORMATS",
    "ParsedDelta",
    "ToolCall",
    "ToolCallDelta",
    "ToolCallFormat",
    "ToolCallStreamer",
    "detect_format",
    "get_format",
]

# A call read from a JSON value or XML, before it gets an id: (function name, arguments object).
_ObjCall = tuple[str, dict[str, Any]]
# A call as it will be told, before it gets an id: (function name, JSON text of the arguments).
_RawCall = tuple[str, str]

_ID_ALPHABET = string.ascii_letters + string.digits


def _random_alphanumerics(length: int) -> str:
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


# ---------------------------------------------------------------------------------------------
# Text helpers
# ---------------------------------------------------------------------------------------------


def _partial_suffix(text: str, markers: Iterable[str]) -> int:
    """Length of the longest end of `text` that is a proper prefix of one of `markers`."""
    best = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:size]):
                best = size
                break
    return best


def _find_first(text: str, markers: Sequence[str]) -> tuple[int, str]:
    """The earliest occurrence of any marker: (index, marker), or (-1, "")."""
    found = (-1, "")
    for marker in markers:
        index = text.find(marker)
        if index >= 0 and (found[0] < 0 or index < found[0]):
            found = (index, marker)
    return found


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def _match_literal(text: str, pos: int, literal: str) -> int | None:
    """Position after `literal` at `pos`; None while `text` ends in a prefix of it; -1 on mismatch."""
    rest = text[pos : pos + len(literal)]
    if rest == literal:
        return pos + len(literal)
    return None if literal.startswith(rest) else -1


_JSON_STRUCTURE = re.compile(r'[{}\[\]"]')
_JSON_STRING_STOP = re.compile(r'["\\]')


class _JsonExtent:
    """Finds where a JSON object or array that starts at `start` ends, scanning incrementally."""

    def __init__(self, start: int) -> None:
        self.start = start
        self._pos = start
        self._closers: list[str] = []
        self._in_string = False
        self._end: int | None = None

    def scan(self, text: str) -> int | None:
        """End index (exclusive) of the value; None while incomplete; -1 if brackets do not match."""
        if self._end is None:
            self._end = self._advance(text)
        return self._end

    def _advance(self, text: str) -> int | None:
        while True:
            if self._in_string:
                match = _JSON_STRING_STOP.search(text, self._pos)
                if match is None:
                    self._pos = len(text)
                    return None
                if match.group() == "\\":
                    if match.end() >= len(text):
                        self._pos = match.start()
                        return None
                    self._pos = match.end() + 1
                    continue
                self._in_string = False
                self._pos = match.end()
                continue
            match = _JSON_STRUCTURE.search(text, self._pos)
            if match is None:
                self._pos = len(text)
                return None
            char, self._pos = match.group(), match.end()
            if char == '"':
                self._in_string = True
            elif char in "{[":
                self._closers.append("}" if char == "{" else "]")
            elif not self._closers or self._closers.pop() != char:
                return -1
            elif not self._closers:
                return self._pos


def _loads(text: str) -> Any:
    """The JSON value in `text`, or None when it is not JSON (JSON null is never a call either)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _json_values(text: str) -> list[Any] | None:
    """The JSON values in `text`, separated by whitespace; None unless all of it is JSON."""
    decoder = json.JSONDecoder()
    values, pos = [], _skip_ws(text, 0)
    while pos < len(text):
        try:
            value, pos = decoder.raw_decode(text, pos)
        except (ValueError, RecursionError):
            return None
        values.append(value)
        pos = _skip_ws(text, pos)
    return values or None


_CALL_KEYS = frozenset({"name", "arguments", "parameters", "id", "type"})


def _arguments_object(value: Any) -> dict[str, Any] | None:
    if isinstance(value, str):  # some models write the arguments as a JSON string
        value = _loads(value)
    return value if isinstance(value, dict) else None


def _call_from_object(value: Any, *, require_arguments: bool) -> _ObjCall | None:
    """A call from `{"name": ..., "arguments"|"parameters": {...}}`; None for any other value."""
    if not isinstance(value, dict) or not set(value) <= _CALL_KEYS:
        return None
    name = value.get("name")
    if not isinstance(name, str) or not name.strip():
        return None
    keys = [key for key in ("arguments", "parameters") if key in value]
    if len(keys) > 1 or (require_arguments and not keys):
        return None
    arguments = _arguments_object(value[keys[0]]) if keys else {}
    return None if arguments is None else (name.strip(), arguments)


def _calls_from_values(values: Sequence[Any] | None, *, require_arguments: bool) -> list[_ObjCall] | None:
    """Calls from JSON values (objects, or lists of objects); None unless every one is a call."""
    if not values:
        return None
    items: list[Any] = []
    for value in values:
        items.extend(value if isinstance(value, list) else [value])
    calls = [_call_from_object(item, require_arguments=require_arguments) for item in items]
    if not calls or any(call is None for call in calls):
        return None
    return [call for call in calls if call is not None]


def _dumped(calls: Iterable[_ObjCall]) -> list[_RawCall]:
    return [(name, json.dumps(arguments, ensure_ascii=False)) for name, arguments in calls]


# The head of a call object, up to the `{` that opens its arguments (JSON whitespace only).
_CALL_HEAD = re.compile(
    r'\{[ \t\n\r]*"name"[ \t\n\r]*:[ \t\n\r]*("(?:[^"\\]|\\.)*")[ \t\n\r]*,'
    r'[ \t\n\r]*"(?:arguments|parameters)"[ \t\n\r]*:[ \t\n\r]*\{'
)


@dataclass(frozen=True)
class _Head:
    """A call whose name is known and whose arguments object opens at `start` (its `{`)."""

    name: str
    start: int


@dataclass(frozen=True)
class _OpenCall:
    """A call still being read: its name and its arguments so far, `buffer[start:end]`."""

    name: str
    start: int
    end: int


def _leading(heads: Iterable[_Head | None]) -> list[_Head]:
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
    index, marker = _find_first(buffer[pos:], [*closers, *starts])
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


# ---------------------------------------------------------------------------------------------
# Tool schemas
# ---------------------------------------------------------------------------------------------


def _function_specs(tools: Sequence[Mapping[str, Any]] | None) -> list[tuple[str, dict[str, Any]]]:
    """(name, parameters schema) of each OpenAI-shaped tool; a missing schema is {"type": "object"}."""
    specs = []
    for tool in tools or ():
        function = tool.get("function", tool)
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise ValueError(f"not a function tool: {tool!r}")
        parameters = function.get("parameters")
        specs.append((function["name"], dict(parameters) if isinstance(parameters, Mapping) else {}))
    return [(name, schema or {"type": "object"}) for name, schema in specs]


def _schema_types(schema: Any) -> set[str] | None:
    """The JSON types a schema names in `type`, or None when it names none."""
    if not isinstance(schema, Mapping):
        return None
    kind = schema.get("type")
    if isinstance(kind, str):
        return {kind}
    if isinstance(kind, list) and all(isinstance(item, str) for item in kind):
        return set(kind)
    return None


# ---------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Step:
    """A decision about the start of the buffer: its first `size` characters are content (`calls` is
    None), markup to drop (`calls` is empty), or tool calls."""

    size: int
    calls: list[_RawCall] | None = None


class _Scanner:
    """Decides, for one output, what the start of the buffer is; formats subclass it.

    While a call block at the start of the buffer is undecided, `open` tells the calls in it whose
    arguments have begun (see the module docstring); the block's decision then has these calls first.
    """

    #: markers that end arguments whose brackets never match (the format's call markers)
    terminators: tuple[str, ...] = ()

    def __init__(self) -> None:
        self._extents: dict[int, _JsonExtent] = {}
        self._searches: dict[int, _MarkerSearch] = {}
        self._heads: dict[int, _Head] = {}
        self.open: list[_OpenCall] = []

    def step(self, buffer: str, final: bool) -> _Step | None:
        """A decision, or None to wait for more text (never None when `final`)."""
        decided = self.scan(buffer, final)
        if decided is None and final and self.open:  # a format's oversight: calls that streamed stand
            heads = [_Head(call.name, call.start) for call in self.open]
            decided = self.forced(buffer, heads, final, end=len(buffer))
        if decided is None and final:
            decided = _Step(len(buffer))
        if decided is not None:  # the buffer shifts: offsets in it are stale
            self._extents.clear()
            self._searches.clear()
            self._heads.clear()
            self.open = []
        return decided

    def scan(self, buffer: str, final: bool) -> _Step | None:
        raise NotImplementedError

    def json_end(self, buffer: str, start: int) -> int | None:
        """Where the JSON value starting at `start` ends (see `_JsonExtent.scan`), remembering progress."""
        extent = self._extents.get(start)
        if extent is None:
            extent = self._extents[start] = _JsonExtent(start)
        return extent.scan(buffer)

    def head(self, buffer: str, pos: int) -> _Head | None:
        """The head of the call object at `pos` (`{"name": "...", "arguments": {`), if it has one yet."""
        head = self._heads.get(pos)
        if head is None:
            match = _CALL_HEAD.match(buffer, pos)
            name = _loads(match.group(1)) if match else None
            if match and isinstance(name, str) and name.strip():
                head = self._heads[pos] = _Head(name.strip(), match.end() - 1)
        return head

    def heads(self, buffer: str, pos: int, *, many: bool = False) -> list[_Head | None]:
        """The heads of the call objects in the JSON value at `pos` (an object or a list of them) and,
        with `many`, in the values that follow it after whitespace, as far as they can be read."""
        heads: list[_Head | None] = []
        while pos < len(buffer) and buffer[pos] in "{[":
            end = self.json_end(buffer, pos)
            if buffer[pos] == "{":
                heads.append(self.head(buffer, pos))
            else:
                item = _skip_ws(buffer, pos + 1)
                while item < len(buffer) and buffer[item] == "{":
                    heads.append(self.head(buffer, item))
                    item_end = self.json_end(buffer, item)
                    if item_end is None or item_end < 0:
                        break
                    item = _skip_ws(buffer, item_end)
                    if not buffer.startswith(",", item):
                        break
                    item = _skip_ws(buffer, item + 1)
            if not many or end is None or end < 0:
                break
            pos = _skip_ws(buffer, end)
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
        return max(start, len(buffer) - _partial_suffix(buffer, self.terminators)), False

    def raw_calls(self, buffer: str, calls: list[_ObjCall], heads: Sequence[_Head | None]) -> list[_RawCall]:
        """The calls read from complete JSON values, with the raw arguments of those with a head."""
        raw = []
        for number, (name, arguments) in enumerate(calls):
            head = heads[number] if number < len(heads) else None
            if head is None:
                raw.extend(_dumped([(name, arguments)]))
            else:
                raw.append((head.name, buffer[head.start : self.arguments(buffer, head.start, True)[0]]))
        return raw

    def pending(self, buffer: str, heads: Sequence[_Head]) -> _Step | None:
        """Waits for more text (always None), telling the calls of `heads` as far as they are read."""
        self.open = [
            _OpenCall(head.name, head.start, self.arguments(buffer, head.start, False)[0]) for head in heads
        ]
        return None

    def forced(
        self,
        buffer: str,
        heads: Sequence[_Head],
        final: bool,
        *,
        closers: Sequence[str] = (),
        starts: Sequence[str] = (),
        end: int | None = None,
    ) -> _Step | None:
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
        return self.pending(buffer, heads) if end is None else _Step(end, settled)


class _ContentFilter:
    """Content text on its way out: drops whitespace that only separates content from calls.

    Whitespace right before a call, at the end of an output that has calls, at the start of content
    that follows a call, and in an output that is only whitespace is dropped. Trailing whitespace is
    therefore held back until it is known which case applies.
    """

    def __init__(self) -> None:
        self._pending = ""
        self._emitted = False
        self._calls_seen = False

    def text(self, text: str) -> str:
        text = self._pending + text
        body = text.rstrip()
        self._pending = text[len(body) :]
        if not body:
            return ""
        if not self._emitted and self._calls_seen:
            body = body.lstrip()
        self._emitted = True
        return body

    def call(self) -> None:
        self._pending = ""
        self._calls_seen = True

    def finish(self) -> str:
        pending, self._pending = self._pending, ""
        return pending if self._emitted and not self._calls_seen else ""


class ToolCallStreamer:
    """Splits model output into content and tool-call deltas as it arrives (see the module docstring
    for when a call's first delta and its argument pieces go out)."""

    def __init__(self, fmt: ToolCallFormat, scanner: _Scanner) -> None:
        self._format = fmt
        self._scanner = scanner
        self._buffer = ""
        self._filter = _ContentFilter()
        self._calls: list[ToolCall] = []
        # (id, argument characters streamed) of each call of the undecided block that began streaming
        self._streaming: list[tuple[str, int]] = []
        self._finished = False

    @property
    def calls(self) -> list[ToolCall]:
        """The complete calls so far, with the ids their deltas carried."""
        return list(self._calls)

    def feed(self, delta: str) -> ParsedDelta:
        """Takes the next piece of model output; returns what can be told of it already."""
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._buffer += delta
        return self._drain(final=False)

    def finish(self) -> ParsedDelta:
        """The end of the output: decides whatever was held back."""
        if self._finished:
            return ParsedDelta()
        self._finished = True
        out = self._drain(final=True)
        out.content += self._filter.finish()
        return out

    def _drain(self, *, final: bool) -> ParsedDelta:
        out = ParsedDelta()
        pieces = []
        while self._buffer:
            step = self._scanner.step(self._buffer, final)
            if step is None:
                self._stream_open(out.tool_calls)
                break
            size = max(step.size, 1)  # a scanner bug must not loop forever
            text, self._buffer = self._buffer[:size], self._buffer[size:]
            if step.calls is None:
                pieces.append(self._filter.text(text))
            elif step.calls:
                self._filter.call()
                for number, (name, arguments) in enumerate(step.calls):
                    self._close_call(out.tool_calls, number, name, arguments)
            self._streaming = []
        out.content = "".join(pieces)
        return out

    def _stream_open(self, deltas: list[ToolCallDelta]) -> None:
        """Deltas for the calls of the undecided block: first deltas, then new argument text."""
        for number, call in enumerate(self._scanner.open):
            index = len(self._calls) + number
            if number == len(self._streaming):
                self._filter.call()
                self._streaming.append((self._format.new_call_id(), 0))
                deltas.append(ToolCallDelta(index, self._streaming[number][0], call.name))
            call_id, streamed = self._streaming[number]
            if call.end > call.start + streamed:
                _add_arguments(deltas, index, self._buffer[call.start + streamed : call.end])
                self._streaming[number] = (call_id, call.end - call.start)

    def _close_call(self, deltas: list[ToolCallDelta], number: int, name: str, arguments: str) -> None:
        index = len(self._calls)
        if number < len(self._streaming):  # began streaming: the rest of its arguments
            call_id, streamed = self._streaming[number]
            if arguments[streamed:]:
                _add_arguments(deltas, index, arguments[streamed:])
        else:
            call_id = self._format.new_call_id()
            deltas.append(ToolCallDelta(index, call_id, name, arguments))
        self._calls.append(ToolCall(call_id, name, arguments))


def _add_arguments(deltas: list[ToolCallDelta], index: int, text: str) -> None:
    """Argument text for call `index`, joined to the last delta when that is the same call's."""
    if deltas and deltas[-1].index == index:
        deltas[-1].arguments += text
    else:
        deltas.append(ToolCallDelta(index, arguments=text))


# ---------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------

# Whitespace in constrained arguments: the separators json.dumps (and templates' tojson) write.
_JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


_DS_CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
_DS_CALLS_END = "<｜tool▁calls▁end｜>"
_DS_CALL_BEGIN = "<｜tool▁call▁begin｜>"
_DS_CALL_END = "<｜tool▁call▁end｜>"
_DS_SEP = "<｜tool▁sep｜>"

# Markers that vocabularies hold as one token. A grammar writes each as a literal of its own, so that
# the server can put the token in its place where it is special (a special token never matches text).
TOKEN_MARKERS = (
    "<tool_call>",
    "</tool_call>",
    "[TOOL_CALLS]",
    "[ARGS]",
    "[CALL_ID]",
    "<|python_tag|>",
    "<|tool_call|>",
    _DS_CALLS_BEGIN,
    _DS_CALLS_END,
    _DS_CALL_BEGIN,
    _DS_CALL_END,
    _DS_SEP,
)
_TOKEN_MARKER_SPLIT = re.compile("(" + "|".join(map(re.escape, TOKEN_MARKERS)) + ")")


def _lark_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _lark_text(text: str) -> str:
    """`text` as Lark literals, one after another, each of `TOKEN_MARKERS` in it a literal of its own."""
    return " ".join(_lark_string(piece) for piece in _TOKEN_MARKER_SPLIT.split(text) if piece)


_REGEX_META = frozenset("\\.+*?()|[]{}^$#&-~/")


def _regex_literal(text: str) -> str:
    """`text` as a literal inside a Lark `/regex/`."""
    return "".join(
        "\\" + char if char in _REGEX_META else char if char.isprintable() else f"\\x{{{ord(char):x}}}"
        for char in text
    )


def _regex_class(chars: Iterable[str]) -> str:
    """A regex class of `chars`, written in ranges of `\\x{...}` escapes."""
    codes = sorted(set(map(ord, chars)))
    ranges: list[list[int]] = []
    for code in codes:
        if ranges and ranges[-1][1] == code - 1:
            ranges[-1][1] = code
        else:
            ranges.append([code, code])
    parts = (f"\\x{{{a:x}}}" + (f"-\\x{{{b:x}}}" if b > a else "") for a, b in ranges)
    return "[" + "".join(parts) + "]"


# What `str.isspace` calls whitespace (the parsers skip it before a call), with and without "\n".
_SPACES = [char for char in map(chr, range(0x3001)) if char.isspace()]
_SPACE_CLASS = _regex_class(_SPACES)
_LINE_SPACE_CLASS = _regex_class(char for char in _SPACES if char != "\n")
# Any text, in a regex.
_ANY = "(?s:.*)"


def _json_rule(schema: Mapping[str, Any]) -> str:
    return "%json " + json.dumps({**schema, "x-guidance": _JSON_LAYOUT}, ensure_ascii=False)


class ToolCallFormat:
    """One family's tool-call format; stateless, so one instance serves every request.

    The base class is the plain-JSON fallback ("json"): the whole output is a call object
    `{"name": ..., "arguments": {...}}` or a list of them, possibly in a ```json fence.
    """

    name = "json"
    #: keyword that holds the arguments in the JSON this format's grammar writes
    arguments_key = "arguments"

    def parse(
        self, text: str, *, tools: Sequence[Mapping[str, Any]] | None = None
    ) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a complete output; content is None when empty or only whitespace."""
        streamer = self.streamer(tools=tools)
        content = streamer.feed(text).content + streamer.finish().content
        return (content if content.strip() else None), streamer.calls

    def streamer(self, *, tools: Sequence[Mapping[str, Any]] | None = None) -> ToolCallStreamer:
        """A streamer for one output. `tools` (the request's) lets formats that write arguments
        as text (Qwen3-Coder) type them by schema; the others ignore it."""
        return ToolCallStreamer(self, self._scanner(tools))

    def new_call_id(self) -> str:
        return "call_" + _random_alphanumerics(24)

    def call_grammar(self, tools: Sequence[Mapping[str, Any]], *, parallel: bool) -> str:
        """An llguidance Lark grammar for exactly one call (or one or more, with `parallel`) to one of
        `tools`, arguments constrained by the tool's `parameters` schema. Markers are plain strings,
        each a literal of its own (see `TOKEN_MARKERS`)."""
        calls, rules = self._calls_grammar(tools, parallel=parallel)
        return self._complete_grammar(["start: " + calls, *rules])

    def auto_grammar(self, tools: Sequence[Mapping[str, Any]], *, parallel: bool) -> str:
        """An llguidance Lark grammar for what the model may write when it may call `tools`: text
        that does not open like a call (here, after whitespace, `{`, `[` or a ```json fence that
        opens JSON), or the calls exactly as `call_grammar` has them."""
        calls, rules = self._calls_grammar(tools, parallel=parallel)
        return self._complete_grammar(
            [
                "start: TEXT | calls",
                f"TEXT: /{_ANY}/ & ~/{self._call_opening()}{_ANY}/",
                "calls: " + calls,
                *rules,
            ]
        )

    # --- for subclasses ---

    def _scanner(self, tools: Sequence[Mapping[str, Any]] | None) -> _Scanner:
        return _JsonOutputScanner(tag=None, fences=True)

    def _grammar_frame(self, parallel: bool) -> tuple[str, str, str]:
        """The text before the calls, between two calls, and after them, in the grammar."""
        return ("[", ", ", "]") if parallel else ("", "", "")

    def _call_text(self, name: str) -> tuple[str, str]:
        """The text before and after the arguments JSON of a call to `name`, in the grammar."""
        return '{"name": ' + json.dumps(name, ensure_ascii=False) + f', "{self.arguments_key}": ', "}"

    def _call_parts(self, index: int, name: str, schema: Mapping[str, Any]) -> tuple[str, str, list[str]]:
        """A call to `name`, the `index`th tool, in the grammar: the text that opens it, the rest
        of its expansion, and the rules that expansion needs (their names end in `_{index}...`)."""
        before, after = self._call_text(name)
        rest = f"args_{index} {_lark_text(after)}" if after else f"args_{index}"
        return before, rest, [f"args_{index}: {_json_rule(schema)}"]

    def _call_opening(self) -> str:
        """A regex for the start of an output that is calls (text must not start so)."""
        space, line_space = _SPACE_CLASS + "*", _LINE_SPACE_CLASS + "*"
        fence = f"```{line_space}([jJ][sS][oO][nN])?{line_space}\\n{space}"
        return f"{space}({fence})?[\\[{{]"

    def _complete_grammar(self, lines: list[str]) -> str:
        """The grammar of `lines`, with any rules they need besides those of `_calls_grammar`."""
        return "\n".join(lines) + "\n"

    # --- grammar helpers ---

    def _calls_grammar(
        self, tools: Sequence[Mapping[str, Any]], *, parallel: bool, opened: str = ""
    ) -> tuple[str, list[str]]:
        """(expansion, rules) for exactly the calls of `call_grammar`; with `opened`, the calls less
        that text at their start (a marker the output already has)."""
        specs = _function_specs(tools)
        if not specs:
            raise ValueError("a tool-call grammar needs at least one tool")
        prefix, separator, suffix = self._grammar_frame(parallel)
        rules = ["call: " + " | ".join(f"call_{index}" for index in range(len(specs)))]
        parts = [self._call_parts(index, name, schema) for index, (name, schema) in enumerate(specs)]
        for index, (head, rest, needed) in enumerate(parts):
            rules.append(f"call_{index}: {_lark_text(head)} {rest}")
            rules.extend(needed)
        first = "call"
        if opened and prefix.startswith(opened):  # the marker opens the calls
            prefix = prefix[len(opened) :]
        elif opened:  # the marker opens each call: the first one without it
            if not all(head.startswith(opened) for head, _, _ in parts):
                raise ValueError(f"{self.name}: the calls do not open with {opened!r}")
            first = "first_call"
            rules.append("first_call: " + " | ".join(f"first_call_{index}" for index in range(len(specs))))
            for index, (head, rest, _) in enumerate(parts):
                rules.append(f"first_call_{index}: {_lark_text(head[len(opened) :])} {rest}".rstrip())
        calls = first
        if parallel:
            calls = f"{first} ({_lark_text(separator)} call)*" if separator else f"{first} call*"
        body = " ".join(part for part in (_lark_text(prefix), calls, _lark_text(suffix)) if part)
        if parallel and self.name == "json":
            body = f"call | {body}"  # one call may stay a bare object, as the fallback prompt asks
        return body, rules

    def __repr__(self) -> str:
        return f"<ToolCallFormat {self.name}>"


# --- The JSON-output formats: plain JSON and Llama 3 ---


class _JsonOutputScanner(_Scanner):
    """Calls that are the output itself: JSON objects (or lists), optionally after a tag or in a
    ```json fence, separated by `;` or whitespace. Output that does not start so is all content."""

    def __init__(self, *, tag: str | None, fences: bool) -> None:
        super().__init__()
        self._tag = tag
        self._fences = fences
        self._phase = "start"  # "start", "after" (a call), or "text" (all the rest is content)
        # Arguments that never close end at a tag (the next call) or at a closing fence.
        self.terminators = (tag,) if tag is not None else ("```",) if fences else ()

    def scan(self, buffer: str, final: bool) -> _Step | None:
        if self._phase == "text":
            return _Step(len(buffer))
        start = _skip_ws(buffer, 0)
        if start > 0:
            return _Step(start)  # the content filter drops it if a call follows
        if self._phase == "after" and buffer.startswith(";"):
            return self._separator(buffer, final)
        step = self._call(buffer, final)
        if step is None and final and not self.open:
            step = self._text(buffer)
        return step

    def _text(self, buffer: str) -> _Step:
        self._phase = "text"
        return _Step(len(buffer))

    def _separator(self, buffer: str, final: bool) -> _Step | None:
        after = _skip_ws(buffer, 1)
        if after == len(buffer):
            return _Step(len(buffer), []) if final else None  # a dangling ";" after the calls
        if buffer[after] in "{[":
            return _Step(after, [])
        if self._tag is not None:
            after_tag = _match_literal(buffer, after, self._tag)
            if after_tag is None and not final:
                return None
            if after_tag is not None and after_tag > 0:
                return _Step(after, [])
        return self._text(buffer)

    def _call(self, buffer: str, final: bool) -> _Step | None:
        """A call (or calls) at the start of `buffer`; None while undecided."""
        pos, fenced = 0, False
        if self._tag is not None:
            after_tag = _match_literal(buffer, 0, self._tag)
            if after_tag is None:
                return None
            if after_tag > 0:
                pos = _skip_ws(buffer, after_tag)
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
        leading = _leading(heads)
        if end is None and not final:
            return self.pending(buffer, leading)
        value_end = end if end is not None and end > 0 else None  # None: unclosed or mismatched
        calls = None
        if value_end is not None:
            calls = _calls_from_values([_loads(buffer[pos:value_end])], require_arguments=True)
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
            return _Step(block_end, self.raw_calls(buffer, calls, heads))
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
        after = _match_literal(buffer, 0, "```")
        if after is None or after < 0:
            return None if after is None else 0
        newline = buffer.find("\n", after)
        language = buffer[after : newline if newline >= 0 else len(buffer)].strip().lower()
        if newline < 0:
            return None if "json".startswith(language) else -1
        return _skip_ws(buffer, newline + 1) if language in ("", "json") else -1

    @staticmethod
    def _close_fence(buffer: str, pos: int, final: bool) -> int | None:
        """Position after the closing fence (or the end of a final output without one, or cut off in
        it); None while undecided; -1 if something else follows."""
        pos = _skip_ws(buffer, pos)
        if pos == len(buffer):
            return pos if final else None
        after = _match_literal(buffer, pos, "```")
        return len(buffer) if after is None and final else after


class _Llama3JsonFormat(ToolCallFormat):
    """Llama 3.1 / 3.2: the output is `{"name": ..., "parameters": {...}}` (calls joined by `;`),
    optionally after `<|python_tag|>`."""

    name = "llama3_json"
    arguments_key = "parameters"

    def _scanner(self, tools: Sequence[Mapping[str, Any]] | None) -> _Scanner:
        return _JsonOutputScanner(tag="<|python_tag|>", fences=False)

    def _grammar_frame(self, parallel: bool) -> tuple[str, str, str]:
        return "", "; ", ""

    def _call_opening(self) -> str:
        return f"{_SPACE_CLASS}*(<\\|python_tag\\|>|[\\[{{])"


# --- Formats with markers around the calls ---


class _MarkedScanner(_Scanner):
    """Content with call blocks that begin with one of `starts`; `fmt.block` reads a block."""

    def __init__(self, fmt: _MarkedFormat, tools: Sequence[Mapping[str, Any]] | None) -> None:
        super().__init__()
        self._format = fmt
        self.tools = tools
        self.terminators = fmt.terminators

    def scan(self, buffer: str, final: bool) -> _Step | None:
        index, marker = _find_first(buffer, self._format.starts)
        if index > 0:
            return _Step(index)
        if index < 0:
            keep = 0 if final else _partial_suffix(buffer, self._format.starts)
            return _Step(len(buffer) - keep) if keep < len(buffer) else None
        decided = self._format.block(self, buffer, marker, final)
        if decided is None and final and not self.open:
            decided = _Step(len(marker))  # never closed and unreadable: the marker is text
        return decided


class _MarkedFormat(ToolCallFormat):
    starts: tuple[str, ...] = ()
    #: markers that end arguments whose brackets never match (see `_Scanner.arguments`)
    terminators: tuple[str, ...] = ()

    def _scanner(self, tools: Sequence[Mapping[str, Any]] | None) -> _Scanner:
        return _MarkedScanner(self, tools)

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
        literal = _regex_literal(marker)
        return self._complete_grammar(
            [
                f"start: TEXT | text_to_marker opened_calls | TEXT? {_lark_string(marker)} opened_calls",
                f"TEXT: /{_ANY}/ & ~/{_ANY}{literal}{_ANY}/",
                f"text_to_marker[suffix=/{literal}/]: /{_ANY}/",
                "opened_calls: " + calls,
                *rules,
            ]
        )

    def block(self, scanner: _MarkedScanner, buffer: str, marker: str, final: bool) -> _Step | None:
        """The call block at the start of `buffer` (which starts with `marker`); None while undecided.

        An unreadable block gives `_Step(len(marker))`: the marker becomes text, and the rest is
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


# Qwen3-Coder / Qwen3.5: <function=name><parameter=key>value</parameter>...</function>
_XML_FUNCTION = re.compile(r"\s*<function=([^>\n]+)>(.*)</function>\s*", re.S)
_XML_PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)</parameter>", re.S)


def _xml_value(raw: str, schema: Any) -> Any:
    """A parameter's value from its text: strings as written, other types as JSON where they parse."""
    if raw.startswith("\n"):
        raw = raw[1:]
    if raw.endswith("\n"):
        raw = raw[:-1]
    types = _schema_types(schema)
    if types is not None and "string" in types:
        return raw
    value = _loads(raw)
    if value is None and raw.strip() != "null":
        return raw
    if types is None and isinstance(value, str):
        return raw  # without a schema, text stays as the model wrote it
    return value


def _xml_call(inner: str, schemas: Mapping[str, Mapping[str, Any]]) -> _ObjCall | None:
    match = _XML_FUNCTION.fullmatch(inner)
    if match is None:
        return None
    name, body = match.group(1).strip(), match.group(2)
    properties = schemas.get(name, {}).get("properties")
    properties = properties if isinstance(properties, Mapping) else {}
    arguments: dict[str, Any] = {}
    pos = 0
    for parameter in _XML_PARAMETER.finditer(body):
        if body[pos : parameter.start()].strip():
            return None
        key = parameter.group(1).strip()
        arguments[key] = _xml_value(parameter.group(2), properties.get(key))
        pos = parameter.end()
    if body[pos:].strip() or not name:
        return None
    return name, arguments


_UNREAD = _Step(-1)  # a reading that leaves the block to another one


class _HermesFormat(_MarkedFormat):
    """Hermes / Qwen2.5 / Qwen3 / QwQ: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`.

    Blocks in Qwen3-Coder's XML form are read too (and JSON blocks by the Qwen3-Coder format).
    """

    name = "hermes"
    starts = ("<tool_call>",)
    terminators = ("</tool_call>", "<tool_call>")

    def block(self, scanner: _MarkedScanner, buffer: str, marker: str, final: bool) -> _Step | None:
        start = _skip_ws(buffer, len(marker))
        if start < len(buffer) and buffer[start] in "{[":
            decided = self._json_block(scanner, buffer, start, final)
            if decided is not _UNREAD:
                return decided
        found = self.closed_block(buffer, marker, "</tool_call>", final)
        if found is None:
            return None
        inner, end = found
        if inner.lstrip().startswith("<function="):
            call = _xml_call(inner, _schemas_by_name(scanner.tools))
            calls = None if call is None else [call]
        else:
            calls = _calls_from_values(_json_values(inner), require_arguments=False)
        return _Step(end, _dumped(calls)) if calls else _Step(len(marker))

    @staticmethod
    def _json_block(scanner: _MarkedScanner, buffer: str, start: int, final: bool) -> _Step | None:
        """JSON values (separated by whitespace) and `</tool_call>`; `_UNREAD` when they are no calls
        and none began streaming (then the block is read as text up to `</tool_call>`)."""
        # Read the JSON first, so that "</tool_call>" inside one of its strings is no end.
        heads = scanner.heads(buffer, start, many=True)
        spans, pos = [], start
        while True:
            end = scanner.json_end(buffer, pos)
            if end is None or end < 0:
                break
            spans.append((pos, end))
            pos = _skip_ws(buffer, end)
            if pos == len(buffer) or buffer[pos] not in "{[":
                break
        if (end is None or pos == len(buffer)) and not final:  # more JSON may follow
            return scanner.pending(buffer, _leading(heads))
        if end is not None and end > 0:
            calls = _calls_from_values([_loads(buffer[a:b]) for a, b in spans], require_arguments=False)
            close = _match_literal(buffer, pos, "</tool_call>")
            if calls and close is None and not final:
                return scanner.pending(buffer, _leading(heads))
            if calls and (close is None or close > 0):  # unterminated at the end of the output: a call
                return _Step(close or len(buffer), scanner.raw_calls(buffer, calls, heads))
        leading = _leading(heads)
        if not leading:
            return _UNREAD
        return scanner.forced(buffer, leading, final, closers=("</tool_call>",), starts=("<tool_call>",))

    def _grammar_frame(self, parallel: bool) -> tuple[str, str, str]:
        return "", "\n", ""

    def _call_text(self, name: str) -> tuple[str, str]:
        before, after = super()._call_text(name)
        return "<tool_call>\n" + before, after + "\n</tool_call>"


def _schemas_by_name(tools: Sequence[Mapping[str, Any]] | None) -> dict[str, dict[str, Any]]:
    try:
        return dict(_function_specs(tools))
    except ValueError:
        return {}


# A string parameter's text and its closing tag: the text runs to the first "\n</parameter>\n" (the
# rule is lazy) and holds no "</parameter>" or "</tool_call>", which would end it early when parsed.
_XML_TEXT_RULES = (
    "xml_text[lazy]: XML_TEXT\n"
    "XML_TEXT: /(?s:.*)\\n<\\/parameter>\\n/"
    " & ~/(?s:.*)(<\\/tool_call>|<\\/parameter>(?s:.*)<\\/parameter>)(?s:.*)/\n"
)


class _Qwen3CoderFormat(_HermesFormat):
    """Qwen3-Coder / Qwen3.5: `<tool_call>\\n<function=name>\\n<parameter=key>\\nvalue\\n</parameter>\\n
    </function>\\n</tool_call>`; a string value is its text, other values are JSON."""

    name = "qwen3_coder"

    def _complete_grammar(self, lines: list[str]) -> str:
        grammar = super()._complete_grammar(lines)
        return grammar + _XML_TEXT_RULES if " xml_text" in grammar else grammar

    def _call_parts(self, index: int, name: str, schema: Mapping[str, Any]) -> tuple[str, str, list[str]]:
        head = f"<tool_call>\n<function={name}>\n"
        tail = _lark_text("</function>\n</tool_call>")
        properties = schema.get("properties")
        if not isinstance(properties, Mapping) or not properties:
            free = '"<parameter=" /[A-Za-z_][A-Za-z0-9_.-]*/ ">\\n" xml_text'
            return head, f"({free})* {tail}", []
        required = set(schema.get("required") or ())
        rules, parts = [], []
        for position, (key, prop) in enumerate(properties.items()):
            rule = f"param_{index}_{position}"
            parts.append(rule if key in required else f"{rule}?")
            rules.extend(self._parameter_rules(rule, key, prop, schema))
        return head, f"{' '.join(parts)} {tail}", rules

    @staticmethod
    def _parameter_rules(rule: str, key: str, prop: Any, schema: Mapping[str, Any]) -> list[str]:
        opening = _lark_string(f"<parameter={key}>\n")
        closing = _lark_string("\n</parameter>\n")
        types = _schema_types(prop)
        enum = prop.get("enum") if isinstance(prop, Mapping) else None
        textual = types is None or "string" in types  # parsed back as the text, unless it is JSON
        if textual and isinstance(enum, list) and enum and all(isinstance(item, str) for item in enum):
            choices = " | ".join(_lark_string(item) for item in enum)
            return [f"{rule}: {opening} ({choices}) {closing}"]
        if textual:
            return [f"{rule}: {opening} xml_text"]
        value_schema = dict(prop) if isinstance(prop, Mapping) else {}
        for definitions in ("$defs", "definitions"):  # keep $ref targets reachable
            if definitions in schema:
                value_schema.setdefault(definitions, schema[definitions])
        return [f"{rule}: {opening} {rule}_value {closing}", f"{rule}_value: {_json_rule(value_schema)}"]


class _MarkerJsonFormat(_MarkedFormat):
    """A marker followed by a JSON list of call objects (Mistral Nemo `[TOOL_CALLS][...]`, Granite
    `<|tool_call|>[...]`); also reads Mistral's newer `[TOOL_CALLS]name[ARGS]{...}`."""

    def __init__(self, name: str, marker: str) -> None:
        self.name = name
        self.starts = (marker,)
        self.terminators = (marker,)

    def _grammar_frame(self, parallel: bool) -> tuple[str, str, str]:
        return self.starts[0] + "[", ", ", "]"

    def block(self, scanner: _MarkedScanner, buffer: str, marker: str, final: bool) -> _Step | None:
        pos = _skip_ws(buffer, len(marker))
        if pos == len(buffer):
            return None
        if buffer[pos] not in "{[":
            return _named_call(scanner, buffer, marker, pos, final)
        end = scanner.json_end(buffer, pos)
        heads = scanner.heads(buffer, pos)
        if end is None and not final:
            return scanner.pending(buffer, _leading(heads))
        if end is not None and end > 0:
            calls = _calls_from_values([_loads(buffer[pos:end])], require_arguments=False)
            if calls:
                return _Step(end, scanner.raw_calls(buffer, calls, heads))
        leading = _leading(heads)
        if not leading:
            return _Step(len(marker))
        value_end = end if end is not None and end > 0 else None
        return scanner.forced(buffer, leading, final, starts=self.starts, end=value_end)


_MISTRAL_NAME = re.compile(r"[A-Za-z0-9_.:-]+")
_MISTRAL_CALL_ID = re.compile(r"[A-Za-z0-9]*")


def _named_call(scanner: _Scanner, buffer: str, marker: str, pos: int, final: bool) -> _Step | None:
    """`name[ARGS]{...}` (or `name[CALL_ID]id[ARGS]{...}`) after the marker."""
    name = _MISTRAL_NAME.match(buffer, pos)
    if name is None:
        return _Step(len(marker))
    pos = name.end()
    if pos == len(buffer):
        return None
    after_id = _match_literal(buffer, pos, "[CALL_ID]")
    if after_id is not None and after_id > 0:
        pos = _MISTRAL_CALL_ID.match(buffer, after_id).end()  # type: ignore[union-attr]
        if pos == len(buffer):
            return None
    after_args = _match_literal(buffer, pos, "[ARGS]")
    if after_args is None or (after_id is None and after_args < 0):
        return None
    if after_args < 0:
        return _Step(len(marker))
    start = _skip_ws(buffer, after_args)
    if start == len(buffer):
        return None
    if buffer[start] != "{":
        return _Step(len(marker))
    # The name and the arguments' "{" are read: a call, whatever its arguments turn out to be.
    end, settled = scanner.arguments(buffer, start, final)
    if not settled:
        return scanner.pending(buffer, [_Head(name.group(), start)])
    return _Step(end, [(name.group(), buffer[start:end])])


class _MistralFormat(_MarkerJsonFormat):
    """Mistral Small 3.2 and later: `[TOOL_CALLS]name[ARGS]{...}` for each call; tool-call ids
    are 9 alphanumerics, as Mistral's templates demand of the ids a client sends back."""

    def __init__(self, name: str, *, named: bool) -> None:
        super().__init__(name, "[TOOL_CALLS]")
        self._named = named

    def new_call_id(self) -> str:
        return _random_alphanumerics(9)

    def _grammar_frame(self, parallel: bool) -> tuple[str, str, str]:
        return ("", "", "") if self._named else super()._grammar_frame(parallel)

    def _call_text(self, name: str) -> tuple[str, str]:
        return (f"[TOOL_CALLS]{name}[ARGS]", "") if self._named else super()._call_text(name)


# R1 / V3 after the separator: "name\n```json\n" up to the arguments' "{" (a name holds no "｜", so
# no marker).
_DS_FENCE_HEAD = re.compile(r"([^\n`｜]+?)\s*\n```(?:json)?\s*\n\s*\{")


class _DeepSeekFormat(_MarkedFormat):
    """DeepSeek: `<｜tool▁calls▁begin｜>` calls `<｜tool▁calls▁end｜>`, each call
    `<｜tool▁call▁begin｜>name<｜tool▁sep｜>{...}<｜tool▁call▁end｜>` (V3.1) or, in the R1 / V3 style,
    `<｜tool▁call▁begin｜>function<｜tool▁sep｜>name\\n```json\\n{...}\\n```<｜tool▁call▁end｜>`.
    Both are read; `fenced` picks the one the grammar writes."""

    starts = (_DS_CALLS_BEGIN,)
    terminators = (_DS_CALL_END, _DS_CALLS_END, _DS_CALL_BEGIN, "```")

    def __init__(self, name: str, *, fenced: bool) -> None:
        self.name = name
        self._fenced = fenced

    def _grammar_frame(self, parallel: bool) -> tuple[str, str, str]:
        return _DS_CALLS_BEGIN, "\n" if self._fenced else "", _DS_CALLS_END

    def _call_text(self, name: str) -> tuple[str, str]:
        if self._fenced:
            return f"{_DS_CALL_BEGIN}function{_DS_SEP}{name}\n```json\n", f"\n```{_DS_CALL_END}"
        return f"{_DS_CALL_BEGIN}{name}{_DS_SEP}", _DS_CALL_END

    def block(self, scanner: _MarkedScanner, buffer: str, marker: str, final: bool) -> _Step | None:
        heads: list[_Head] = []
        pos, broken = len(marker), False
        while True:
            pos = _skip_ws(buffer, pos)
            closed = _match_literal(buffer, pos, _DS_CALLS_END)
            if closed is not None and closed > 0:
                if heads:
                    return scanner.forced(buffer, heads, final, end=closed)  # every call is settled
                broken = True
                break
            opened = _match_literal(buffer, pos, _DS_CALL_BEGIN)
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
            return _Step(len(marker))  # unreadable: the marker is text
        return scanner.forced(buffer, heads, final, closers=(_DS_CALLS_END,), starts=self.starts)

    @staticmethod
    def _call_head(buffer: str, pos: int, final: bool) -> tuple[_Head, bool] | bool | None:
        """The call after `<｜tool▁call▁begin｜>` up to its arguments' `{`, and whether it is fenced:
        `name<｜tool▁sep｜>{` or `function<｜tool▁sep｜>name\\n```json\\n{`; None while undecided, False
        if it is neither."""
        sep = buffer.find(_DS_SEP, pos)
        if sep < 0:
            return False if final else None
        start = _skip_ws(buffer, sep + len(_DS_SEP))
        if start == len(buffer):
            return False if final else None
        fenced = buffer[start] != "{"
        if not fenced:
            name = buffer[pos:sep].strip()
        else:
            fence = _DS_FENCE_HEAD.match(buffer, start)
            if fence is None:
                return False if final or buffer.find(_DS_CALL_END, start) >= 0 else None
            name, start = fence.group(1), fence.end() - 1
        return (_Head(name, start), fenced) if name else False

    @staticmethod
    def _call_end(buffer: str, pos: int, *, fenced: bool) -> int | None:
        """Position after the call's end (the fence's, then `<｜tool▁call▁end｜>`) from the end of its
        arguments; None while undecided; -1 if something else follows."""
        pos = _skip_ws(buffer, pos)
        if fenced:
            after = _match_literal(buffer, pos, "```")
            if after is None or after < 0:
                return after
            pos = _skip_ws(buffer, after)
        return _match_literal(buffer, pos, _DS_CALL_END)


# ---------------------------------------------------------------------------------------------
# Choosing a format
# ---------------------------------------------------------------------------------------------

JSON = ToolCallFormat()
HERMES = _HermesFormat()
QWEN3_CODER = _Qwen3CoderFormat()
LLAMA3_JSON = _Llama3JsonFormat()
MISTRAL = _MistralFormat("mistral", named=False)
MISTRAL_V11 = _MistralFormat("mistral_v11", named=True)
GRANITE = _MarkerJsonFormat("granite", "<|tool_call|>")
DEEPSEEK = _DeepSeekFormat("deepseek", fenced=False)
DEEPSEEK_R1 = _DeepSeekFormat("deepseek_r1", fenced=True)

FORMATS: dict[str, ToolCallFormat] = {
    fmt.name: fmt
    for fmt in (JSON, HERMES, QWEN3_CODER, LLAMA3_JSON, MISTRAL, MISTRAL_V11, GRANITE, DEEPSEEK, DEEPSEEK_R1)
}


def get_format(name: str) -> ToolCallFormat:
    """The format with this name (see FORMATS)."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown tool-call format {name!r}; known: {sorted(FORMATS)}") from None


def detect_format(template_source: str | None) -> ToolCallFormat:
    """The tool-call format a chat template teaches, judged by the markers in its source."""
    source = template_source or ""
    if "<tool_call>" in source:
        return QWEN3_CODER if "<function=" in source else HERMES
    if _DS_CALLS_BEGIN in source:
        return DEEPSEEK_R1 if "```json" in source else DEEPSEEK
    if "[TOOL_CALLS]" in source:
        return MISTRAL_V11 if "[ARGS]" in source else MISTRAL
    if "<|tool_call|>" in source:
        return GRANITE
    if "<|python_tag|>" in source or '"parameters"' in source:
        return LLAMA3_JSON
    return JSON
