"""/v1/sessions/{id} and /v1/agent/approvals/{id} through the real server
(uvicorn on loopback). The routes need no model, so the server here never
loads one: they must answer while it loads. Covered: export, import, delete,
a restart, every bad body and id answered in OpenAI's envelope, and approvals
answered over HTTP while a request on another thread waits for them."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from live_server import free_port
from mistralrs_serve.agent.approvals import Decision
from mistralrs_serve.config import ServerConfig
from mistralrs_serve.entrypoints.openai.api_server import build_app


class Server:
    def __init__(self, data_dir: Path) -> None:
        self.model_loaded = threading.Event()  # never set: the model stays "loading"
        self.app = build_app(ServerConfig(data_dir=str(data_dir)), self._load)
        port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(self.app, host="127.0.0.1", port=port, log_config=None, access_log=False)
        )
        threading.Thread(target=self.server.run, daemon=True).start()
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if self.http.get("/health").json()["status"] == "loading":
                    return
            except httpx.TransportError:
                time.sleep(0.05)
        raise RuntimeError("the test server did not start")

    def _load(self) -> Any:
        self.model_loaded.wait()
        raise RuntimeError("stopped")

    @property
    def state(self) -> Any:
        return self.app.state.server

    def stop(self) -> None:
        self.http.close()
        self.server.should_exit = True
        self.model_loaded.set()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sessions-data")


@pytest.fixture(scope="module")
def server(data_dir: Path) -> Iterator[Server]:
    live = Server(data_dir)
    yield live
    live.stop()


MESSAGES = [
    {"role": "user", "content": "plot a sine"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "python", "arguments": '{"code": "..."}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "done"},
    {"role": "assistant", "content": "Here is the plot."},
]
SESSION = {
    "messages": MESSAGES,
    "hidden_messages": [1, 2],
    "approvals": {"python": "approve"},
    "files": ["file-abc"],
}


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return dict(error)


def test_import_export_delete(server: Server) -> None:
    put = server.http.put("/v1/sessions/user-42_chat", json=SESSION)
    assert put.status_code == 200, put.text
    body = put.json()
    assert body["id"] == "user-42_chat" and body["object"] == "session"
    assert {k: body[k] for k in SESSION} == SESSION
    assert body["created_at"] <= body["updated_at"] < body["expires_at"]
    got = server.http.get("/v1/sessions/user-42_chat")
    assert got.status_code == 200 and got.json() == body
    # an export imports as it is, under another id
    copy = server.http.put("/v1/sessions/copy", json=got.json())
    assert copy.status_code == 200 and copy.json()["messages"] == MESSAGES
    workdir = server.state.sessions.workdir("user-42_chat")
    workdir.mkdir(parents=True)
    deleted = server.http.delete("/v1/sessions/user-42_chat")
    assert deleted.json() == {"id": "user-42_chat", "object": "session.deleted", "deleted": True}
    assert not workdir.exists()
    assert error_of(server.http.get("/v1/sessions/user-42_chat"), 404)["param"] == "session_id"
    assert error_of(server.http.delete("/v1/sessions/user-42_chat"), 404)["code"] == "not_found"
    assert server.http.get("/v1/sessions/copy").status_code == 200


def test_a_session_is_found_by_its_history(server: Server) -> None:
    server.http.put("/v1/sessions/by-history", json=SESSION)
    visible = [MESSAGES[0], MESSAGES[3], {"role": "user", "content": "now a cosine"}]
    session = server.state.sessions.resolve(None, visible)
    assert session.id == "by-history" and session.messages == [*MESSAGES, visible[2]]


@pytest.mark.parametrize(
    ("content", "param"),
    [
        (b"{not json", None),
        (b"[]", None),
        (b"{}", "messages"),
        (b'{"messages": [{"role": "robot"}]}', "messages[0].role"),
        (b'{"messages": [], "hidden_messages": [0]}', "hidden_messages"),
        (b'{"messages": [], "approvals": {"python": "yes"}}', "approvals"),
        (b'{"messages": [], "extra": 1}', "extra"),
    ],
)
def test_bad_import_bodies(server: Server, content: bytes, param: str | None) -> None:
    response = server.http.put(
        "/v1/sessions/bad-body", content=content, headers={"Content-Type": "application/json"}
    )
    error = error_of(response, 400)
    assert error["param"] == param and error["type"] == "invalid_request_error"
    error_of(server.http.get("/v1/sessions/bad-body"), 404)


@pytest.mark.parametrize("session_id", ["a.b", "x" * 129, "caf%C3%A9", "a%20b"])
def test_bad_session_ids(server: Server, session_id: str) -> None:
    for response in (
        server.http.get(f"/v1/sessions/{session_id}"),
        server.http.put(f"/v1/sessions/{session_id}", json=SESSION),
        server.http.delete(f"/v1/sessions/{session_id}"),
    ):
        assert error_of(response, 400)["param"] == "session_id"


def test_an_oversized_import_is_refused(server: Server) -> None:
    huge = {"messages": [{"role": "user", "content": "x" * (server.state.config.max_body_bytes + 1)}]}
    assert error_of(server.http.put("/v1/sessions/huge", json=huge), 400)["code"] == "request_too_large"


def test_sessions_survive_a_restart(data_dir: Path, server: Server) -> None:
    server.http.put("/v1/sessions/durable", json=SESSION)
    again = Server(data_dir)  # a second server over the same data directory
    try:
        got = again.http.get("/v1/sessions/durable")
        assert got.status_code == 200 and got.json()["messages"] == MESSAGES
        visible = [MESSAGES[0], MESSAGES[3], {"role": "user", "content": "more"}]
        # the newest of the sessions with this history (others in this module share it)
        assert again.state.sessions.store.find_by_history(visible) == "durable"
    finally:
        again.stop()


def wait_in_thread(server: Server, approval_id: str) -> Any:
    """A request waiting for the answer, on an event loop of its own thread."""
    pool = ThreadPoolExecutor(1)
    future = pool.submit(asyncio.run, server.state.approvals.wait(approval_id))
    pool.shutdown(wait=False)
    return future


def test_approve_over_http(server: Server) -> None:
    approval = server.state.approvals.create("sess_x", "python", '{"code": "1"}')
    waiting = wait_in_thread(server, approval.id)
    body = {"decision": "approve", "remember_for_session": True}
    answer = server.http.post(f"/v1/agent/approvals/{approval.id}", json=body)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {
        "id": approval.id,
        "object": "agent.approval",
        "decision": "approve",
        "approved": True,
        "remember_for_session": True,
    }
    assert waiting.result(timeout=10) == Decision(True, True, "approved")
    again = server.http.post(f"/v1/agent/approvals/{approval.id}", json={"decision": "deny"})
    assert error_of(again, 400)["param"] == "approval_id"


def test_deny_with_the_shorthand(server: Server) -> None:
    approval = server.state.approvals.create("sess_x", "shell", "{}")
    waiting = wait_in_thread(server, approval.id)
    answer = server.http.post(f"/v1/agent/approvals/{approval.id}", json={"approve": False})
    assert answer.status_code == 200 and answer.json()["decision"] == "deny"
    assert waiting.result(timeout=10) == Decision(False, False, "denied")


def test_unknown_approval_is_404(server: Server) -> None:
    response = server.http.post("/v1/agent/approvals/appr_nope", json={"decision": "approve"})
    assert error_of(response, 404)["param"] == "approval_id"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"nope", None),
        (b'"approve"', None),
        (b"{}", "decision"),
        (b'{"decision": "maybe"}', "decision"),
        (b'{"approve": "yes"}', "approve"),
        (b'{"decision": "approve", "approve": false}', "approve"),
        (b'{"decision": "approve", "remember_for_session": "yes"}', "remember_for_session"),
    ],
)
def test_bad_approval_bodies(server: Server, body: bytes, param: str | None) -> None:
    approval = server.state.approvals.create("sess_x", "python", "{}")
    response = server.http.post(
        f"/v1/agent/approvals/{approval.id}", content=body, headers={"Content-Type": "application/json"}
    )
    assert error_of(response, 400)["param"] == param
    server.state.approvals.resolve(approval.id, "deny")  # still pending after the bad answer
