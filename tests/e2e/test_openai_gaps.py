"""What popular clients hit: explicit nulls, closed tool-call objects, and the
OpenAI endpoints this server leaves out (a clear error, not a bare 404)."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from live_server import LiveServer
from openai_schema import check, nullable_fields

HI = [{"role": "user", "content": "Say hi."}]


def post(live: LiveServer, path: str, body: dict[str, Any]) -> Any:
    with live.http() as http:
        return http.post(path, json=body)


@pytest.mark.parametrize("field", nullable_fields("CreateChatCompletionRequest"))
def test_chat_null_means_the_default(live_server: LiveServer, field: str) -> None:
    body: dict[str, Any] = {"model": "default", "messages": HI, "max_completion_tokens": 2, field: None}
    if field == "max_completion_tokens":
        body["max_tokens"] = 2
    res = post(live_server, "/v1/chat/completions", body)
    assert res.status_code == 200, res.text
    assert res.headers["content-type"].startswith("application/json")  # stream: null is not a stream
    check("CreateChatCompletionResponse", res.json())


@pytest.mark.parametrize("field", nullable_fields("CreateCompletionRequest"))
def test_completion_null_means_the_default(live_server: LiveServer, field: str) -> None:
    body: dict[str, Any] = {"model": "default", "prompt": "Once upon a time", "max_tokens": 2, field: None}
    res = post(live_server, "/v1/completions", body)
    assert res.status_code == 200, res.text
    data = res.json()
    check("CreateCompletionResponse", data)
    if field == "prompt":  # OpenAI's default prompt: the start of a new document
        assert data["usage"]["prompt_tokens"] == 1 and data["choices"][0]["text"]
    if field == "max_tokens":  # the legacy endpoint's default of 16
        assert data["usage"]["completion_tokens"] <= 16


@pytest.mark.parametrize(("path", "field"), [("/v1/chat/completions", "messages")])
def test_null_for_a_required_field_is_a_400(live_server: LiveServer, path: str, field: str) -> None:
    res = post(live_server, path, {"model": "default", field: None})
    assert res.status_code == 400
    assert res.json()["error"]["param"] == field


def test_forced_tool_call_names_only_the_schema_keys(client: openai.OpenAI) -> None:
    """The schema says nothing of additionalProperties: generated as if it said false."""
    tool = {
        "type": "function",
        "function": {
            "name": "square",
            "description": "Square a number.",
            "parameters": {"type": "object", "properties": {"input": {"type": "integer", "minimum": -1000}}},
        },
    }
    for seed in range(4):
        res = client.chat.completions.create(
            model="default",
            messages=[{"role": "user", "content": "What is 3 squared? Use the tool."}],
            tools=[tool],  # type: ignore[list-item]
            tool_choice={"type": "function", "function": {"name": "square"}},
            temperature=1.0,
            seed=seed,
            max_tokens=40,
        )
        calls = res.choices[0].message.tool_calls
        assert calls, res
        arguments = json.loads(calls[0].function.arguments)  # type: ignore[union-attr]
        assert set(arguments) <= {"input"}, arguments


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/moderations"),
        ("POST", "/v1/fine_tuning/jobs"),
        ("GET", "/v1/fine_tuning/jobs/ftjob-1"),
        ("POST", "/v1/batches"),
        ("POST", "/v1/assistants"),
        ("POST", "/v1/threads/thread_1/runs"),
        ("GET", "/v1/vector_stores"),
        ("POST", "/v1/containers"),
        ("POST", "/v1/uploads"),
    ],
)
def test_left_out_endpoints_say_what_to_use(live_server: LiveServer, method: str, path: str) -> None:
    with live_server.http() as http:
        res = http.request(method, path, json={})
    assert res.status_code == 404
    error = res.json()["error"]
    assert error["code"] == "unsupported_endpoint" and error["type"] == "invalid_request_error"
    assert "not supported" in error["message"] and len(error["message"]) > 40


def test_left_out_endpoint_through_the_client(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.moderations.create(input="hello")
    assert caught.value.code == "unsupported_endpoint"
    assert "chat" in caught.value.message
    assert client.models.list().data  # and the server keeps serving
