"""Pieces of the llguidance Lark grammars that constrain tool calls: the markers vocabularies hold as
one token, literals and regex escapes, the JSON-schema rule, and the tools' parameter schemas.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from mistralrs_serve.entrypoints.openai.structured import close_objects

# Whitespace in constrained arguments: the separators json.dumps (and templates' tojson) write.
_JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

# DeepSeek's markers (read in deepseek.py); here because each is also one token of its vocabulary.
DS_CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
DS_CALLS_END = "<｜tool▁calls▁end｜>"
DS_CALL_BEGIN = "<｜tool▁call▁begin｜>"
DS_CALL_END = "<｜tool▁call▁end｜>"
DS_SEP = "<｜tool▁sep｜>"

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
    "<|/tool_call|>",
    DS_CALLS_BEGIN,
    DS_CALLS_END,
    DS_CALL_BEGIN,
    DS_CALL_END,
    DS_SEP,
)
_TOKEN_MARKER_SPLIT = re.compile("(" + "|".join(map(re.escape, TOKEN_MARKERS)) + ")")


def lark_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def lark_text(text: str) -> str:
    """`text` as Lark literals, one after another, each of `TOKEN_MARKERS` in it a literal of its own."""
    return " ".join(lark_string(piece) for piece in _TOKEN_MARKER_SPLIT.split(text) if piece)


_REGEX_META = frozenset("\\.+*?()|[]{}^$#&-~/")


def regex_literal(text: str) -> str:
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
SPACE_CLASS = _regex_class(_SPACES)
LINE_SPACE_CLASS = _regex_class(char for char in _SPACES if char != "\n")
# Any text, in a regex.
ANY = "(?s:.*)"


def json_rule(schema: Mapping[str, Any]) -> str:
    """A lark rule for JSON that `schema` accepts, its objects closed (see `structured.close_objects`)."""
    closed = close_objects(dict(schema))
    return "%json " + json.dumps({**closed, "x-guidance": _JSON_LAYOUT}, ensure_ascii=False)


def function_specs(tools: Sequence[Mapping[str, Any]] | None) -> list[tuple[str, dict[str, Any]]]:
    """(name, parameters schema) of each OpenAI-shaped tool; a missing schema is {"type": "object"}."""
    specs = []
    for tool in tools or ():
        function = tool.get("function", tool)
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise ValueError(f"not a function tool: {tool!r}")
        parameters = function.get("parameters")
        specs.append((function["name"], dict(parameters) if isinstance(parameters, Mapping) else {}))
    return [(name, schema or {"type": "object"}) for name, schema in specs]


def schema_types(schema: Any) -> set[str] | None:
    """The JSON types a schema names in `type`, or None when it names none."""
    if not isinstance(schema, Mapping):
        return None
    kind = schema.get("type")
    if isinstance(kind, str):
        return {kind}
    if isinstance(kind, list) and all(isinstance(item, str) for item in kind):
        return set(kind)
    return None
