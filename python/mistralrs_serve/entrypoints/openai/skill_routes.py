"""The Skills API: /v1/skills upload, list, retrieve, default version, delete
and content, and /v1/skills/{id}/versions the same for versions.

The routes need no model. Uploads are multipart `files` parts (OpenAI's
client names them `files[]`): one zip archive, or the files of one skill
directory, each part's filename its path (`my-skill/SKILL.md`). The body is
read as a stream and refused past the caps of store/skill_bundle.py; what it
holds is checked and unpacked on a worker thread (store/skills.py), as is
every other store call. Errors come in OpenAI's envelope naming the field.
"""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path
from typing import Any

import anyio
from fastapi import APIRouter, Request
from starlette.datastructures import FormData, UploadFile
from starlette.responses import Response

from mistralrs_serve.entrypoints.openai.file_routes import DRAIN_BYTES, parse_multipart
from mistralrs_serve.entrypoints.openai.http_errors import answered, json_response
from mistralrs_serve.entrypoints.openai.http_security import json_body
from mistralrs_serve.errors import InvalidRequestError, PayloadTooLargeError
from mistralrs_serve.store.skill_bundle import MAX_FILES, MAX_TOTAL_BYTES, PARAM, UploadPart
from mistralrs_serve.store.skills import DEFAULT_LIST_LIMIT, SkillStore, VersionRef

# Per part: its boundary and headers (the filename is a path of up to 1 KiB); and the small fields.
MAX_BODY_BYTES = MAX_TOTAL_BYTES + MAX_FILES * 2048 + (64 << 10)
MAX_JSON_BYTES = 64 << 10
_FILES_FIELD = re.compile(r"files(\[\d*\])?")


def skill_routes(store: SkillStore) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/skills")
    async def create(request: Request) -> Response:
        async def handle() -> Response:
            parts, _ = await _read_upload(request)
            skill = await anyio.to_thread.run_sync(store.create, parts)
            return json_response(skill.to_openai())

        return await answered(handle)

    @router.get("/v1/skills")
    async def list_skills(request: Request) -> Response:
        async def handle() -> Response:
            limit, order, after = _list_args(request)
            page = await anyio.to_thread.run_sync(lambda: store.list(limit=limit, order=order, after=after))
            return json_response(page.to_openai())

        return await answered(handle)

    @router.get("/v1/skills/{skill_id}")
    async def retrieve(skill_id: str) -> Response:
        async def handle() -> Response:
            return json_response((await anyio.to_thread.run_sync(store.get, skill_id)).to_openai())

        return await answered(handle)

    @router.post("/v1/skills/{skill_id}")
    async def update(skill_id: str, request: Request) -> Response:
        async def handle() -> Response:
            version = _default_version(await _read_json(request))
            skill = await anyio.to_thread.run_sync(store.set_default_version, skill_id, version)
            return json_response(skill.to_openai())

        return await answered(handle)

    @router.delete("/v1/skills/{skill_id}")
    async def delete(skill_id: str) -> Response:
        async def handle() -> Response:
            await anyio.to_thread.run_sync(store.delete, skill_id)
            return json_response({"id": skill_id, "object": "skill.deleted", "deleted": True})

        return await answered(handle)

    @router.get("/v1/skills/{skill_id}/content")
    async def content(skill_id: str) -> Response:
        return await answered(lambda: _content(store, skill_id, None))

    _version_routes(router, store)
    return router


def _version_routes(router: APIRouter, store: SkillStore) -> None:
    @router.post("/v1/skills/{skill_id}/versions")
    async def create_version(skill_id: str, request: Request) -> Response:
        async def handle() -> Response:
            parts, make_default = await _read_upload(request)
            version = await anyio.to_thread.run_sync(
                lambda: store.create_version(skill_id, parts, make_default=make_default)
            )
            return json_response(version.to_openai())

        return await answered(handle)

    @router.get("/v1/skills/{skill_id}/versions")
    async def list_versions(skill_id: str, request: Request) -> Response:
        async def handle() -> Response:
            limit, order, after = _list_args(request)
            page = await anyio.to_thread.run_sync(
                lambda: store.list_versions(skill_id, limit=limit, order=order, after=after)
            )
            return json_response(page.to_openai())

        return await answered(handle)

    @router.get("/v1/skills/{skill_id}/versions/{version}")
    async def retrieve_version(skill_id: str, version: str) -> Response:
        async def handle() -> Response:
            found = await anyio.to_thread.run_sync(store.get_version, skill_id, version)
            return json_response(found.to_openai())

        return await answered(handle)

    @router.delete("/v1/skills/{skill_id}/versions/{version}")
    async def delete_version(skill_id: str, version: str) -> Response:
        async def handle() -> Response:
            gone = await anyio.to_thread.run_sync(store.delete_version, skill_id, version)
            body = {
                "id": gone.id,
                "object": "skill.version.deleted",
                "deleted": True,
                "version": str(gone.version),
            }
            return json_response(body)

        return await answered(handle)

    @router.get("/v1/skills/{skill_id}/versions/{version}/content")
    async def version_content(skill_id: str, version: str) -> Response:
        return await answered(lambda: _content(store, skill_id, version))


