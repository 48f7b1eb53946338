"""The first request the Codex CLI sends (tests/data/clients/), with its long
texts restored to their lengths: too long for the default model's context
as it is, accepted with `truncation: "auto"`; then the next turn, sent whole
again with the first turn's output items, as Codex does under `store: false`."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from live_server import LiveServer
from responses_checks import check_stream, error_of, sse_events

DATA = Path(__file__).resolve().parents[1] / "data"
PLACEHOLDER = re.compile(r"^<(\d+) characters of Codex's own \w+ text>$")
# The prose that stands in for Codex's texts packs more characters into a token than Codex's own
# (markdown, code and paths): 1.3 times their length brings the prompt to the real one's ~9,900 tokens.
DENSITY = 1.3


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


def test_codex_first_turn_and_the_next(live_server: LiveServer) -> None:
    headers, body = codex_request()
    assert body["store"] is False and body["stream"] is True
    with live_server.http() as http:
        http.headers.update(headers)
        too_long = http.post("/v1/responses", json=body)
        assert error_of(too_long, 400)["param"] == "input"  # ~9,900 tokens; the context holds 8,192
        first = {**body, "truncation": "auto", "max_output_tokens": 16}
        events = sse_events(http, "POST", "/v1/responses", first)
        final = check_stream(events)
        assert final["status"] in ("completed", "incomplete") and final["store"] is False
        assert final["usage"]["input_tokens"] <= live_server.info.max_model_len - 16
        assert [t["type"] for t in final["tools"]][-2:] == ["function", "web_search"]
        assert http.get(f"/v1/responses/{final['id']}").status_code == 404  # store: false

        # Turn two: the whole conversation again, with a reasoning item this server sealed.
        seal = live_server.app.state.server.responses.seal
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
