"""The agent loop through the Responses API: hosted tools as OpenAI's items
and stream events, checked against OpenAI's schema; on the real server over
the scripted model (agent_servers.py says what is scripted)."""

from __future__ import annotations

import io
import json
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.agent_servers import CODE_TOOL, AgentServer, call
from agent.fake_web import FakeWeb
from agent.scripted_model import by_round

sys.path.insert(0, str(Path(__file__).parent.parent / "e2e"))
from openai_schema import check
from responses_checks import check_stream, error_of, sse_events

SKILL_MD = "---\nname: greeter\ndescription: Greets people warmly.\n---\n\nRun scripts/hello.sh.\n"


def _create(server: AgentServer, **body: Any) -> dict[str, Any]:
    with server.http() as h:
        r = h.post("/v1/responses", json={"model": "default", **body})
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    check("Response", out)
    return out


def _types(response: dict[str, Any]) -> list[str]:
    return [item["type"] for item in response["output"]]


def test_code_interpreter_items(server: AgentServer) -> None:
    server.use(
        by_round(
            call("python", code="print(6 * 7)\nopen('table.csv', 'w').write('a,b')"), "See table.csv: 42."
        )
    )
    out = _create(server, input="Compute.", tools=[CODE_TOOL])
    assert out["status"] == "completed"
    assert _types(out) == ["code_interpreter_call", "message"]
    ci = out["output"][0]
    assert ci["status"] == "completed" and "print(6 * 7)" in ci["code"]
    assert ci["container_id"].startswith("sess_")
    assert any(o["type"] == "logs" and "42" in o["logs"] for o in ci["outputs"])
    part = out["output"][1]["content"][0]
    assert part["text"] == "See table.csv: 42."
    [cite] = [a for a in part["annotations"] if a["type"] == "container_file_citation"]
    assert (
        cite["filename"] == "table.csv"
        and part["text"][cite["start_index"] : cite["end_index"]] == "table.csv"
    )
    with server.http() as h:
        assert h.get(f"/v1/files/{cite['file_id']}/content").content == b"a,b"
    assert out["usage"]["input_tokens"] > 0


def test_code_interpreter_stream_events(server: AgentServer) -> None:
    server.use(by_round(call("python", code="print('hi')"), "Said hi."))
    body = {"model": "default", "input": "Say hi.", "tools": [CODE_TOOL], "stream": True}
    with server.http() as h:
        events = sse_events(h, "POST", "/v1/responses", body)
    final = check_stream(events)
    kinds = [e["type"] for e in events]
    for kind in (
        "response.code_interpreter_call.in_progress",
        "response.code_interpreter_call_code.done",
        "response.code_interpreter_call.interpreting",
        "response.code_interpreter_call.completed",
    ):
        assert kind in kinds
    assert kinds.index("response.code_interpreter_call.completed") < kinds.index("response.output_text.delta")
    assert _types(final) == ["code_interpreter_call", "message"]
    # what was stored is what was streamed
    with server.http() as h:
        assert h.get(f"/v1/responses/{final['id']}").json()["output"] == final["output"]


def test_web_search_call_and_url_citation(server: AgentServer, web: FakeWeb) -> None:
    server.use(by_round(call("web_search", query="kettles"), "Kettles boil water [1]."))
    out = _create(server, input="How do kettles work?", tools=[{"type": "web_search"}])
    assert _types(out) == ["web_search_call", "message"]
    action = out["output"][0]["action"]
    assert action["type"] == "search" and action["query"] == "kettles"
    assert web.url("/kettle") in [s["url"] for s in action["sources"]]
    part = out["output"][1]["content"][0]
    [cite] = [a for a in part["annotations"] if a["type"] == "url_citation"]
    assert cite["url"] == web.url("/kettle")
    assert part["text"][cite["start_index"] : cite["end_index"]] == "[1]"


def test_previous_response_keeps_the_interpreter(server: AgentServer) -> None:
    server.use(by_round(call("python", code="total = 40"), "Kept."))
    first = _create(server, input="Keep 40.", tools=[CODE_TOOL])
    server.use(by_round(call("python", code="print(total + 2)"), "42."))
    second = _create(server, input="Add two.", tools=[CODE_TOOL], previous_response_id=first["id"])
    logs = second["output"][0]["outputs"][0]["logs"]
    assert "42" in logs
    assert second["output"][0]["container_id"] == first["output"][0]["container_id"]


def _skill_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("greeter/SKILL.md", SKILL_MD)
        z.writestr("greeter/scripts/hello.sh", "echo hello from the skill\n")
    return buf.getvalue()


