"""Agent sessions and approvals over HTTP: export, import and delete a session
(`/v1/sessions/{id}`), and answer an `ask` approval (`/v1/agent/approvals/{id}`).

Thin: parse, call the SessionManager (on a worker thread: SQLite and the file
system) or the ApprovalRegistry, answer JSON or OpenAI's error envelope. None
of them needs the model, so they answer while it loads.

An approval is answered with `{"decision": "approve" | "deny",
"remember_for_session": bool}`; `{"approve": true | false}` is accepted as a
shorthand for the decision.
"""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import APIRouter, Request
from starlette.responses import Response

from mistralrs_serve.agent.approvals import ApprovalRegistry
from mistralrs_serve.agent.sessions import SessionManager
from mistralrs_serve.entrypoints.openai.api_server import read_body
from mistralrs_serve.entrypoints.openai.http_errors import answered, json_response
from mistralrs_serve.entrypoints.openai.http_security import json_body
from mistralrs_serve.errors import InvalidRequestError


def session_routes(sessions: SessionManager, approvals: ApprovalRegistry, max_body_bytes: int) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/sessions/{session_id}")
    async def export(session_id: str) -> Response:
        async def handle() -> Response:
            return json_response(await anyio.to_thread.run_sync(sessions.export, session_id))

        return await answered(handle)

    @router.put("/v1/sessions/{session_id}")
    async def import_(session_id: str, request: Request) -> Response:
        async def handle() -> Response:
            body = _json_body(await read_body(request, max_body_bytes))
            return json_response(await anyio.to_thread.run_sync(sessions.import_, session_id, body))

        return await answered(handle)

    @router.delete("/v1/sessions/{session_id}")
    async def delete(session_id: str) -> Response:
        async def handle() -> Response:
            await anyio.to_thread.run_sync(sessions.delete, session_id)
            return json_response({"id": session_id, "object": "session.deleted", "deleted": True})

        return await answered(handle)

    @router.post("/v1/agent/approvals/{approval_id}")
    async def answer(approval_id: str, request: Request) -> Response:
        async def handle() -> Response:
            decision, remember = parse_answer(_json_body(await read_body(request, max_body_bytes)))
            result = approvals.resolve(approval_id, decision, remember)
            return json_response(
                {
                    "id": approval_id,
                    "object": "agent.approval",
                    "decision": decision,
                    "approved": result.approved,
                    "remember_for_session": result.remember_for_session,
                }
            )

        return await answered(handle)

    return router


def parse_answer(body: Any) -> tuple[str, bool]:
    """(decision, remember_for_session) from an approval answer body."""
    if not isinstance(body, dict):
        raise InvalidRequestError(
            "the request body must be a JSON object: {'decision': 'approve' | 'deny', "
            "'remember_for_session': bool}"
        )
    decision, approve = body.get("decision"), body.get("approve")
    if approve is not None and not isinstance(approve, bool):
        raise InvalidRequestError(f"approve must be true or false; got {approve!r}", "approve")
    if decision is None and approve is None:
        raise InvalidRequestError("'decision' is required: 'approve' or 'deny'", "decision")
    if decision is not None and decision not in ("approve", "deny"):
        raise InvalidRequestError(f"decision must be 'approve' or 'deny'; got {decision!r}", "decision")
    from_flag = None if approve is None else ("approve" if approve else "deny")
    if decision is not None and from_flag is not None and decision != from_flag:
        raise InvalidRequestError(
            f"decision {decision!r} and approve {approve!r} disagree: send one", "approve"
        )
    remember = body.get("remember_for_session", False)
    if not isinstance(remember, bool):
        raise InvalidRequestError(
            f"remember_for_session must be true or false; got {remember!r}", "remember_for_session"
        )
    return decision or from_flag or "deny", remember


def _json_body(raw: bytes) -> Any:
    return json_body(raw)
