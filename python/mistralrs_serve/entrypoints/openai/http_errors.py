"""The one table from exceptions to HTTP statuses and OpenAI's error envelope:
{"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.responses import Response

from mistralrs_serve.errors import (
    AuthenticationError,
    EngineError,
    InvalidRequestError,
    ModelNotFoundError,
    NotFoundError,
    PayloadTooLargeError,
    ReplicaUnavailableError,
    RequestTimeoutError,
    RequestTooLargeError,
    ServerBusyError,
    StorageFullError,
    StoreUnavailableError,
    UnsupportedEndpointError,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ErrorKind:
    status: int
    type: str
    code: str | None


# First match wins: subclasses before their bases.
TABLE: list[tuple[type[BaseException], ErrorKind]] = [
    (PayloadTooLargeError, ErrorKind(413, "invalid_request_error", "file_too_large")),
    (RequestTooLargeError, ErrorKind(400, "invalid_request_error", "request_too_large")),
    (RequestTimeoutError, ErrorKind(408, "invalid_request_error", "request_timeout")),
    (InvalidRequestError, ErrorKind(400, "invalid_request_error", None)),
    (AuthenticationError, ErrorKind(401, "invalid_request_error", "invalid_api_key")),
    (ModelNotFoundError, ErrorKind(404, "invalid_request_error", "model_not_found")),
    (NotFoundError, ErrorKind(404, "invalid_request_error", "not_found")),
    (UnsupportedEndpointError, ErrorKind(404, "invalid_request_error", "unsupported_endpoint")),
    (ServerBusyError, ErrorKind(503, "server_error", "server_busy")),
    (StorageFullError, ErrorKind(507, "server_error", "insufficient_storage")),
    (StoreUnavailableError, ErrorKind(503, "server_error", "store_unavailable")),
    (ReplicaUnavailableError, ErrorKind(503, "server_error", "replica_unavailable")),
    (EngineError, ErrorKind(500, "server_error", "engine_error")),
]
INTERNAL = ErrorKind(500, "server_error", "internal_error")


def kind_of(exc: BaseException) -> ErrorKind:
    for cls, kind in TABLE:
        if isinstance(exc, cls):
            return kind
    return INTERNAL


def error_body(exc: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, body, headers) for exc. Unknown exceptions are logged with their
    traceback and answered with a generic message: internals never reach clients."""
    kind = kind_of(exc)
    if kind is INTERNAL:
        logger.error("internal error while serving a request", exc_info=exc)
        message = "The server had an internal error while processing the request"
    else:
        message = str(exc)
    headers = {}
    if isinstance(exc, ServerBusyError):
        headers["Retry-After"] = str(exc.retry_after_s)
    body = {
        "error": {
            "message": message,
            "type": kind.type,
            "param": getattr(exc, "param", None),
            "code": kind.code,
        }
    }
    return kind.status, body, headers


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, headers=headers, media_type="application/json")


def error_response(exc: BaseException) -> Response:
    status, body, headers = error_body(exc)
    return json_response(body, status, headers)


def sse_data(body: Any) -> bytes:
    """One server-sent event carrying `body` as JSON."""
    return b"data: " + orjson.dumps(body) + b"\n\n"


def error_event(exc: BaseException) -> bytes:
    """The error envelope as the last event of a stream that has already begun."""
    return sse_data(error_body(exc)[1])


async def answered(handle: Callable[[], Awaitable[Response]]) -> Response:
    """handle()'s response, or the error envelope of whatever it raised."""
    try:
        return await handle()
    except Exception as e:
        return error_response(e)
