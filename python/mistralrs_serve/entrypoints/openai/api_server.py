"""The OpenAI-compatible HTTP server (FastAPI on uvicorn).

Request bodies are read and validated here, not by FastAPI's parameter
injection, so that every bad input gets OpenAI's 400 envelope (FastAPI
would answer 422 in its own shape). The handlers call the same serving
classes as the in-process Runner: one code path for requests.

The model loads on a background thread after the socket is open: /health
answers 503 until it is ready, the /v1 routes 503 with Retry-After. The
routes come in groups (one APIRouter each); they reach the engine only
through `EngineClient` and its `EngineInfo`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import inspect
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio
from fastapi import APIRouter, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from pydantic import BaseModel, ValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mistralrs_serve.agent.approvals import ApprovalRegistry
from mistralrs_serve.agent.runtime import AgentRuntime
from mistralrs_serve.agent.sessions import SessionManager
from mistralrs_serve.config import ServerConfig
from mistralrs_serve.engine.engine_info import EngineClient, EngineInfo
from mistralrs_serve.entrypoints.openai.attachments import Attachments, FileLimits
from mistralrs_serve.entrypoints.openai.file_routes import file_routes
from mistralrs_serve.entrypoints.openai.http_errors import (
    error_event,
    error_response,
    json_response,
    sse_data,
)
from mistralrs_serve.entrypoints.openai.http_security import SecureHttp, json_body, read_body
from mistralrs_serve.entrypoints.openai.metrics import ServerMetrics
from mistralrs_serve.entrypoints.openai.model_set import ModelSet, ServedModel
from mistralrs_serve.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
)
from mistralrs_serve.entrypoints.openai.responses_seal import ReasoningSeal
from mistralrs_serve.entrypoints.openai.serving_agent import AgentChatServing
from mistralrs_serve.entrypoints.openai.serving_chat import ChatServing
from mistralrs_serve.entrypoints.openai.serving_completion import CompletionServing
from mistralrs_serve.entrypoints.openai.serving_responses import (
    InstanceLease,
    ResponsesServing,
    fail_interrupted,
)
from mistralrs_serve.entrypoints.openai.skill_routes import skill_routes
from mistralrs_serve.errors import (
    AuthenticationError,
    InvalidRequestError,
    ServerBusyError,
    UnsupportedEndpointError,
)
from mistralrs_serve.models.model_specs import ModelSpec
from mistralrs_serve.store.db import default_data_dir, open_database
from mistralrs_serve.store.files import SqlFileStore
from mistralrs_serve.store.responses import SqlResponseStore
from mistralrs_serve.store.sessions import SqlSessionStore
from mistralrs_serve.store.skills import SqlSkillStore, default_skills_dir

logger = logging.getLogger("mistralrs_serve.server")

DEFAULT_MODEL_ID = "default"
M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class ChatModel:
    """What serves one chat model: its engine client and the serving classes over it."""

    client: EngineClient
    chat: ChatServing
    completion: CompletionServing
    agent_chat: AgentChatServing


class ServerState:
    """What the handlers share. `models` holds every model served; the primary chat
    model (the first) also backs Responses, and `client` is None until it has loaded."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.client: EngineClient | None = None
        self.chat: ChatServing | None = None
        self.completion: CompletionServing | None = None
        self.model_id = ""
        self.models = ModelSet()
        self.primary: ServedModel | None = None  # None: this server serves no chat model
        self.pending = 0
        self.created = int(time.time())
        self.metrics = ServerMetrics(self.engine_stats)
        # stored responses and files; opened before the socket, so a bad --data-dir fails the start
        self.db = open_database(config.store, config.data_dir or default_data_dir(), config.blob_store)
        self.files = SqlFileStore(self.db)
        agent = config.agent
        self.sessions = SessionManager(
            SqlSessionStore(self.db),
            self.db.data_dir,
            ttl_s=agent.session_ttl_s,
            max_sessions=agent.max_sessions,
        )
        self.approvals = ApprovalRegistry(agent.approval_timeout_s)
        # replicas sharing the database share the data directory: their skills live there by default
        skills_dir = config.agent.skills_dir or (
            self.db.data_dir / "skills" if self.db.shared else default_skills_dir()
        )
        self.skills = SqlSkillStore(self.db, Path(skills_dir))
        # server-side tools; built before the socket, so --sandbox on without bubblewrap fails the start
        self.agent = AgentRuntime(
            agent, files=self.files, sessions=self.sessions, approvals=self.approvals, skills=self.skills
        )
        self.agent_chat: AgentChatServing | None = None
        self.attachments = Attachments(self.files, FileLimits.from_config(config))
        self.responses = ResponsesServing(
            SqlResponseStore(self.db), ReasoningSeal(self.db.data_dir), config.default_truncation
        )
        self.lease: InstanceLease | None = None
        if self.db.shared:  # replicas share the store: fail only what dead replicas left running
            self.lease = InstanceLease(self.responses.store, stale_s=config.replica_lease_s)
        else:
            fail_interrupted(self.responses.store)  # what a server that died left running

    def engine_stats(self) -> dict[str, dict[str, int]]:
        return {
            m.name: m.serving.client.stats() for m in self.models.models if isinstance(m.serving, ChatModel)
        }

    def wrap(self, entry: ServedModel, loaded: Any) -> Any:
        """A loaded model's serving object (ModelSet.start calls this on the loading thread)."""
        if entry.kind == "transcription" and entry is self.models.default_of("transcription"):
            executor = entry.executor
            assert executor is not None
            self.attachments.listen = lambda data, where: executor.submit(loaded.hear, data, where).result()
        if entry.kind != "chat":
            return loaded
        client: EngineClient = loaded
        name = (self.config.served_model_name if entry is self.primary else None) or entry.spec.name
        entry.name = name or client.info.model_name
        client.add_finished_hook(lambda req: self.metrics.observe_request(req, entry.name))
        chat = ChatServing(client, entry.name, self.attachments)
        model = ChatModel(
            client, chat, CompletionServing(client, entry.name), AgentChatServing(chat, self.agent)
        )
        if self.config.seed is not None:
            model.chat.seeds = model.completion.seeds = random.Random(self.config.seed)
        if entry is self.primary:
            self.attach(model)
        return model

    def attach(self, model: ChatModel) -> None:
        self.chat, self.completion, self.agent_chat = model.chat, model.completion, model.agent_chat
        self.responses.attach(model.chat, self.agent)
        self.model_id = model.chat.model_name
        self.client = model.client  # last: marks the server ready

    def chat_model(self, model: str) -> ChatModel:
        """The chat model a request names (`default`: the primary)."""
        entry = self.models.resolve(model, "chat")
        serving: ChatModel = entry.serving
        return serving

    def check_primary(self, model: str) -> None:
        """`model` names the primary chat model, which Responses run on; another chat model is
        a 400 naming `model` rather than a request answered by the wrong model."""
        chosen = self.chat_model(model)
        if self.primary is not None and chosen is not self.primary.serving:
            raise InvalidRequestError(
                f"the Responses API runs on the primary chat model {self.model_id}; {model!r} is another",
                "model",
            )

    async def admitted(self, handler: Callable[[], Awaitable[Response]]) -> Response:
        """Error envelope for whatever the handler raises; the pending-request cap."""
        limit = self.config.max_pending_requests
        try:
            if self.pending >= limit:
                raise ServerBusyError(f"the server is at capacity ({limit} requests in progress)")
            self.pending += 1
        except Exception as e:
            return error_response(e)
        release = True
        try:
            response = await handler()
            if isinstance(response, EventStreamResponse):
                response.on_close = self.release  # the stream holds its slot until it ends
                release = False
            return response
        except Exception as e:
            return error_response(e)
        finally:
            if release:
                self.release()

    def release(self) -> None:
        self.pending -= 1


