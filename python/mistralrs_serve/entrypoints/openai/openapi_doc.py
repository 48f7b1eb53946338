"""GET /openapi.json: this server's own OpenAPI document. FastAPI lists every
route and its path parameters; the routes read their bodies themselves
(`parse_body`, multipart streams), so the bodies are added here from the same
pydantic models the routes validate with, and the multipart forms by hand.
Fuzzing (tests/fuzz) generates requests from it."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from mistralrs_serve.entrypoints.openai.api_server import DetokenizeRequest, TokenizeRequest
from mistralrs_serve.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ImageGenerationRequest,
    SpeechRequest,
)
from mistralrs_serve.entrypoints.openai.responses_protocol import ResponsesRequest

JSON_BODIES: dict[tuple[str, str], type[BaseModel]] = {
    ("/v1/chat/completions", "post"): ChatCompletionRequest,
    ("/v1/completions", "post"): CompletionRequest,
    ("/tokenize", "post"): TokenizeRequest,
    ("/detokenize", "post"): DetokenizeRequest,
    ("/v1/responses", "post"): ResponsesRequest,
    ("/v1/embeddings", "post"): EmbeddingRequest,
    ("/v1/audio/speech", "post"): SpeechRequest,
    ("/v1/images/generations", "post"): ImageGenerationRequest,
}
_FILE = {"type": "string", "format": "binary"}
MULTIPART_BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("/v1/files", "post"): {
        "type": "object",
        "required": ["file", "purpose"],
        "properties": {"file": _FILE, "purpose": {"type": "string"}},
    },
    ("/v1/audio/transcriptions", "post"): {
        "type": "object",
        "required": ["file", "model"],
        "properties": {
            "file": _FILE,
            "model": {"type": "string"},
            "language": {"type": "string"},
            "prompt": {"type": "string"},
            "response_format": {"type": "string"},
            "temperature": {"type": "number"},
        },
    },
}
MULTIPART_BODIES[("/v1/audio/translations", "post")] = MULTIPART_BODIES[("/v1/audio/transcriptions", "post")]


def _json_schema(model: type[BaseModel], components: dict[str, Any]) -> dict[str, Any]:
    """The model's schema with its definitions moved into `components`."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(schema.pop("$defs", {}))
    components[model.__name__] = schema
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def openapi_document(app: FastAPI) -> dict[str, Any]:
    doc = get_openapi(title="mistralrs-serve", version="0.1.0", routes=app.routes)
    components: dict[str, Any] = doc.setdefault("components", {}).setdefault("schemas", {})
    for (path, method), model in JSON_BODIES.items():
        operation = doc["paths"].get(path, {}).get(method)
        if operation is not None:
            schema = _json_schema(model, components)
            operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}
    for (path, method), form in MULTIPART_BODIES.items():
        operation = doc["paths"].get(path, {}).get(method)
        if operation is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"multipart/form-data": {"schema": form}},
            }
    return doc
