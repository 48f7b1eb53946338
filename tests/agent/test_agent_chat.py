"""The agent loop through Chat Completions, end to end on the real server
over the scripted model (agent_servers.py says what is scripted: only the
model's choice of tokens)."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.agent_servers import (
    CODE_TOOL,
    WEATHER,
    AgentServer,
    DispatchServer,
    agent_server,
    call,
    dispatch_server,
    offered,
)
from agent.fake_web import FakeWeb
from agent.scripted_model import by_round

sys.path.insert(0, str(Path(__file__).parent.parent / "e2e"))
from openai_schema import check


def _ok(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_code_interpreter_round_trip(server: AgentServer) -> None:
    server.use(by_round(call("python", code="print(6 * 7)"), "The answer is 42."))
    body = _ok(server.chat(messages=[{"role": "user", "content": "What is 6 times 7?"}], tools=[CODE_TOOL]))
    choice = body["choices"][0]
    assert choice["message"]["content"] == "The answer is 42."
    assert choice["finish_reason"] == "stop"
    assert "tool_calls" not in choice["message"]  # the server ran the call; the client has none to run
    [entry] = body["agentic_tool_calls"]
    assert (entry["round"], entry["name"], entry["type"], entry["status"]) == (
        0,
        "python",
        "code_interpreter",
        "completed",
    )
    assert json.loads(entry["arguments"]) == {"code": "print(6 * 7)"}
    assert "42" in entry["result"]
    assert body["session_id"].startswith("sess_")
    # the second round's prompt holds the tool's result, and offered the tools again
    second = server.model.prompts[-1]
    assert "<|im_start|>tool\n" in second and "42" in second.split("<|im_start|>tool\n")[1]
    assert {"python", "python_reset"} <= set(offered(second))
    assert body["usage"]["prompt_tokens"] > len(second) // 8  # both rounds' prompts are counted


def test_code_interpreter_streamed(server: AgentServer) -> None:
    server.use(by_round(call("python", code="x = 5\nprint(x * 2)"), "Ten."))
    chunks = server.chat_stream(messages=[{"role": "user", "content": "Double five."}], tools=[CODE_TOOL])
    for chunk in chunks:
        check("CreateChatCompletionStreamResponse", chunk)  # the agent's extra fields included
    events = [c["agentic_event"] for c in chunks if c.get("agentic_event")]
    assert [e["type"] for e in events] == ["tool_call.started", "tool_call.completed"]
    assert events[1]["name"] == "python" and "10" in events[1]["result"]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert not any(d.get("tool_calls") for d in deltas)  # the server-side call is not the client's
    assert "".join(d.get("content") or "" for d in deltas) == "Ten."
    last = [c for c in chunks if c["choices"]][-1]
    assert last["choices"][0]["finish_reason"] == "stop"
    assert last["session_id"].startswith("sess_")


def test_interpreter_state_lives_in_the_session(server: AgentServer) -> None:
    server.use(by_round(call("python", code="counter = 41"), "Stored."))
    first = _ok(server.chat(messages=[{"role": "user", "content": "Remember 41."}], tools=[CODE_TOOL]))
    session = first["session_id"]
    server.use(by_round(call("python", code="print(counter + 1)"), "Done."))
    second = _ok(
        server.chat(messages=[{"role": "user", "content": "Add one."}], tools=[CODE_TOOL], session_id=session)
    )
    assert second["session_id"] == session
    assert "42" in second["agentic_tool_calls"][0]["result"]
    # the session's history came before the new turn
    assert "Remember 41." in server.model.prompts[-1]


def test_web_search_with_citations(server: AgentServer, web: FakeWeb) -> None:
    server.use(by_round(call("web_search", query="how do kettles work"), "Kettles boil water [1]."))
    body = _ok(
        server.chat(messages=[{"role": "user", "content": "How do kettles work?"}], web_search_options={})
    )
    assert body["choices"][0]["message"]["content"] == "Kettles boil water [1]."
    [entry] = body["agentic_tool_calls"]
    assert entry["type"] == "web_search" and entry["status"] == "completed"
    assert "how do kettles work" in web.queries
    assert entry["citations"][0]["url"] == web.url("/kettle")
    assert web.url("/kettle") in entry["result"]
    [note] = body["choices"][0]["message"]["annotations"]
    cite = note["url_citation"]
    assert note["type"] == "url_citation" and cite["url"] == web.url("/kettle")
    assert body["choices"][0]["message"]["content"][cite["start_index"] : cite["end_index"]] == "[1]"
    check("CreateChatCompletionResponse", body)


def test_open_page_reads_the_article(server: AgentServer, web: FakeWeb) -> None:
    server.use(by_round(call("open_page", url=web.url("/kettle")), "It has an element."))
    body = _ok(server.chat(messages=[{"role": "user", "content": "Read it."}], web_search_options={}))
    result = body["agentic_tool_calls"][0]["result"]
    assert "heating element" in result
    assert "Copyright" not in result  # boilerplate removed


def test_round_cap_then_an_answer_without_tools(server: AgentServer) -> None:
    def script(prompt: str) -> str:
        return call("python", code="print(1)") if "python" in offered(prompt) else "Out of rounds."

    server.use(script)
    body = _ok(
        server.chat(messages=[{"role": "user", "content": "Loop."}], tools=[CODE_TOOL], max_tool_rounds=2)
    )
    assert [c["round"] for c in body["agentic_tool_calls"]] == [0, 1]
    assert body["choices"][0]["message"]["content"] == "Out of rounds."
    assert offered(server.model.prompts[-1]) == []  # the last round had no server tools


def test_server_flag_caps_rounds(server: AgentServer) -> None:
    server.use(lambda prompt: call("python", code="print(1)") if offered(prompt) else "Capped.")
    body = _ok(server.chat(messages=[{"role": "user", "content": "Loop again."}], tools=[CODE_TOOL]))
    assert len(body["agentic_tool_calls"]) == 3  # --max-tool-rounds 3 (the fixture)
    assert body["choices"][0]["message"]["content"] == "Capped."


def test_client_function_tool_ends_the_loop(server: AgentServer) -> None:
    server.use(by_round(call("get_weather", city="Paris")))
    body = _ok(server.chat(messages=[{"role": "user", "content": "Weather?"}], tools=[CODE_TOOL, WEATHER]))
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    [tool_call] = choice["message"]["tool_calls"]
    assert tool_call["function"]["name"] == "get_weather"
    assert body["agentic_tool_calls"] == []


def test_python_error_goes_back_to_the_model(server: AgentServer) -> None:
    server.use(by_round(call("python", code="1 / 0"), "It failed."))
    body = _ok(server.chat(messages=[{"role": "user", "content": "Divide."}], tools=[CODE_TOOL]))
    entry = body["agentic_tool_calls"][0]
    assert entry["is_error"] and "ZeroDivisionError" in entry["result"]
    assert "ZeroDivisionError" in server.model.prompts[-1]


def test_required_files(server: AgentServer) -> None:
    code = "open('report.txt', 'w').write('all good')"
    server.use(by_round(call("python", code=code), "Written."))
    body = _ok(
        server.chat(
            messages=[{"role": "user", "content": "Write the report."}],
            tools=[CODE_TOOL],
            files=["report.txt", "missing.csv"],
        )
    )
    assert "report.txt, missing.csv" in server.model.prompts[0]  # the model was told what to produce
    names = [f["filename"] for f in body["files"]]
    assert "report.txt" in names
    assert body["missing_files"] == ["missing.csv"]
    report = next(f for f in body["files"] if f["filename"] == "report.txt")
    with server.http() as h:
        assert h.get(f"/v1/files/{report['id']}/content").content == b"all good"


def test_shell_runs_in_the_session_directory(server: AgentServer) -> None:
    server.use(by_round(call("python", code="open('note.txt', 'w').write('hi')"), "ok"))
    session = _ok(server.chat(messages=[{"role": "user", "content": "Note."}], tools=[CODE_TOOL]))[
        "session_id"
    ]
    server.use(
        by_round(call("shell", commands=["cat note.txt", "echo made > shell.txt", "exit 3"]), "Read it.")
    )
    body = _ok(
        server.chat(
            messages=[{"role": "user", "content": "Read the note."}],
            tools=[{"type": "shell", "environment": {"type": "container_auto"}}],
            session_id=session,
        )
    )
    result = body["agentic_tool_calls"][0]["result"]
    assert "hi" in result and "3" in result
    [made] = [f for f in body["files"] if f["filename"] == "shell.txt"]  # a file the shell wrote
    with server.http() as h:
        assert h.get(f"/v1/files/{made['id']}/content").content == b"made\n"


def test_disconnect_mid_tool_stops_the_run(server: AgentServer) -> None:
    server.use(by_round(call("python", code="import time\ntime.sleep(60)"), "never"))
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": "Sleep."}],
        "tools": [CODE_TOOL],
        "stream": True,
    }
    before = set(server.runtime.code._kernels)
    started = time.monotonic()
    with server.http() as h, h.stream("POST", "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if "tool_call.started" in line:
                break  # leave while the tool runs
    server.live.wait_idle(10)
    # the interpreter of that run was killed: the server answers at once, and nothing is left running
    server.use(by_round("Still here."))
    assert _ok(server.chat(messages=[{"role": "user", "content": "Hi"}]))["choices"][0]["message"]["content"]
    assert time.monotonic() - started < 50
    kernels = server.runtime.code._kernels
    alive = [k for sid, k in kernels.items() if sid not in before and k.proc.returncode is None]
    assert alive == []


@pytest.fixture(scope="module")
def dispatch() -> Iterator[DispatchServer]:
    yield from dispatch_server()


@pytest.fixture(scope="module")
def dispatch_agent(
    tmp_path_factory: pytest.TempPathFactory, dispatch: DispatchServer
) -> Iterator[AgentServer]:
    s = agent_server(
        tmp_path_factory.mktemp("dispatch-data"), by_round("Hello."), tool_dispatch_url=dispatch.base_url
    )
    yield s
    s.stop()


def test_function_tool_dispatched_server_side(dispatch_agent: AgentServer, dispatch: DispatchServer) -> None:
    dispatch.reply = lambda name, args: f"sunny in {args['city']}"
    dispatch_agent.use(by_round(call("get_weather", city="Paris"), "It is sunny in Paris."))
    body = _ok(
        dispatch_agent.chat(messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER])
    )
    assert body["choices"][0]["message"]["content"] == "It is sunny in Paris."
    assert dispatch.calls[-1] == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert body["agentic_tool_calls"][0]["result"] == "sunny in Paris"


def _approve_when_asked(
    server: AgentServer,
    decision: str,
    remember: bool = False,
    session_id: str | None = None,
    text: str = "Run it.",
) -> Any:
    """Stream a request that needs approval; answer it from another client; the chunks."""
    chunks: list[dict[str, Any]] = []
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": text}],
        "tools": [CODE_TOOL],
        "agent_permission": "ask",
        "stream": True,
        **({"session_id": session_id} if session_id else {}),
    }
    with server.http() as h, h.stream("POST", "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            chunks.append(chunk)
            event = chunk.get("agentic_event") or {}
            if event.get("type") == "approval.requested":
                url = f"{server.live.base_url}/v1/agent/approvals/{event['approval_id']}"
                answer = {"decision": decision, "remember_for_session": remember}
                threading.Thread(target=httpx.post, args=(url,), kwargs={"json": answer}, daemon=True).start()
    return chunks


def test_ask_then_approve(server: AgentServer) -> None:
    server.use(by_round(call("python", code="print('approved run')"), "Ran."))
    chunks = _approve_when_asked(server, "approve")
    done = [
        c["agentic_event"]
        for c in chunks
        if (c.get("agentic_event") or {}).get("type") == "tool_call.completed"
    ]
    assert done and done[0]["status"] == "completed" and "approved run" in done[0]["result"]


def test_ask_then_deny(server: AgentServer) -> None:
    server.use(by_round(call("python", code="print('should not run')"), "Not allowed."))
    chunks = _approve_when_asked(server, "deny")
    done = [
        c["agentic_event"]
        for c in chunks
        if (c.get("agentic_event") or {}).get("type") == "tool_call.completed"
    ]
    assert done[0]["status"] == "denied" and "should not run" not in done[0]["result"]
    assert "denied" in server.model.prompts[-1]


def test_deny_permission_never_runs(server: AgentServer, tmp_path: Path) -> None:
    server.use(by_round(call("python", code="open('/tmp/ran', 'w')"), "Refused."))
    body = _ok(
        server.chat(
            messages=[{"role": "user", "content": "Try."}],
            tools=[CODE_TOOL],
            code_execution_permission="deny",
        )
    )
    assert body["agentic_tool_calls"][0]["status"] == "denied"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tools": [{"type": "code_interpreter", "container": "cntr_123"}]}, "tools[0].container"),
        (
            {"tools": [{"type": "code_interpreter", "container": {"type": "auto", "file_ids": ["f"]}}]},
            "tools[0].container.file_ids",
        ),
        (
            {"tools": [{"type": "code_interpreter", "container": {"type": "auto", "memory_limit": "4g"}}]},
            "tools[0].container.memory_limit",
        ),
        (
            {"tools": [{"type": "web_search", "search_content_types": ["image"]}]},
            "tools[0].search_content_types",
        ),
        (
            {"tools": [{"type": "web_search_preview", "filters": {"allowed_domains": ["a.com"]}}]},
            "tools[0].filters",
        ),
        (
            {
                "tools": [
                    {"type": "web_search", "filters": {"allowed_domains": [f"d{i}.com" for i in range(101)]}}
                ]
            },
            "tools[0].filters.allowed_domains",
        ),
        ({"tools": [{"type": "shell", "environment": {"type": "local"}}]}, "tools[0].environment.type"),
        (
            {
                "tools": [
                    {"type": "shell", "environment": {"type": "container_reference", "container_id": "c"}}
                ]
            },
            "tools[0].environment.type",
        ),
        (
            {
                "tools": [
                    {
                        "type": "shell",
                        "environment": {
                            "type": "container_auto",
                            "skills": [{"type": "inline", "name": "x"}],
                        },
                    }
                ]
            },
            "tools[0].environment.skills[0].type",
        ),
        ({"tools": [CODE_TOOL], "max_tool_calls": 3}, "max_tool_calls"),
        ({"tools": [CODE_TOOL], "max_tool_rounds": 0}, "max_tool_rounds"),
        ({"tools": [CODE_TOOL], "agent_permission": "maybe"}, "agent_permission"),
        ({"tools": [CODE_TOOL], "agent_permission": "ask"}, "agent_permission"),  # ask needs a stream
        ({"tools": [CODE_TOOL], "session_id": "../etc"}, "session_id"),
        ({"tools": [CODE_TOOL], "files": ["../outside.txt"]}, "files[0]"),
        ({"tools": [CODE_TOOL], "n": 2}, "n"),
        ({"tools": [CODE_TOOL], "tool_choice": {"type": "code_interpreter"}}, "tool_choice"),
    ],
)
def test_rejections_name_the_field(server: AgentServer, body: dict[str, Any], param: str) -> None:
    r = server.chat(messages=[{"role": "user", "content": "x"}], **body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error"


def test_unservable_hosted_tool_is_left_out(tmp_path: Path) -> None:
    """Codex sends web_search with external_web_access false on every turn: left out, not refused."""
    s = agent_server(tmp_path, by_round("Plain answer."))
    try:
        body = _ok(
            s.chat(
                messages=[{"role": "user", "content": "hi"}],
                tools=[{"type": "web_search", "external_web_access": False}, CODE_TOOL],
            )
        )
        assert body["choices"][0]["message"]["content"] == "Plain answer."
        assert offered(s.model.prompts[-1]) == []  # neither tool reached the model (search off, code off)
    finally:
        s.stop()


def test_approval_remembered_for_the_session(server: AgentServer) -> None:
    server.use(by_round(call("python", code="print('first')"), "One."))
    chunks = _approve_when_asked(server, "approve", remember=True, session_id="remember-me")
    assert any((c.get("agentic_event") or {}).get("type") == "approval.requested" for c in chunks)
    server.use(by_round(call("python", code="print('second')"), "Two."))
    # never asked: the answer was remembered (a "deny" here would show if it were)
    again = _approve_when_asked(server, "deny", session_id="remember-me", text="Run it again.")
    types = [(c.get("agentic_event") or {}).get("type") for c in again]
    assert "approval.requested" not in types
    done = [
        c["agentic_event"]
        for c in again
        if (c.get("agentic_event") or {}).get("type") == "tool_call.completed"
    ]
    assert done[0]["status"] == "completed" and "second" in done[0]["result"]


@pytest.mark.parametrize(
    ("tool", "script_call", "expect"),
    [
        ({"type": "web_search"}, call("web_search", query="kettles"), "How kettles work"),
        (
            {"type": "shell", "environment": {"type": "container_auto"}},
            call("shell", commands=["echo streamed"]),
            "streamed",
        ),
    ],
)
def test_other_tools_streamed(
    server: AgentServer, tool: dict[str, Any], script_call: str, expect: str
) -> None:
    server.use(by_round(script_call, "Done."))
    chunks = server.chat_stream(messages=[{"role": "user", "content": f"Use {tool['type']}."}], tools=[tool])
    done = [
        c["agentic_event"]
        for c in chunks
        if (c.get("agentic_event") or {}).get("type") == "tool_call.completed"
    ]
    assert done[0]["status"] == "completed" and expect in done[0]["result"]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == "Done."


@pytest.mark.parametrize(
    ("code", "expect"),
    [
        ("x = bytearray(4 * 1024 ** 3)", "MemoryError"),
        ("import os\nwhile True:\n    os.fork()", ""),
        ("print('y' * 10_000_000)", "truncated"),
        ("open('/etc/passwd-copy', 'w')", "Error"),
        ("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=3)", "Error"),
    ],
    ids=["memory", "fork-bomb", "huge-print", "write-outside", "network"],
)
def test_hostile_code_through_the_server(server: AgentServer, code: str, expect: str) -> None:
    """Stopped or denied inside the sandbox; the server keeps serving and the session's next call works."""
    server.use(by_round(call("python", code=code), "Contained."))
    first = _ok(server.chat(messages=[{"role": "user", "content": f"Try {code[:20]}"}], tools=[CODE_TOOL]))
    entry = first["agentic_tool_calls"][0]
    assert entry["is_error"] or expect == "truncated", entry
    assert expect in entry["result"]
    assert len(entry["result"]) < 200_000  # output capped
    server.use(by_round(call("python", code="print('next call works')"), "Fine."))
    second = _ok(
        server.chat(
            messages=[{"role": "user", "content": "Again."}],
            tools=[CODE_TOOL],
            session_id=first["session_id"],
        )
    )
    assert "next call works" in second["agentic_tool_calls"][0]["result"]


def test_results_past_the_context_end_the_loop_cleanly(tmp_path: Path) -> None:
    """A tool result is cut to what the model can read; when the conversation still outgrows the
    context, the run ends with finish_reason length and what it has, not an error."""
    s = agent_server(tmp_path, by_round("x"), max_model_len=1024, enable_code_execution=True)
    try:
        s.use(lambda prompt: call("python", code="print('z ' * 5000)"))  # calls again every round
        body = _ok(s.chat(messages=[{"role": "user", "content": "Print a lot."}], tools=[CODE_TOOL]))
        assert body["choices"][0]["finish_reason"] == "length"
        calls = body["agentic_tool_calls"]
        assert calls and len(calls[0]["result"]) > 9_000  # the client gets the whole result
        with s.http() as h:
            kept = h.get(f"/v1/sessions/{body['session_id']}").json()["messages"]
        tool_message = next(m for m in kept if m["role"] == "tool")
        assert "more characters cut" in tool_message["content"]  # the model's copy was cut
        assert len(tool_message["content"]) < len(calls[0]["result"])
    finally:
        s.stop()