def test_shell_with_a_skill(server: AgentServer) -> None:
    with server.http() as h:
        r = h.post("/v1/skills", files={"files": ("greeter.zip", _skill_zip(), "application/zip")})
        assert r.status_code == 200, r.text
        skill_id = r.json()["id"]
    server.use(
        by_round(call("shell", commands=["sh skills/greeter/scripts/hello.sh", "ls skills"]), "Greeted.")
    )
    shell = {
        "type": "shell",
        "environment": {
            "type": "container_auto",
            "skills": [{"type": "skill_reference", "skill_id": skill_id}],
        },
    }
    out = _create(server, input="Greet.", tools=[shell])
    assert _types(out) == ["shell_call", "shell_call_output", "message"]
    assert out["output"][0]["action"]["commands"][0] == "sh skills/greeter/scripts/hello.sh"
    outputs = out["output"][1]["output"]
    assert "hello from the skill" in outputs[0]["stdout"]
    assert outputs[0]["outcome"] == {"type": "exit", "exit_code": 0}
    assert "greeter" in outputs[1]["stdout"]
    assert out["output"][1]["call_id"] == out["output"][0]["call_id"]


def test_unknown_skill_is_refused(server: AgentServer) -> None:
    shell = {
        "type": "shell",
        "environment": {
            "type": "container_auto",
            "skills": [{"type": "skill_reference", "skill_id": "skill_nope"}],
        },
    }
    with server.http() as h:
        r = h.post("/v1/responses", json={"model": "default", "input": "x", "tools": [shell]})
    error = error_of(r, 404)
    assert error["param"] == "tools[0].environment.skills[0].skill_id"


def test_background_cancel_mid_tool(server: AgentServer) -> None:
    server.use(by_round(call("python", code="import time\ntime.sleep(60)"), "never"))
    before = set(server.runtime.code._kernels)
    out = _create(server, input="Sleep.", tools=[CODE_TOOL], background=True)
    rid = out["id"]
    with server.http() as h:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            now = h.get(f"/v1/responses/{rid}").json()
            if any(i["type"] == "code_interpreter_call" for i in now["output"]):
                break
            time.sleep(0.1)
        time.sleep(0.5)  # the tool is running
        started = time.monotonic()
        cancelled = h.post(f"/v1/responses/{rid}/cancel").json()
    assert time.monotonic() - started < 10
    assert cancelled["status"] == "cancelled"
    check("Response", cancelled)
    alive = [
        k
        for sid, k in server.runtime.code._kernels.items()
        if sid not in before and k.proc.returncode is None
    ]
    assert alive == []
    server.use(by_round("Fine."))
    assert _create(server, input="Still there?")["output"][0]["content"][0]["text"] == "Fine."


def test_codex_web_search_without_external_access_is_left_out(server: AgentServer) -> None:
    server.use(by_round("Answered without search."))
    out = _create(server, input="hi", tools=[{"type": "web_search", "external_web_access": False}])
    assert _types(out) == ["message"]
    assert out["tools"] == [{"type": "web_search", "external_web_access": False}]  # echoed as sent


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tools": [CODE_TOOL], "tool_choice": {"type": "code_interpreter"}}, "tool_choice"),
        ({"tools": [{"type": "web_search"}], "tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
        (
            {
                "tools": [CODE_TOOL],
                "tool_choice": {
                    "type": "allowed_tools",
                    "mode": "auto",
                    "tools": [{"type": "code_interpreter"}],
                },
            },
            "tool_choice",
        ),
        ({"tools": [{"type": "code_interpreter", "container": "cntr_1"}]}, "tools[0].container"),
        (
            {
                "tools": [
                    {
                        "type": "shell",
                        "environment": {
                            "type": "local",
                            "skills": [{"name": "a", "description": "b", "path": "/x"}],
                        },
                    }
                ]
            },
            "tools[0].environment.type",
        ),
        ({"tools": [{"type": "web_search", "image_settings": {}}]}, "tools[0].image_settings"),
        (
            {"tools": [{"type": "web_search_preview", "return_token_budget": 5}]},
            "tools[0].return_token_budget",
        ),
        ({"tools": [CODE_TOOL], "max_tool_calls": 2}, "max_tool_calls"),
    ],
)
def test_rejections_name_the_field(server: AgentServer, body: dict[str, Any], param: str) -> None:
    with server.http() as h:
        r = h.post("/v1/responses", json={"model": "default", "input": "x", **body})
    assert error_of(r, 400)["param"] == param