async def _read_upload(request: Request) -> tuple[list[UploadPart], bool]:
    """The `files` parts of a multipart body, and its `default` flag (for new versions)."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidRequestError(
            "upload a skill as multipart/form-data: 'files' parts holding one zip archive, or the files "
            "of one skill directory each named by its path (my-skill/SKILL.md)",
            PARAM,
        )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES + DRAIN_BYTES:
        raise _too_large()
    form = await parse_multipart(
        request, MAX_BODY_BYTES, _too_large, max_files=MAX_FILES, max_fields=16, param=PARAM
    )
    try:
        return await _parts(form), _flag(form.get("default"), "default")
    finally:
        await form.close()


async def _parts(form: FormData) -> list[UploadPart]:
    parts = []
    for key, value in form.multi_items():
        if _FILES_FIELD.fullmatch(key):
            if not isinstance(value, UploadFile):
                raise InvalidRequestError(
                    f"'{key}' must be a file part (with a filename), not a text field", PARAM
                )
            parts.append(UploadPart(value.filename or "", await value.read()))
        elif isinstance(value, UploadFile):
            raise InvalidRequestError(
                f"unexpected file field {key!r}: send the skill's files as 'files'", key
            )
    if not parts:
        raise InvalidRequestError(
            "'files' is required: one zip archive, or the files of one skill directory", PARAM
        )
    return parts


def _flag(value: Any, name: str) -> bool:
    if value is None:
        return False
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    raise InvalidRequestError(f"{name} must be true or false; got {str(value)[:50]!r}", name)


async def _read_json(request: Request) -> Any:
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_JSON_BYTES:
            raise InvalidRequestError(f"the request body is over {MAX_JSON_BYTES} bytes")
    return json_body(raw)


def _default_version(body: Any) -> VersionRef:
    if not isinstance(body, dict) or "default_version" not in body:
        raise InvalidRequestError(
            "'default_version' is required: the version number to make the default", "default_version"
        )
    value = body["default_version"]
    if not isinstance(value, str | int) or isinstance(value, bool):
        raise InvalidRequestError(
            f"default_version must be a version number; got {value!r}", "default_version"
        )
    return value


def _list_args(request: Request) -> tuple[int, Any, str | None]:
    query = request.query_params
    raw = query.get("limit")
    try:
        limit = DEFAULT_LIST_LIMIT if raw is None else int(raw)
    except ValueError:
        raise InvalidRequestError(f"limit must be an integer; got {raw!r}", "limit") from None
    return limit, query.get("order", "desc"), query.get("after")


async def _content(store: SkillStore, skill_id: str, version: VersionRef) -> Response:
    found, path = await anyio.to_thread.run_sync(store.version_dir, skill_id, version)
    data = await anyio.to_thread.run_sync(_zip_tree, path, found.name)
    headers = {"Content-Disposition": f'attachment; filename="{found.name}.zip"'}
    return Response(data, media_type="application/zip", headers=headers)


def _zip_tree(root: Path, name: str) -> bytes:
    """A version's files as a zip under one top-level directory named after the skill."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(root.rglob("*")):
            if path.is_file() and not path.is_symlink():
                archive.write(path, f"{name}/{path.relative_to(root).as_posix()}")
    return buffer.getvalue()


def _too_large() -> PayloadTooLargeError:
    return PayloadTooLargeError(f"the upload is over the server's limit of {MAX_BODY_BYTES} bytes", PARAM)
