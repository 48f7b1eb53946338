"""The agent loop with the real default model (SmolLM2-135M): nothing is
scripted. The call is forced by `tool_choice` (the grammar makes the model
write it), the server executes it through --tool-dispatch-url, and the
model answers from the result in a second round."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from mistralrs_serve.config import AgentConfig, ServerConfig

from agent.agent_servers import WEATHER, DispatchServer, dispatch_server

sys.path.insert(0, str(Path(__file__).parent.parent / "e2e"))
from live_server import LiveServer, start_server, stop_server


@pytest.fixture(scope="module")
def dispatch() -> Iterator[DispatchServer]:
    yield from dispatch_server()


@pytest.fixture(scope="module")
def live(
    default_runner: Any, dispatch: DispatchServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    config = ServerConfig(
        data_dir=str(tmp_path_factory.mktemp("default-agent")),
        agent=AgentConfig(tool_dispatch_url=dispatch.base_url),
    )
    server = start_server(config, lambda: default_runner.client)
    yield server
    stop_server(server)


def test_forced_call_runs_server_side_then_the_model_answers(
    live: LiveServer, dispatch: DispatchServer
) -> None:
    dispatch.reply = lambda name, args: f"It is 21 degrees and sunny in {args.get('city')}."
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "tools": [WEATHER],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "max_tool_rounds": 1,
        "temperature": 0,
        "max_tokens": 48,
    }
    r = httpx.post(f"{live.base_url}/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    out = r.json()
    [entry] = out["agentic_tool_calls"]
    assert entry["name"] == "get_weather" and entry["status"] == "completed"
    arguments = json.loads(entry["arguments"])  # constrained decoding: valid JSON of the schema
    assert isinstance(arguments["city"], str)
    assert dispatch.calls[-1] == {"name": "get_weather", "arguments": arguments}
    assert entry["result"].startswith("It is 21 degrees")
    message = out["choices"][0]["message"]
    assert message["content"] and "tool_calls" not in message  # the second round answered in text
    assert out["choices"][0]["finish_reason"] in ("stop", "length")
    assert out["usage"]["completion_tokens"] > 0