def test_session_survives_a_restart(tmp_path: Path) -> None:
    from agent.agent_servers import agent_server

    first = agent_server(tmp_path, by_round("First answer."), enable_code_execution=True)
    try:
        with first.http() as h:
            r = h.post(
                "/v1/chat/completions",
                json={
                    "model": "default",
                    "messages": [{"role": "user", "content": "Remember me."}],
                    "session_id": "keep-1",
                },
            )
            assert r.status_code == 200, r.text
    finally:
        first.stop()
    second = agent_server(tmp_path, by_round("Second answer."), enable_code_execution=True)
    try:
        with second.http() as h:
            r = h.post(
                "/v1/chat/completions",
                json={
                    "model": "default",
                    "messages": [{"role": "user", "content": "Again."}],
                    "session_id": "keep-1",
                },
            )
            assert r.status_code == 200, r.text
            assert r.json()["session_id"] == "keep-1"
            exported = h.get("/v1/sessions/keep-1").json()
        prompt = second.model.prompts[-1]
        assert "Remember me." in prompt and "First answer." in prompt and "Again." in prompt
        assert [m["role"] for m in exported["messages"]] == ["user", "assistant", "user", "assistant"]
    finally:
        second.stop()


def test_server_keeps_serving_after_bad_requests(server: AgentServer) -> None:
    with server.http() as h:
        for bad in (
            {"input": "x", "tools": [{"type": "shell", "environment": "nope"}]},
            {"input": "x", "tools": "no"},
        ):
            assert h.post("/v1/responses", json={"model": "default", **bad}).status_code == 400
    server.use(by_round("ok"))
    assert _types(_create(server, input="hi")) == ["message"]


def test_health_after_everything(server: AgentServer) -> None:
    assert httpx.get(f"{server.live.base_url}/health").status_code == 200


def test_web_search_stream_events(server: AgentServer) -> None:
    server.use(by_round(call("web_search", query="kettles"), "Found it [1]."))
    body = {"model": "default", "input": "Search.", "tools": [{"type": "web_search"}], "stream": True}
    with server.http() as h:
        events = sse_events(h, "POST", "/v1/responses", body)
    final = check_stream(events)
    kinds = [e["type"] for e in events]
    for kind in (
        "response.web_search_call.in_progress",
        "response.web_search_call.searching",
        "response.web_search_call.completed",
    ):
        assert kind in kinds
    assert _types(final) == ["web_search_call", "message"]
    assert final["output"][1]["content"][0]["annotations"][0]["type"] == "url_citation"


def test_shell_stream_items(server: AgentServer) -> None:
    server.use(by_round(call("shell", commands=["echo from the stream"]), "Echoed."))
    body = {
        "model": "default",
        "input": "Echo.",
        "tools": [{"type": "shell", "environment": {"type": "container_auto"}}],
        "stream": True,
    }
    with server.http() as h:
        events = sse_events(h, "POST", "/v1/responses", body)
    final = check_stream(events)
    assert _types(final) == ["shell_call", "shell_call_output", "message"]
    assert "from the stream" in final["output"][1]["output"][0]["stdout"]


def test_server_ask_permission_on_responses(tmp_path: Path) -> None:
    """--agent-permission ask: the stream carries OpenAI's approval request item; answering it
    through POST /v1/agent/approvals/{id} lets the call run. Without a stream it is a 400."""
    import threading

    from agent.agent_servers import agent_server

    s = agent_server(
        tmp_path,
        by_round(call("python", code="print('with approval')"), "Approved."),
        enable_code_execution=True,
        agent_permission="ask",
    )
    try:
        with s.http() as h:
            plain = h.post("/v1/responses", json={"model": "default", "input": "x", "tools": [CODE_TOOL]})
            assert error_of(plain, 400)["param"] == "stream"
            events: list[dict[str, Any]] = []
            body = {"model": "default", "input": "Run.", "tools": [CODE_TOOL], "stream": True}
            with h.stream("POST", "/v1/responses", json=body) as r:
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    event = json.loads(line[6:])
                    events.append(event)
                    item = event.get("item") or {}
                    if (
                        event["type"] == "response.output_item.done"
                        and item.get("type") == "mcp_approval_request"
                    ):
                        url = f"{s.live.base_url}/v1/agent/approvals/{item['id']}"
                        answer = {"decision": "approve"}
                        threading.Thread(
                            target=httpx.post, args=(url,), kwargs={"json": answer}, daemon=True
                        ).start()
        final = check_stream(events)
        assert _types(final) == ["code_interpreter_call", "mcp_approval_request", "message"]
        assert "with approval" in final["output"][0]["outputs"][0]["logs"]
    finally:
        s.stop()


def test_context_filled_by_tool_results_is_incomplete(tmp_path: Path) -> None:
    from agent.agent_servers import agent_server

    s = agent_server(tmp_path, by_round("x"), max_model_len=1024, enable_code_execution=True)
    try:
        s.use(lambda prompt: call("python", code="print('z ' * 5000)"))
        out = _create(s, input="Print a lot.", tools=[CODE_TOOL])
        assert out["status"] == "incomplete"
        assert out["output"][0]["type"] == "code_interpreter_call"
    finally:
        s.stop()
