"""MCP servers' tools in the agent loop, end to end: a small stdio MCP server
written for the tests (mcp_echo_server.py, the official SDK) configured with
--mcp-config, the real server over the scripted model (agent_servers.py says
what is scripted)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.agent_servers import AgentServer, agent_server, call, offered
from agent.scripted_model import by_round

ECHO_SERVER = Path(__file__).with_name("mcp_echo_server.py")
ADD = {
    "type": "function",
    "function": {
        "name": "echo__add",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}},
    },
}


@pytest.fixture(scope="module")
def mcp_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentServer]:
    root = tmp_path_factory.mktemp("mcp")
    config = root / "mcp.json"
    config.write_text(
        json.dumps({"mcpServers": {"echo": {"command": sys.executable, "args": [str(ECHO_SERVER)]}}})
    )
    s = agent_server(root / "data", by_round("Hello."), mcp_config=str(config))
    yield s
    s.stop()


def _ok(server: AgentServer, path: str, body: dict[str, Any]) -> dict[str, Any]:
    with server.http() as h:
        r = h.post(path, json={"model": "default", **body})
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_mcp_tools_join_an_agentic_request(mcp_server: AgentServer) -> None:
    mcp_server.use(by_round(call("echo__add", a=2, b=3), "Five."))
    body = _ok(
        mcp_server,
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "Add 2 and 3."}], "max_tool_rounds": 2},
    )
    assert body["choices"][0]["message"]["content"] == "Five."
    [entry] = body["agentic_tool_calls"]
    assert (entry["name"], entry["result"], entry["status"]) == ("echo__add", "5", "completed")
    assert {"echo__echo", "echo__add", "echo__fail"} <= set(offered(mcp_server.model.prompts[0]))


def test_mcp_error_result_goes_back_to_the_model(mcp_server: AgentServer) -> None:
    mcp_server.use(by_round(call("echo__fail", message="disk full"), "It failed."))
    body = _ok(
        mcp_server,
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "Fail."}], "max_tool_rounds": 1},
    )
    entry = body["agentic_tool_calls"][0]
    assert entry["is_error"] and "disk full" in entry["result"]
    assert "disk full" in mcp_server.model.prompts[-1]


def test_a_declared_function_an_mcp_server_has_runs_server_side(mcp_server: AgentServer) -> None:
    """Responses: the client declares echo__add; the server executes it (an mcp_call item)."""
    mcp_server.use(by_round(call("echo__add", a=20, b=22), "Forty-two."))
    out = _ok(mcp_server, "/v1/responses", {"input": "Add.", "tools": [ADD]})
    assert [i["type"] for i in out["output"]] == ["mcp_call", "message"]
    item = out["output"][0]
    assert (item["name"], item["output"], item["error"], item["status"]) == (
        "echo__add",
        "42",
        None,
        "completed",
    )
    assert json.loads(item["arguments"]) == {"a": 20, "b": 22}


def test_plain_requests_do_not_engage_the_loop(mcp_server: AgentServer) -> None:
    mcp_server.use(by_round("Plain."))
    body = _ok(mcp_server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi."}]})
    assert "agentic_tool_calls" not in body and "session_id" not in body
    assert offered(mcp_server.model.prompts[-1]) == []


def test_a_bad_mcp_config_fails_the_start_before_the_model_loads(tmp_path: Path) -> None:
    from mistralrs_serve.agent.mcp_tools import McpConfigError
    from mistralrs_serve.config import AgentConfig, ServerConfig
    from mistralrs_serve.entrypoints.openai.api_server import ServerState

    bad = tmp_path / "mcp.json"
    bad.write_text(json.dumps({"mcpServers": {"x": {}}}))
    with pytest.raises(McpConfigError, match="server 'x'"):
        ServerState(ServerConfig(data_dir=str(tmp_path / "data"), agent=AgentConfig(mcp_config=str(bad))))