class EventStreamResponse(StreamingResponse):
    """SSE that notices a client disconnect while waiting for the engine, not
    only on the next write: a listener on `receive` cancels the stream, whose
    generator then aborts the request and frees its KV blocks."""

    media_type = "text/event-stream"
    on_close: Callable[[], None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def stream() -> None:
                    with contextlib.suppress(OSError):  # the socket went away mid-write
                        await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            if self.on_close is not None:
                self.on_close()


class AuthAndMetrics:
    """ASGI middleware: the API key on /v1, /tokenize and /detokenize; request
    counts by route and status. Plain ASGI (not BaseHTTPMiddleware), so that
    streaming and disconnect detection pass through untouched."""

    PROTECTED = ("/v1/", "/tokenize", "/detokenize")

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        counter = self.state.metrics.http_requests
        key = self.state.config.api_key
        if key is not None and path.startswith(self.PROTECTED) and method != "OPTIONS":
            given = Headers(scope=scope).get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                error = AuthenticationError(
                    "Incorrect or missing API key: send 'Authorization: Bearer <key>'"
                )
                await error_response(error)(scope, receive, send)
                counter.labels(path, method, "401").inc()
                return
        status = [500]

        async def send_and_note(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            counter.labels(route, method, str(status[0])).inc()


def dump(model: BaseModel) -> dict[str, Any]:
    """The wire form: None dropped, except the fields OpenAI sends as null."""
    return _drop_none(model.model_dump(mode="json"))


_KEEP_NULL = frozenset({"content", "refusal", "finish_reason", "logprobs"})


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None or k in _KEEP_NULL}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def sse_event(model: BaseModel) -> bytes:
    return sse_data(dump(model))


def parse_body(raw: bytes, model: type[M]) -> M:
    data = json_body(raw)
    if not isinstance(data, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        loc = [str(part) for part in first["loc"]]
        param = loc[0] if loc else None
        where = ".".join(loc)
        raise InvalidRequestError(f"{where}: {first['msg']}" if where else first["msg"], param) from None


T = TypeVar("T")


async def unless_disconnected(request: Request, work: Awaitable[T], poll_s: float = 0.2) -> T | None:
    """Await work; if the client goes away first, cancel it (which aborts its
    engine request) and return None."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await request.is_disconnected():
                logger.info("client disconnected; aborting its request")
                task.cancel()
                return None
    finally:
        if not task.done():
            task.cancel()


def build_app(
    config: ServerConfig,
    load: Callable[[], EngineClient] | None,
    models: Sequence[tuple[ModelSpec, Callable[[], Any]]] = (),
    primary: ModelSpec | None = None,
) -> FastAPI:
    """The app. `load` builds (or returns) the primary chat engine (None: no chat model),
    whose spec is `primary`; `models` are the other models and their loaders (an
    EngineClient for a chat model, else the kind's serving object,
    model_set.build_serving). Each loads on a thread of its own after the socket opens."""
    state = ServerState(config)
    if load is not None:
        spec = dataclasses.replace(primary or ModelSpec("chat", "default"), default=True)
        state.primary = state.models.add(spec, load)
        state.primary.name = ""  # known when loaded: --served-model-name, the spec's name or the model's own
    for spec, loader in models:
        state.models.add(spec, loader)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.agent.start()  # MCP servers: a bad --mcp-config fails the start
        try:
            yield
        finally:
            state.models.shutdown()
            await state.agent.aclose()
            if state.lease is not None:
                state.lease.close()

    app = FastAPI(title="mistralrs-serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.server = state
    state.models.start(state.wrap)
    if config.cors_allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=config.cors_allowed_origins,
            allow_methods=["*"],
            allow_headers=["*"],
        )
    app.add_middleware(AuthAndMetrics, state=state)
    app.add_middleware(SecureHttp, body_timeout_s=config.body_timeout_s)  # outermost: every response
    app.exception_handler(StarletteHTTPException)(http_error)
    from mistralrs_serve.entrypoints.openai.model_routes import model_routes  # it imports this module

    app.include_router(model_routes(state))
    app.include_router(generation_routes(state))
    app.include_router(token_routes(state))
    app.include_router(file_routes(state.files, config.max_file_bytes))
    app.include_router(skill_routes(state.skills))
    from mistralrs_serve.entrypoints.openai.response_routes import response_routes  # it imports this module

    app.include_router(response_routes(state))
    from mistralrs_serve.entrypoints.openai.session_routes import session_routes  # it imports this module

    app.include_router(session_routes(state.sessions, state.approvals, config.max_body_bytes))
    from mistralrs_serve.entrypoints.openai.modality_routes import audio_routes, embedding_routes

    app.include_router(embedding_routes(state))
    app.include_router(audio_routes(state))
    if config.ui:
        from mistralrs_serve.entrypoints.openai.ui_routes import ui_routes

        app.include_router(ui_routes())
    app.include_router(unsupported_routes())
    if config.enable_metrics:
        app.include_router(metrics_routes(state))
    document: list[dict[str, Any]] = []

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi() -> Response:
        from mistralrs_serve.entrypoints.openai.openapi_doc import openapi_document  # it imports this module

        document[:] = document or [openapi_document(app)]
        return json_response(document[0])

    return app


async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """Unknown routes and methods, in the OpenAI envelope."""
    error = {"message": str(exc.detail), "type": "invalid_request_error", "param": None, "code": None}
    return json_response({"error": error}, exc.status_code)


def generation_routes(state: ServerState) -> APIRouter:
    """/v1/chat/completions and /v1/completions: parse, check the model, stream or not."""
    router = APIRouter()
    config = state.config

    async def generate(request: Request, body_model: type[SamplingFields], serving: str) -> Response:
        async def handle() -> Response:
            req = parse_body(await read_body(request, config.max_body_bytes), body_model)
            model = state.chat_model(req.model)
            server: Any = model.chat if serving == "chat" else model.completion
            if isinstance(req, ChatCompletionRequest):
                req = await model.chat.attach_files_async(req)  # the store and fetches, off the loop
            agent = model.agent_chat
            if isinstance(req, ChatCompletionRequest) and agent.engages(req):
                server = agent  # server-side tools: the agent loop (agent/loop.py)
            if req.stream:
                return _sse(await _maybe_await(server.create_stream_async(req, config.keepalive_s)))
            res = await unless_disconnected(request, server.create_async(req))
            return json_response(dump(res)) if res is not None else Response(status_code=499)

        return await state.admitted(handle)

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate(request, ChatCompletionRequest, "chat")

    @router.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, CompletionRequest, "completion")

    return router


def token_routes(state: ServerState) -> APIRouter:
    """/tokenize and /detokenize (vLLM's extension routes)."""
    router = APIRouter()
    limit = state.config.max_body_bytes

    @router.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        async def handle() -> Response:
            req = parse_body(await read_body(request, limit), TokenizeRequest)
            model = state.chat_model(req.model)
            info = model.client.info
            ids = await anyio.to_thread.run_sync(_tokenize, req, info, model.chat)  # file parts block
            return json_response({"count": len(ids), "max_model_len": info.max_model_len, "tokens": ids})

        return await state.admitted(handle)

    @router.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        async def handle() -> Response:
            req = parse_body(await read_body(request, limit), DetokenizeRequest)
            tok = state.chat_model(req.model).client.info.tokenizer
            if any(not 0 <= t < tok.vocab_size for t in req.tokens):
                raise InvalidRequestError(f"token ids must be in [0, {tok.vocab_size})", "tokens")
            return json_response({"prompt": tok.decode(req.tokens, skip_special_tokens=False)})

        return await state.admitted(handle)

    return router


# OpenAI endpoints outside this server's scope, and what to use instead.
UNSUPPORTED = {
    "moderations": "Moderations are not supported: this server has no moderation model. Moderate with a "
    "chat request to a model of your choice instead.",
    "fine_tuning": "Fine-tuning is not supported: this is an inference server, not a training platform. "
    "Fine-tune elsewhere and serve the result with --model.",
    "batches": "The Batch API is not supported: send the requests directly; the server batches "
    "concurrent requests itself (continuous batching).",
    "assistants": "The Assistants API is not supported: use the Responses API (previous_response_id "
    "continues a conversation) or chat completions with session_id.",
    "threads": "Threads (Assistants API) are not supported: use the Responses API with "
    "previous_response_id, or chat completions with session_id.",
    "vector_stores": "Vector stores are not supported: upload files with POST /v1/files and attach them "
    "to a request as file parts.",
    "containers": "Containers are not supported: the code_interpreter and shell tools run in containers "
    "the server manages itself.",
    "uploads": "The Uploads API is not supported: upload a file in one request with POST /v1/files.",
}


def unsupported_routes() -> APIRouter:
    """A clear 404 in OpenAI's envelope for each endpoint family in UNSUPPORTED."""
    router = APIRouter()
    methods = ["GET", "POST", "DELETE", "PUT", "PATCH"]
    for family, message in UNSUPPORTED.items():

        async def unsupported(request: Request, message: str = message) -> Response:
            return error_response(UnsupportedEndpointError(message))

        for path in (f"/v1/{family}", f"/v1/{family}/{{rest:path}}"):
            router.add_api_route(path, unsupported, methods=methods, include_in_schema=False)
    return router


def metrics_routes(state: ServerState) -> APIRouter:
    router = APIRouter()

    @router.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return router


class TokenizeRequest(BaseModel):
    model: str = DEFAULT_MODEL_ID
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool = True
    # Chat fields that change the rendered prompt.
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    enable_thinking: bool | None = None
    reasoning_effort: str | None = None


class DetokenizeRequest(BaseModel):
    model: str = DEFAULT_MODEL_ID
    tokens: list[int]


def _tokenize(req: TokenizeRequest, info: EngineInfo, chat: ChatServing) -> list[int]:
    """The ids of a prompt, or of messages as the chat route renders them."""
    if req.messages is not None:
        chat_req = ChatCompletionRequest(
            messages=req.messages,
            tools=req.tools,
            tool_choice=req.tool_choice,
            enable_thinking=req.enable_thinking,
            reasoning_effort=req.reasoning_effort,
        )
        return chat.prompt_ids(chat_req)
    if req.prompt is not None:
        return info.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
    raise InvalidRequestError("give 'prompt' or 'messages'", "prompt")


async def _maybe_await(value: Any) -> Any:
    """A serving's stream: returned, or made by a coroutine (the agent plans before it streams)."""
    return await value if inspect.isawaitable(value) else value


def _sse(chunks: AsyncIterator[BaseModel | None]) -> Response:
    """chunks were validated already (the first error raises before this): from
    here on an error is sent as a final event, and the stream always ends."""

    async def events() -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                yield b": keep-alive\n\n" if chunk is None else sse_event(chunk)
        except Exception as e:
            yield error_event(e)
            return
        yield b"data: [DONE]\n\n"

    return EventStreamResponse(events(), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
