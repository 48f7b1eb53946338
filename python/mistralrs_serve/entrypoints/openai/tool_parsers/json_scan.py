"""Text and JSON reading shared by the tool-call scanners: markers, literals, where a JSON value
ends (incrementally, as the output grows), and which JSON values are call objects.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from typing import Any

from mistralrs_serve.entrypoints.openai.tool_parsers.calls import ObjCall, RawCall


def partial_suffix(text: str, markers: Iterable[str]) -> int:
    """Length of the longest end of `text` that is a proper prefix of one of `markers`."""
    best = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:size]):
                best = size
                break
    return best


def find_first(text: str, markers: Sequence[str]) -> tuple[int, str]:
    """The earliest occurrence of any marker: (index, marker), or (-1, "")."""
    found = (-1, "")
    for marker in markers:
        index = text.find(marker)
        if index >= 0 and (found[0] < 0 or index < found[0]):
            found = (index, marker)
    return found


def skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def match_literal(text: str, pos: int, literal: str) -> int | None:
    """Position after `literal` at `pos`; None while `text` ends in a prefix of it; -1 on mismatch."""
    rest = text[pos : pos + len(literal)]
    if rest == literal:
        return pos + len(literal)
    return None if literal.startswith(rest) else -1


_JSON_STRUCTURE = re.compile(r'[{}\[\]"]')
_JSON_STRING_STOP = re.compile(r'["\\]')


class JsonExtent:
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


def loads(text: str) -> Any:
    """The JSON value in `text`, or None when it is not JSON (JSON null is never a call either)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def json_values(text: str) -> list[Any] | None:
    """The JSON values in `text`, separated by whitespace; None unless all of it is JSON."""
    decoder = json.JSONDecoder()
    values, pos = [], skip_ws(text, 0)
    while pos < len(text):
        try:
            value, pos = decoder.raw_decode(text, pos)
        except (ValueError, RecursionError):
            return None
        values.append(value)
        pos = skip_ws(text, pos)
    return values or None


_CALL_KEYS = frozenset({"name", "arguments", "parameters", "id", "type"})


def _arguments_object(value: Any) -> dict[str, Any] | None:
    if isinstance(value, str):  # some models write the arguments as a JSON string
        value = loads(value)
    return value if isinstance(value, dict) else None


def _call_from_object(value: Any, *, require_arguments: bool) -> ObjCall | None:
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


def calls_from_values(values: Sequence[Any] | None, *, require_arguments: bool) -> list[ObjCall] | None:
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


def dumped(calls: Iterable[ObjCall]) -> list[RawCall]:
    return [(name, json.dumps(arguments, ensure_ascii=False)) for name, arguments in calls]
