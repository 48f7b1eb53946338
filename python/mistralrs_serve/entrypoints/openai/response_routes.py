"""The Responses API routes: create, retrieve (or stream again), delete,
cancel, and the input items of a response. Thin: parse, call
`ResponsesServing`, answer JSON or SSE.

Stored responses are read and deleted without the model: those routes work
while it loads. Creating one goes through the server's admission (the model
ready, the pending-request limit)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from starlette.responses import Response

from mistralrs_serve.entrypoints.openai.api_server import (
    DEFAULT_MODEL_ID,
    EventStreamResponse,
    ServerState,
    parse_body,
    read_body,
    unless_disconnected,
)
from mistralrs_serve.entrypoints.openai.http_errors import answered, json_response
from mistralrs_serve.entrypoints.openai.responses_protocol import ResponsesRequest
from mistralrs_serve.errors import InvalidRequestError

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _raw_json(body: bytes) -> Response:
    """Stored bytes as they are: a response reads back byte for byte."""
    return Response(body, media_type="application/json")


def _events(frames: AsyncIterator[bytes]) -> Response:
    return EventStreamResponse(frames, headers=SSE_HEADERS)


def _int(request: Request, name: str, default: int) -> int:
    value = request.query_params.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise InvalidRequestError(f"{name} must be an integer; got {value!r}", name) from None


def _flag(request: Request, name: str) -> bool:
    value = request.query_params.get(name, "false").lower()
    if value not in ("true", "false", "1", "0"):
        raise InvalidRequestError(f"{name} must be true or false; got {value!r}", name)
    return value in ("true", "1")


def response_routes(state: ServerState) -> APIRouter:
    router = APIRouter()
    config = state.config
    responses = state.responses

    @router.post("/v1/responses")
    async def create(request: Request) -> Response:
        async def handle() -> Response:
            req = parse_body(await read_body(request, config.max_body_bytes), ResponsesRequest)
            state.check_primary(req.model or DEFAULT_MODEL_ID)
            result = await unless_disconnected(request, responses.create(req, config.keepalive_s))
            if result is None:
                return Response(status_code=499)
            return _raw_json(result) if isinstance(result, bytes) else _events(result)

        return await state.admitted(handle)

    @router.get("/v1/responses/{response_id}")
    async def retrieve(request: Request, response_id: str) -> Response:
        async def handle() -> Response:
            if _flag(request, "stream"):
                after = _int(request, "starting_after", -1)
                return _events(await responses.follow(response_id, after, config.keepalive_s))
            return _raw_json(await responses.retrieve(response_id))

        return await answered(handle)

    @router.delete("/v1/responses/{response_id}")
    async def delete(response_id: str) -> Response:
        async def handle() -> Response:
            return json_response(await responses.delete(response_id))

        return await answered(handle)

    @router.post("/v1/responses/{response_id}/cancel")
    async def cancel(response_id: str) -> Response:
        async def handle() -> Response:
            return _raw_json(await responses.cancel(response_id))

        return await answered(handle)

    @router.get("/v1/responses/{response_id}/input_items")
    async def input_items(request: Request, response_id: str) -> Response:
        async def handle() -> Response:
            page = await responses.input_items(
                response_id,
                limit=_int(request, "limit", 20),
                order=request.query_params.get("order", "desc"),
                after=request.query_params.get("after"),
            )
            return json_response(page)

        return await answered(handle)

    return router
