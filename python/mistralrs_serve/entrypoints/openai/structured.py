"""Request fields that constrain the output: `response_format` (OpenAI) and
the `grammar` extension, turned into one engine `Grammar`.

JSON schemas are generated closed: an object schema that lists `properties`
and says nothing of `additionalProperties` is taken as if it said `false`, as
OpenAI's strict mode requires, so a model cannot pad its output with keys the
schema never named. A schema opts out by saying `"additionalProperties": true`.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from mistralrs_serve.errors import InvalidRequestError
from mistralrs_serve.sampling_params import GRAMMAR_KINDS, Grammar

RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema")


def _object(value: Any, param: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidRequestError(f"{param} must be an object", param)
    return value


def _schema_text(schema: Any, param: str) -> str:
    if not isinstance(schema, dict | bool):
        raise InvalidRequestError(f"{param} must be a JSON schema object", param)
    return json.dumps(close_objects(schema))


# Keywords whose value is a schema, a list of schemas, or a map of names to schemas.
_ONE_SCHEMA = ("additionalProperties", "items", "contains", "not", "if", "then", "else", "propertyNames")
_SCHEMA_LISTS = ("prefixItems", "anyOf", "oneOf")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
# Beside `properties`, these may admit further keys: such a schema is left as it is.
_OPENERS = (
    "additionalProperties",
    "patternProperties",
    "unevaluatedProperties",
    "allOf",
    "anyOf",
    "oneOf",
    "$ref",
)


def close_objects(schema: Any) -> Any:
    """A copy of `schema` where each object schema with `properties` and no say on
    extra keys forbids them. Branches of `allOf` are left open (closing one would
    reject the keys its siblings add), and so is a schema that combines its
    properties with `allOf`, `anyOf`, `oneOf` or `$ref`."""
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _ONE_SCHEMA:
            out[key] = close_objects(value)
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            out[key] = [close_objects(v) for v in value]
        elif key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: close_objects(v) for name, v in value.items()}
        else:
            out[key] = value
    if isinstance(out.get("properties"), dict) and not any(k in out for k in _OPENERS):
        out["additionalProperties"] = False
    return out


def from_response_format(response_format: Any) -> Grammar | None:
    """`text` is no constraint; `json_object` any JSON object; `json_schema`
    the schema under `json_schema.schema` (a missing schema: any JSON object)."""
    fmt = _object(response_format, "response_format")
    kind = fmt.get("type")
    if kind not in RESPONSE_FORMAT_TYPES:
        raise InvalidRequestError(
            f"response_format.type must be one of {', '.join(RESPONSE_FORMAT_TYPES)}; got {kind!r}",
            "response_format.type",
        )
    if kind == "text":
        return None
    if kind == "json_object":
        return Grammar("json_object", "", "response_format")
    spec = _object(fmt.get("json_schema"), "response_format.json_schema")
    name = spec.get("name")
    if name is not None and not isinstance(name, str):
        raise InvalidRequestError(
            "response_format.json_schema.name must be a string", "response_format.json_schema.name"
        )
    if spec.get("schema") is None:
        return Grammar("json_object", "", "response_format")
    source = _schema_text(spec["schema"], "response_format.json_schema.schema")
    return Grammar("json_schema", source, "response_format.json_schema.schema")


def from_grammar_field(grammar: Any) -> Grammar:
    """The extension `{"type": "regex" | "json_schema" | "lark" | "llguidance", "value": ...}`;
    a JSON schema may be given as an object or as its text."""
    spec = _object(grammar, "grammar")
    kind = spec.get("type")
    kinds = tuple(k for k in GRAMMAR_KINDS if k != "json_object")
    if kind not in kinds:
        raise InvalidRequestError(
            f"grammar.type must be one of {', '.join(kinds)}; got {kind!r}", "grammar.type"
        )
    value = spec.get("value")
    if kind == "json_schema" and isinstance(value, str):
        with contextlib.suppress(ValueError):  # not JSON: llguidance reports it with the field
            value = json.loads(value)
    if kind == "json_schema" and isinstance(value, dict | bool):
        return Grammar(kind, json.dumps(close_objects(value)), "grammar.value")
    if kind == "llguidance" and isinstance(value, dict):
        return Grammar(kind, json.dumps(value), "grammar.value")
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequestError(f"grammar.value must be a non-empty {kind} string", "grammar.value")
    return Grammar(kind, value, "grammar.value")


def request_grammar(response_format: Any, grammar: Any, grammar_type: str | None = None) -> Grammar | None:
    """The one constraint of a request; both fields set is a 400. `grammar` may
    also be the source text with its kind in `grammar_type` (the mistral.rs SDK's form)."""
    if isinstance(grammar, str):
        if grammar_type is None:
            raise InvalidRequestError(
                "grammar_type (regex, json_schema, lark or llguidance) is required when grammar is a string",
                "grammar_type",
            )
        grammar = {"type": grammar_type, "value": grammar}
    if grammar is not None and response_format is not None:
        raise InvalidRequestError(
            "grammar and response_format are mutually exclusive; set only one", "grammar"
        )
    if grammar is not None:
        return from_grammar_field(grammar)
    if response_format is not None:
        return from_response_format(response_format)
    return None
