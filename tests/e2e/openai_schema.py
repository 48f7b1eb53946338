"""Validate responses and stream chunks against OpenAI's published OpenAPI
document (tests/data/openapi/openai-openapi.yaml), once, for every e2e test."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC = Path(__file__).resolve().parents[1] / "data" / "openapi" / "openai-openapi.yaml"
ROOT = "urn:openai-openapi"


def _nullable_to_json_schema(node: Any) -> Any:
    """OpenAPI's `nullable: true` (still used in places of the 3.1 document)
    is not JSON Schema: turn it into anyOf [schema, null]."""
    if isinstance(node, list):
        return [_nullable_to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: _nullable_to_json_schema(v) for k, v in node.items()}
    if node.pop("nullable", False):
        return {"anyOf": [node, {"type": "null"}]}
    return node


@functools.cache
def _registry() -> Registry:
    with SPEC.open() as f:
        document = _nullable_to_json_schema(yaml.safe_load(f))
    return Registry().with_resource(ROOT, Resource(contents=document, specification=DRAFT202012))


@functools.cache
def validator(name: str) -> jsonschema.Draft202012Validator:
    schema = {"$ref": f"{ROOT}#/components/schemas/{name}"}
    return jsonschema.Draft202012Validator(schema, registry=_registry())


def check(name: str, instance: Any) -> None:
    """Raise with every violation listed if instance is not a valid `name`."""
    errors = sorted(validator(name).iter_errors(instance), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:300]}" for e in errors[:10]]
        raise AssertionError(f"not a valid {name}:\n" + "\n".join(lines))


def check_completion_chunk(instance: Any) -> None:
    """A streamed legacy completion chunk. OpenAI documents one shape for
    streamed and whole completions, but its finish_reason enum has no null
    while its server sends null on every chunk but the last: validate the
    chunk with finish_reason null swapped for "stop"."""
    patched = {
        **instance,
        "choices": [
            {**c, "finish_reason": c["finish_reason"] or "stop"} for c in instance.get("choices", [])
        ],
    }
    if not instance.get("choices") and "usage" in instance:
        patched.pop("choices")
        patched["choices"] = []
    check("CreateCompletionResponse", patched)


def checked_chat(client: Any, **kwargs: Any) -> Any:
    """A chat completion through the openai client (model "default" unless given), schema-checked."""
    res = client.chat.completions.create(**{"model": "default", **kwargs})
    check("CreateChatCompletionResponse", res.model_dump(mode="json", exclude_unset=True))
    return res


def checked_chat_stream(client: Any, **kwargs: Any) -> list[Any]:
    """Every chunk of a streamed chat completion, each schema-checked."""
    chunks = list(client.chat.completions.create(**{"model": "default", **kwargs, "stream": True}))
    for c in chunks:
        check("CreateChatCompletionStreamResponse", c.model_dump(mode="json", exclude_unset=True))
    return chunks


def _resolve(node: Any) -> Any:
    schemas = _registry().contents(ROOT)["components"]["schemas"]
    while isinstance(node, dict) and "$ref" in node:
        node = schemas[node["$ref"].rsplit("/", 1)[-1]]
    return node


def _properties(node: Any) -> dict[str, Any]:
    node = _resolve(node)
    props = dict(node.get("properties", {}))
    for part in node.get("allOf", []):
        props.update(_properties(part))
    return props


def nullable_fields(name: str) -> list[str]:
    """The request fields OpenAI's schema `name` lets a client send as null."""
    schemas = _registry().contents(ROOT)["components"]["schemas"]

    def is_nullable(prop: Any) -> bool:
        prop = _resolve(prop)
        return any(_resolve(alt).get("type") == "null" for alt in prop.get("anyOf", []))

    return sorted(k for k, v in _properties(schemas[name]).items() if is_nullable(v))
