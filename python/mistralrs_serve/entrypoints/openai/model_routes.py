"""/health and /v1/models over the server's ModelSet: every model with its kind,
and each kind's default alias (`default`, `default-embedding`, ...) as a card
whose `root` is the model it stands for."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.responses import Response

from mistralrs_serve.entrypoints.openai.api_server import ServerState
from mistralrs_serve.entrypoints.openai.http_errors import error_response, json_response
from mistralrs_serve.entrypoints.openai.model_set import ServedModel
from mistralrs_serve.errors import ModelNotFoundError, ServerBusyError


def model_routes(state: ServerState) -> APIRouter:
    router = APIRouter()
    models = state.models

    @router.get("/health")
    async def health() -> Response:
        statuses = models.health()
        body: dict[str, Any] = {"models": statuses}
        if state.primary is not None:
            body["model"] = state.model_id or None
        if all(m.status == "ready" for m in models.models):
            return json_response({"status": "ok", **body})
        failed = [m for m in models.models if m.status == "failed"]
        body["error"] = "; ".join(f"{m.name or m.kind}: {m.error}" for m in failed) or None
        return json_response({"status": "failed" if failed else "loading", **body}, 503)

    @router.get("/v1/models")
    async def list_models() -> Response:
        if not any(m.status == "ready" for m in models.models):
            still = any(m.status == "loading" for m in models.models)
            error = ServerBusyError(
                "the models are still loading" if still else "the models failed to load",
                retry_after_s=5 if still else 60,
            )
            return error_response(error)
        cards = [_card(alias, m, state) for alias, m in models.aliases() if m.status == "ready"]
        cards += [_card(m.name, m, state) for m in models.models if m.status == "ready"]
        return json_response({"object": "list", "data": cards})

    @router.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> Response:
        entry = models.find(model_id)
        if entry is None or entry.status != "ready":
            return error_response(ModelNotFoundError(model_id, models.names()))
        return json_response(_card(model_id, entry, state))

    return router


def _card(model_id: str, entry: ServedModel, state: ServerState) -> dict[str, Any]:
    card: dict[str, Any] = {
        "id": model_id,
        "object": "model",
        "created": state.created,
        "owned_by": "mistralrs-serve",
        "kind": entry.kind,
    }
    if model_id != entry.name:
        card["root"] = entry.name
    serving = entry.serving
    if entry.kind == "chat":
        info = serving.client.info
        card["max_model_len"] = info.max_model_len
        card["input_modalities"] = ["text", "image"] if info.vision is not None else ["text"]
    elif entry.kind == "embedding":
        card["dimensions"] = serving.dim
        card["max_model_len"] = serving.engine.embedder.max_seq_length
        if serving.matryoshka:
            card["matryoshka_dimensions"] = serving.matryoshka
    elif entry.kind == "speech":
        card["voices"] = list(serving.model.voices)
    elif entry.kind == "transcription":
        card["multilingual"] = serving.model.multilingual
    elif entry.kind == "image":
        card["pipeline"] = serving.model.kind
        card["size_multiple"] = serving.model.factor
    return card
