"""Routes of the models that do not chat: POST /v1/embeddings,
/v1/audio/speech, /v1/audio/transcriptions, /v1/audio/translations and
/v1/images/generations. Each
resolves its model in the server's ModelSet (a model of another kind is a 400
naming `model`) and runs it on that model's own workers: the embedder's
engine thread, the voice's, transcriber's or image pipeline's executor."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from concurrent.futures import Executor
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from starlette.datastructures import UploadFile
from starlette.responses import Response

from mistralrs_serve.audio.codecs import MEDIA_TYPES
from mistralrs_serve.entrypoints.openai.api_server import (
    EventStreamResponse,
    ServerState,
    parse_body,
    read_body,
    unless_disconnected,
)
from mistralrs_serve.entrypoints.openai.file_routes import parse_multipart
from mistralrs_serve.entrypoints.openai.http_errors import error_event, json_response
from mistralrs_serve.entrypoints.openai.model_set import ServedModel
from mistralrs_serve.entrypoints.openai.protocol import (
    EmbeddingRequest,
    ImageGenerationRequest,
    SpeechRequest,
)
from mistralrs_serve.entrypoints.openai.serving_audio import TranscriptionRequest
from mistralrs_serve.entrypoints.openai.serving_images import URL_TTL_S
from mistralrs_serve.errors import InvalidRequestError, PayloadTooLargeError

T = TypeVar("T")


def embedding_routes(state: ServerState) -> APIRouter:
    router = APIRouter()
    limit = state.config.max_body_bytes

    @router.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        async def handle(entry: list[ServedModel]) -> Response:
            req = parse_body(await read_body(request, limit), EmbeddingRequest)
            entry.append(state.models.resolve(req.model, "embedding"))
            body = await unless_disconnected(request, entry[0].serving.create_async(req))
            return json_response(body) if body is not None else Response(status_code=499)

        return await _observed(state, handle)

    return router


def audio_routes(state: ServerState) -> APIRouter:
    router = APIRouter()
    config = state.config

    @router.post("/v1/audio/speech")
    async def speech(request: Request) -> Response:
        async def handle(entry: list[ServedModel]) -> Response:
            req = parse_body(await read_body(request, config.max_body_bytes), SpeechRequest)
            model = state.models.resolve(req.model, "speech")
            entry.append(model)
            serving, executor = model.serving, _executor(model)
            plan = serving.plan(req)
            if plan.streaming:
                media = "text/event-stream" if plan.sse else MEDIA_TYPES[plan.fmt]
                chunks = _drain(serving.chunks(req, plan), executor)
                return EventStreamResponse(chunks, media_type=media)
            data = await _on(executor, serving.create, req)
            return Response(data, media_type=MEDIA_TYPES[plan.fmt])

        return await _observed(state, handle)

    async def transcribe(request: Request, task: str) -> Response:
        async def handle(entry: list[ServedModel]) -> Response:
            req = await _transcription_form(request, config.max_audio_bytes, task)
            model = state.models.resolve(req.model, "transcription")
            entry.append(model)
            serving, executor = model.serving, _executor(model)
            serving.options(req)  # a bad field is a 400 before any audio is decoded
            if req.stream:
                return EventStreamResponse(_drain(serving.events(req), executor))
            transcript = await _on(executor, serving.transcript, req)
            body, media = serving.body(req, transcript)
            return json_response(body) if isinstance(body, dict) else Response(body, media_type=media)

        return await _observed(state, handle)

    @router.post("/v1/images/generations")
    async def images(request: Request) -> Response:
        async def handle(entry: list[ServedModel]) -> Response:
            req = parse_body(await read_body(request, config.max_body_bytes), ImageGenerationRequest)
            model = state.models.resolve(req.model, "image")
            entry.append(model)
            serving = model.serving
            serving.options(req)  # a bad field is a 400 before the pipeline runs
            base = str(request.base_url).rstrip("/")

            def store(png: bytes, index: int) -> str:
                stored = state.files.create(
                    png,
                    filename=f"image-{index}.png",
                    purpose="vision",
                    content_type="image/png",
                    expires_after_s=URL_TTL_S,
                )
                return f"{base}/v1/files/{stored.id}/content"

            body = await _on(_executor(model), serving.generate, req, store)
            return json_response(body)

        return await _observed(state, handle)

    @router.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request) -> Response:
        return await transcribe(request, "transcribe")

    @router.post("/v1/audio/translations")
    async def translations(request: Request) -> Response:
        return await transcribe(request, "translate")

    return router


async def _observed(
    state: ServerState, handle: Callable[[list[ServedModel]], Awaitable[Response]]
) -> Response:
    """state.admitted, and the model's request count and latency in /metrics."""
    entry: list[ServedModel] = []  # the handler adds the model once it knows it
    start = time.perf_counter()
    response = await state.admitted(lambda: handle(entry))
    if entry:
        state.metrics.observe_model(
            entry[0].name, entry[0].kind, response.status_code, time.perf_counter() - start
        )
    return response


def _executor(model: ServedModel) -> Executor:
    assert model.executor is not None  # speech and transcription models have one
    return model.executor


async def _on(executor: Executor, fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)


async def _drain(items: Generator[bytes], executor: Executor) -> AsyncIterator[bytes]:
    """A blocking generator's items, each made on the model's executor. An error after the
    first byte ends the stream with an error event (SSE) or cuts it (audio bytes)."""
    done = object()
    try:
        while True:
            item = await _on(executor, next, items, done)
            if item is done:
                return
            yield item
    except Exception as e:
        yield error_event(e)
    finally:
        executor.submit(items.close)  # after the step in flight, on the same thread


async def _transcription_form(request: Request, max_bytes: int, task: str) -> TranscriptionRequest:
    """The multipart form of a transcription or translation, checked."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidRequestError("send multipart/form-data with the audio as 'file'", "file")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes + (1 << 20):
        raise PayloadTooLargeError(f"the upload is {declared} bytes; the audio limit is {max_bytes}", "file")

    def too_large() -> PayloadTooLargeError:
        return PayloadTooLargeError(f"the upload is over the audio limit of {max_bytes} bytes", "file")

    # read as a stream, capped whether or not the client declared a length
    form = await parse_multipart(request, max_bytes + (1 << 20), too_large, max_fields=64)
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise InvalidRequestError("'file' is required: the audio to transcribe", "file")
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise PayloadTooLargeError(f"the audio is over the limit of {max_bytes} bytes", "file")
    fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
    model = fields.get("model")
    if not model:
        raise InvalidRequestError("'model' is required", "model")
    granularities = form.getlist("timestamp_granularities[]") + form.getlist("timestamp_granularities")
    return TranscriptionRequest(
        file=data,
        filename=upload.filename or "audio",
        model=model,
        language=fields.get("language") if task == "transcribe" else None,
        prompt=fields.get("prompt"),
        response_format=fields.get("response_format", "json"),
        temperature=_number(fields.get("temperature", "0"), "temperature"),
        timestamp_granularities=[str(g) for g in granularities] or ["segment"],
        stream=_flag(fields.get("stream", "false"), "stream"),
        task=task,
    )


def _number(value: str, param: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise InvalidRequestError(f"{param} must be a number, got {value!r}", param) from None


def _flag(value: str, param: str) -> bool:
    if value.lower() in ("true", "1"):
        return True
    if value.lower() in ("false", "0", ""):
        return False
    raise InvalidRequestError(f"{param} must be true or false, got {value!r}", param)
