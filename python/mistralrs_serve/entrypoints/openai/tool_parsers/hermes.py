"""The `<tool_call>` family: Hermes / Qwen2.5 / Qwen3 write a JSON call object in each block,
Qwen3-Coder / Qwen3.5 an XML `<function=...>` with `<parameter=...>` tags; each reads both.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from mistralrs_serve.entrypoints.openai.tool_parsers.calls import ObjCall
from mistralrs_serve.entrypoints.openai.tool_parsers.grammar import (
    function_specs,
    json_rule,
    lark_string,
    lark_text,
    schema_types,
)
from mistralrs_serve.entrypoints.openai.tool_parsers.json_scan import (
    calls_from_values,
    dumped,
    json_values,
    loads,
    match_literal,
    skip_ws,
)
from mistralrs_serve.entrypoints.openai.tool_parsers.marked import MarkedFormat, MarkedScanner
from mistralrs_serve.entrypoints.openai.tool_parsers.scanner import Step, leading_heads

# Qwen3-Coder / Qwen3.5: <function=name><parameter=key>value</parameter>...</function>
_XML_FUNCTION = re.compile(r"\s*<function=([^>\n]+)>(.*)</function>\s*", re.S)
_XML_PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)</parameter>", re.S)


def _xml_value(raw: str, schema: Any) -> Any:
    """A parameter's value from its text: strings as written, other types as JSON where they parse."""
    if raw.startswith("\n"):
        raw = raw[1:]
    if raw.endswith("\n"):
        raw = raw[:-1]
    types = schema_types(schema)
    if types is not None and "string" in types:
        return raw
    value = loads(raw)
    if value is None and raw.strip() != "null":
        return raw
    if types is None and isinstance(value, str):
        return raw  # without a schema, text stays as the model wrote it
    return value


def _xml_call(inner: str, schemas: Mapping[str, Mapping[str, Any]]) -> ObjCall | None:
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


_UNREAD = Step(-1)  # a reading that leaves the block to another one


class HermesFormat(MarkedFormat):
    """Hermes / Qwen2.5 / Qwen3 / QwQ: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`.

    Blocks in Qwen3-Coder's XML form are read too (and JSON blocks by the Qwen3-Coder format).
    """

    name = "hermes"
    starts = ("<tool_call>",)
    terminators = ("</tool_call>", "<tool_call>")

    def block(self, scanner: MarkedScanner, buffer: str, marker: str, final: bool) -> Step | None:
        start = skip_ws(buffer, len(marker))
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
            calls = calls_from_values(json_values(inner), require_arguments=False)
        return Step(end, dumped(calls)) if calls else Step(len(marker))

    @staticmethod
    def _json_block(scanner: MarkedScanner, buffer: str, start: int, final: bool) -> Step | None:
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
            pos = skip_ws(buffer, end)
            if pos == len(buffer) or buffer[pos] not in "{[":
                break
        if (end is None or pos == len(buffer)) and not final:  # more JSON may follow
            return scanner.pending(buffer, leading_heads(heads))
        if end is not None and end > 0:
            calls = calls_from_values([loads(buffer[a:b]) for a, b in spans], require_arguments=False)
            close = match_literal(buffer, pos, "</tool_call>")
            if calls and close is None and not final:
                return scanner.pending(buffer, leading_heads(heads))
            if calls and (close is None or close > 0):  # unterminated at the end of the output: a call
                return Step(close or len(buffer), scanner.raw_calls(buffer, calls, heads))
        leading = leading_heads(heads)
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
        return dict(function_specs(tools))
    except ValueError:
        return {}


# A string parameter's text and its closing tag: the text runs to the first "\n</parameter>\n" (the
# rule is lazy) and holds no "</parameter>" or "</tool_call>", which would end it early when parsed.
_XML_TEXT_RULES = (
    "xml_text[lazy]: XML_TEXT\n"
    "XML_TEXT: /(?s:.*)\\n<\\/parameter>\\n/"
    " & ~/(?s:.*)(<\\/tool_call>|<\\/parameter>(?s:.*)<\\/parameter>)(?s:.*)/\n"
)


class Qwen3CoderFormat(HermesFormat):
    """Qwen3-Coder / Qwen3.5: `<tool_call>\\n<function=name>\\n<parameter=key>\\nvalue\\n</parameter>\\n
    </function>\\n</tool_call>`; a string value is its text, other values are JSON."""

    name = "qwen3_coder"

    def _complete_grammar(self, lines: list[str]) -> str:
        grammar = super()._complete_grammar(lines)
        return grammar + _XML_TEXT_RULES if " xml_text" in grammar else grammar

    def _call_parts(self, index: int, name: str, schema: Mapping[str, Any]) -> tuple[str, str, list[str]]:
        head = f"<tool_call>\n<function={name}>\n"
        tail = lark_text("</function>\n</tool_call>")
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
        opening = lark_string(f"<parameter={key}>\n")
        closing = lark_string("\n</parameter>\n")
        types = schema_types(prop)
        enum = prop.get("enum") if isinstance(prop, Mapping) else None
        textual = types is None or "string" in types  # parsed back as the text, unless it is JSON
        if textual and isinstance(enum, list) and enum and all(isinstance(item, str) for item in enum):
            choices = " | ".join(lark_string(item) for item in enum)
            return [f"{rule}: {opening} ({choices}) {closing}"]
        if textual:
            return [f"{rule}: {opening} xml_text"]
        value_schema = dict(prop) if isinstance(prop, Mapping) else {}
        for definitions in ("$defs", "definitions"):  # keep $ref targets reachable
            if definitions in schema:
                value_schema.setdefault(definitions, schema[definitions])
        return [f"{rule}: {opening} {rule}_value {closing}", f"{rule}_value: {json_rule(value_schema)}"]
