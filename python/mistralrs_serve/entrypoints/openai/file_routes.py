"""The Files API: /v1/files upload, list, retrieve, content and delete.

The routes need no model, so they answer while it loads. An upload is read
as a stream and given up once past the file limit; every store call (SQLite,
fsync) runs on a worker thread. Errors come in OpenAI's envelope, naming the
field at fault.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import AsyncGenerator, Callable
from typing import Any

import anyio
from fastapi import APIRouter, Request
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect
from starlette.responses import Response, StreamingResponse

from mistralrs_serve.entrypoints.openai.http_errors import answered, json_response
from mistralrs_serve.errors import InvalidRequestError, PayloadTooLargeError
from mistralrs_serve.store.files import UPLOAD_PURPOSES, FileStore, iter_chunks, safe_filename

# Room for the multipart framing and the small fields beside the file itself.
MULTIPART_OVERHEAD_BYTES = 64 << 10
# After a refusal, this much more of the body is read and dropped, so that the
# client (which sends the whole body before it reads) gets the 413 rather than
# a reset connection; past it the connection is closed.
DRAIN_BYTES = 8 << 20
_TAIL_BYTES = 512  # enough to hold the closing boundary (at most 70 characters) and a trailing line
_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)


def file_routes(store: FileStore, max_file_bytes: int) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/files")
    async def upload(request: Request) -> Response:
        return await answered(lambda: _upload(request, store, max_file_bytes))

    @router.get("/v1/files")
    async def list_files(request: Request) -> Response:
        async def handle() -> Response:
            query = request.query_params
            limit = _int_param(query.get("limit"), "limit", 10_000)
            order: Any = query.get("order", "desc")
            page = await anyio.to_thread.run_sync(
                lambda: store.list(
                    purpose=query.get("purpose"), limit=limit, order=order, after=query.get("after")
                )
            )
            return json_response(page.to_openai())

        return await answered(handle)

    @router.get("/v1/files/{file_id}")
    async def retrieve(file_id: str) -> Response:
        async def handle() -> Response:
            file = await anyio.to_thread.run_sync(store.get, file_id)
            return json_response(file.to_openai())

        return await answered(handle)

    @router.get("/v1/files/{file_id}/content")
    async def content(file_id: str) -> Response:
        async def handle() -> Response:
            file, stream = await anyio.to_thread.run_sync(store.open, file_id)
            plain = "".join(c if c.isascii() and c not in '"\\' else "_" for c in file.filename)
            quoted = urllib.parse.quote(file.filename, safe="")
            headers = {
                "Content-Length": str(file.bytes),
                "Content-Disposition": f"attachment; filename=\"{plain}\"; filename*=UTF-8''{quoted}",
            }
            return StreamingResponse(iter_chunks(stream), media_type=file.content_type, headers=headers)

        return await answered(handle)

    @router.delete("/v1/files/{file_id}")
    async def delete(file_id: str) -> Response:
        async def handle() -> Response:
            await anyio.to_thread.run_sync(store.delete, file_id)
            return json_response({"id": file_id, "object": "file", "deleted": True})

        return await answered(handle)

    return router


async def _upload(request: Request, store: FileStore, max_file_bytes: int) -> Response:
    """POST /v1/files: multipart `file` and `purpose`, optional `expires_after[anchor|seconds]`."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidRequestError(
            "POST /v1/files takes a multipart/form-data body with the fields 'file' and 'purpose'", "file"
        )
    limit = max_file_bytes + MULTIPART_OVERHEAD_BYTES
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + DRAIN_BYTES:
        raise _too_large(max_file_bytes)
    form = await parse_multipart(request, limit, lambda: _too_large(max_file_bytes))
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidRequestError("'file' is required: the file's bytes as a multipart file part", "file")
        purpose = _purpose(form.get("purpose"))
        expires_after_s = _expires_after(form)
        if upload.size is not None and upload.size > max_file_bytes:
            raise _too_large(max_file_bytes)
        data = await upload.read()
        filename = safe_filename(upload.filename, "upload")
        content_type = upload.content_type
    finally:
        await form.close()
    stored = await anyio.to_thread.run_sync(
        lambda: store.create(
            data,
            filename=filename,
            purpose=purpose,
            content_type=content_type,
            expires_after_s=expires_after_s,
        )
    )
    return json_response(stored.to_openai())


async def parse_multipart(
    request: Request,
    limit: int,
    too_large: Callable[[], PayloadTooLargeError],
    *,
    max_files: int = 1,
    max_fields: int = 16,
    param: str = "file",
) -> FormData:
    """The multipart body, read as a stream and refused with too_large() once past limit bytes
    (the rest drained, so the client reads the 413); malformed bodies are a 400 naming param."""
    body = _CappedBody(request, limit, too_large)
    parser = MultiPartParser(request.headers, body.chunks(), max_files=max_files, max_fields=max_fields)
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise InvalidRequestError(f"the multipart body is malformed: {e}", param) from None
    except PayloadTooLargeError:
        await body.drain(DRAIN_BYTES)
        raise
    # The parser takes a body cut short as complete, dropping the unfinished part.
    boundary = _BOUNDARY.search(request.headers.get("content-type", ""))
    if boundary is None or b"--" + boundary[1].encode("latin-1") + b"--" not in body.tail:
        await form.close()
        raise InvalidRequestError(
            "the multipart body is malformed: it ends before its closing boundary", param
        )
    return form


class _CappedBody:
    """The request body as chunks, refused once past `limit` bytes; it keeps the
    last few bytes (for the closing boundary) and whether more is to come."""

    def __init__(self, request: Request, limit: int, too_large: Callable[[], PayloadTooLargeError]) -> None:
        self.request = request
        self.limit = limit
        self.too_large = too_large
        self.num_bytes = 0
        self.tail = b""
        self.has_more = True

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        while self.has_more:
            chunk = await self._receive()
            self.num_bytes += len(chunk)
            if self.num_bytes > self.limit:
                raise self.too_large()
            self.tail = (self.tail + chunk)[-_TAIL_BYTES:]
            yield chunk

    async def drain(self, max_bytes: int) -> None:
        """Read and drop the rest of the body, up to max_bytes more."""
        drained = 0
        while self.has_more and drained <= max_bytes:
            drained += len(await self._receive())

    async def _receive(self) -> bytes:
        message = await self.request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        self.has_more = bool(message.get("more_body", False))
        return bytes(message.get("body", b""))


def _purpose(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidRequestError(
            f"'purpose' is required: one of {', '.join(UPLOAD_PURPOSES)} (user_data for request files)",
            "purpose",
        )
    if value not in UPLOAD_PURPOSES:
        raise InvalidRequestError(
            f"purpose must be one of {', '.join(UPLOAD_PURPOSES)}; got {value!r}", "purpose"
        )
    return value


def _expires_after(form: FormData) -> int | None:
    anchor, seconds = form.get("expires_after[anchor]"), form.get("expires_after[seconds]")
    if anchor is None and seconds is None:
        return None
    if anchor != "created_at":
        raise InvalidRequestError(
            f"expires_after.anchor must be 'created_at'; got {anchor!r}", "expires_after.anchor"
        )
    if not isinstance(seconds, str):
        raise InvalidRequestError("expires_after.seconds is required with an anchor", "expires_after.seconds")
    return _int_param(seconds, "expires_after.seconds", None)


def _int_param(value: str | None, name: str, default: int | None) -> Any:
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise InvalidRequestError(f"{name} must be an integer; got {value!r}", name) from None


def _too_large(max_file_bytes: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(f"the file is over the server's limit of {max_file_bytes} bytes", "file")
