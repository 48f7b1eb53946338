"""Prompts longer than the context: `truncation`, and the first request the
Codex CLI sends (tests/data/clients/). They run on a server of their own with
a 4,096-token context, so that what fits is prefilled in reasonable time on a
CPU; the default model's own 8,192 tokens would take minutes."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from live_server import LiveServer, start_server, stop_server
from mistralrs_serve.config import EngineConfig, ServerConfig
from openai_schema import check
from responses_checks import check_stream, error_of, sse_events

CONTEXT = 4096
DATA = Path(__file__).resolve().parents[1] / "data"
PLACEHOLDER = re.compile(r"^<(\d+) characters of Codex's own \w+ text>$")
# The prose that stands in for Codex's texts packs more characters into a token than Codex's own
# (markdown, code and paths): 1.3 times their length brings the prompt to the real one's ~9,900 tokens.
DENSITY = 1.3
QUESTION = "What is the capital of France? Answer in one sentence."


@pytest.fixture(scope="module")
def small() -> Iterator[LiveServer]:
    from mistralrs_serve import Runner

    runner = Runner(engine_config=EngineConfig(max_model_len=CONTEXT))
    live = start_server(ServerConfig(max_body_bytes=1 << 22, keepalive_s=0.5), lambda: runner.client)
    yield live
    stop_server(live)
    runner.client.shutdown()


def long_http(live: LiveServer) -> httpx.Client:
    return httpx.Client(base_url=live.base_url, timeout=600)  # a context-filling prompt on a busy CPU


def test_truncation_auto_drops_the_oldest_items(small: LiveServer) -> None:
    long = " ".join(["the quick brown fox jumps over the lazy dog"] * 9)  # ~90 tokens
    given = [{"role": "user", "content": f"{i}: {long}"} for i in range(50)] + [
        {"role": "user", "content": QUESTION}
    ]
    # max_output_tokens is room the prompt must leave: 3,000 of 4,096 (the answer stops at its ".").
    body = {"input": given, "max_output_tokens": 3000, "stop": ["."], "temperature": 0}
    with long_http(small) as http:
        assert error_of(http.post("/v1/responses", json=body), 400)["param"] == "input"
        res = http.post("/v1/responses", json={**body, "truncation": "auto"})
        assert res.status_code == 200, res.text
        obj = res.json()
        check("Response", obj)
        assert obj["truncation"] == "auto" and obj["usage"]["input_tokens"] <= CONTEXT - 3000
        assert obj["output"][0]["content"][0]["text"].startswith("The capital of France is Paris")
        items = http.get(f"/v1/responses/{obj['id']}/input_items", params={"limit": 100}).json()
        assert len(items["data"]) == 51 and not items["has_more"]  # the stored input is what was sent
        alone = {"input": [{"role": "user", "content": long * 50}], "truncation": "auto"}
        assert (
            error_of(http.post("/v1/responses", json=alone), 400)["param"] == "input"
        )  # the last item stays


def codex_request() -> tuple[dict[str, str], dict[str, Any]]:
    captured = json.loads((DATA / "clients" / "codex-0.171-responses-request.json").read_text())
    prose = (DATA / "sample_text.md").read_text()

    def restore(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: restore(v) for k, v in value.items()}
        if isinstance(value, list):
            return [restore(v) for v in value]
        match = PLACEHOLDER.match(value) if isinstance(value, str) else None
        if match is None:
            return value
        size = int(int(match[1]) * DENSITY)
        return (prose * (size // len(prose) + 1))[:size]

    headers = {k: v for k, v in captured["headers"].items() if k in ("accept", "session-id", "originator")}
    return headers, restore(captured["body"])


def test_codex_first_turn_and_the_next(small: LiveServer) -> None:
    """Too long as it comes; accepted with `truncation: "auto"`; then the next turn, sent whole
    again with the first turn's output items (Codex uses `store: false`)."""
    headers, body = codex_request()
    assert body["store"] is False and body["stream"] is True
    with long_http(small) as http:
        http.headers.update(headers)
        assert error_of(http.post("/v1/responses", json=body), 400)["param"] == "input"
        first = {**body, "truncation": "auto", "max_output_tokens": 16}
        final = check_stream(sse_events(http, "POST", "/v1/responses", first))
        assert final["status"] in ("completed", "incomplete") and final["store"] is False
        assert final["usage"]["input_tokens"] <= CONTEXT - 16
        assert [t["type"] for t in final["tools"]][-2:] == ["function", "web_search"]
        assert http.get(f"/v1/responses/{final['id']}").status_code == 404  # store: false

        # Turn two: the whole conversation again, with a reasoning item this server sealed.
        seal = small.app.state.server.responses.seal
        thought = {
            "type": "reasoning",
            "id": "rs_1",
            "summary": [],
            "encrypted_content": seal.seal("Greet back."),
        }
        user = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Thanks!"}]}
        second = {**first, "input": [*body["input"], thought, *final["output"], user]}
        final = check_stream(sse_events(http, "POST", "/v1/responses", second))
        assert final["status"] in ("completed", "incomplete")


def test_server_default_truncation_applies_when_a_request_does_not_say(small: LiveServer) -> None:
    """--default-truncation auto: for clients (Codex) that never send `truncation`."""
    engine = small.app.state.server.client
    auto = start_server(ServerConfig(max_body_bytes=1 << 22, default_truncation="auto"), lambda: engine)
    try:
        long = " ".join(["the quick brown fox jumps over the lazy dog"] * 9)
        given = [{"role": "user", "content": f"{i}: {long}"} for i in range(50)]
        body = {"input": [*given, {"role": "user", "content": QUESTION}], "max_output_tokens": 3000}
        body |= {"stop": ["."], "temperature": 0}
        with long_http(auto) as http:
            res = http.post("/v1/responses", json=body)
            assert res.status_code == 200, res.text
            assert res.json()["truncation"] == "auto"
            refused = http.post("/v1/responses", json={**body, "truncation": "disabled"})
            assert error_of(refused, 400)["param"] == "input"  # a request that says still decides
    finally:
        stop_server(auto)
