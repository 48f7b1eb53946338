"""Constrained JSON is generated with closed objects (structured.close_objects)."""

from __future__ import annotations

import json

from mistralrs_serve.entrypoints.openai.structured import close_objects, request_grammar

POINT = {"type": "object", "properties": {"x": {"type": "integer"}}}


def test_objects_with_properties_are_closed_at_every_depth() -> None:
    schema = {
        "type": "object",
        "properties": {"p": POINT, "free": {"type": "object"}, "list": {"type": "array", "items": POINT}},
        "$defs": {"P": POINT},
        "required": ["p"],
    }
    closed = close_objects(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["p"]["additionalProperties"] is False
    assert closed["properties"]["list"]["items"]["additionalProperties"] is False
    assert closed["$defs"]["P"]["additionalProperties"] is False
    assert "additionalProperties" not in closed["properties"]["free"]  # names no key: stays a free object
    assert "additionalProperties" not in schema  # the request's schema is not changed


def test_what_a_schema_says_is_kept() -> None:
    opened = {**POINT, "additionalProperties": True}
    assert close_objects(opened) == opened
    typed = {**POINT, "additionalProperties": {"type": "string"}}
    assert close_objects(typed) == typed
    patterned = {**POINT, "patternProperties": {"^y": {}}}
    assert close_objects(patterned) == patterned


def test_composed_schemas_stay_open_where_closing_would_reject_valid_keys() -> None:
    both = {"allOf": [POINT, {"properties": {"y": {}}}]}
    assert close_objects(both) == both
    mixed = {**POINT, "anyOf": [{"required": ["x"]}]}
    assert "additionalProperties" not in close_objects(mixed)
    alternatives = {"anyOf": [POINT, {"type": "string"}]}
    assert close_objects(alternatives)["anyOf"][0]["additionalProperties"] is False


def test_response_format_and_grammar_schemas_are_closed() -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": POINT}}
    grammar = request_grammar(fmt, None)
    assert grammar is not None and json.loads(grammar.source)["additionalProperties"] is False
    for value in (POINT, json.dumps(POINT)):
        g = request_grammar(None, {"type": "json_schema", "value": value})
        assert g is not None and json.loads(g.source)["additionalProperties"] is False
