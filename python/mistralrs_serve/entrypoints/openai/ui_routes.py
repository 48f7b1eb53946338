"""GET /ui: the chat page (python/mistralrs_serve/ui: HTML, CSS and two ES
modules, shipped in the wheel, no build step and nothing fetched from
elsewhere). It talks to this server's own /v1 routes from the browser; its
content security policy lets it load only from this origin. `--no-ui` leaves
the routes out."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from starlette.responses import Response

from mistralrs_serve.entrypoints.openai.http_errors import error_response
from mistralrs_serve.errors import NotFoundError

UI_DIR = Path(__file__).resolve().parents[2] / "ui"
FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "markdown.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
UI_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


def _file(name: str) -> Response:
    media_type = FILES.get(name)
    if media_type is None:
        raise NotFoundError(f"/ui/{name}: no such file")
    headers = {"content-security-policy": UI_POLICY, "cache-control": "no-cache"}
    return Response((UI_DIR / name).read_bytes(), media_type=media_type, headers=headers)


def ui_routes() -> APIRouter:
    router = APIRouter()

    @router.get("/ui")
    @router.get("/ui/")
    async def page() -> Response:
        return _file("index.html")

    @router.get("/ui/{name}")
    async def asset(name: str) -> Response:
        try:
            return _file(name)
        except NotFoundError as e:
            return error_response(e)

    return router
