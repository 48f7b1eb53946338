"""Bad input to the Responses API: each a 4xx in OpenAI's envelope naming the
field, and the server keeps serving. Explicit nulls mean the defaults."""

from __future__ import annotations

from typing import Any

import pytest
from live_server import LiveServer
from openai_schema import check
from responses_checks import error_of

USER = [{"role": "user", "content": "hi"}]
WEB = {"type": "web_search_preview"}


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"input": [{"type": "wat"}]}, 400, "input[0].type"),
        (
            {"input": [{"type": "function_call_output", "call_id": "c9", "output": "x"}]},
            400,
            "input[0].call_id",
        ),
        ({"input": "hi", "previous_response_id": "resp_unknown"}, 404, "previous_response_id"),
        ({"input": "hi", "metadata": {f"k{i}": "v" for i in range(17)}}, 400, "metadata"),
        ({"input": "hi", "metadata": {"k" * 65: "v"}}, 400, "metadata"),
        ({"input": "hi", "metadata": {"k": "v" * 513}}, 400, "metadata"),
        ({"input": "hi", "metadata": {"k": 1}}, 400, "metadata"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            400,
            "input[0].content[0]",
        ),
        ({"input": [{"role": "wizard", "content": "x"}]}, 400, "input[0].role"),
        (
            {"input": [{"type": "reasoning", "summary": [], "encrypted_content": "forged"}]},
            400,
            "input[0].encrypted_content",
        ),
        ({"input": "hi", "tools": [WEB], "tool_choice": WEB}, 400, "tool_choice"),
        ({"input": "hi", "tools": [{"type": "bogus"}]}, 400, "tools[0].type"),
        ({"input": "hi", "tools": [{"type": "function", "name": "bad name"}]}, 400, "tools[0].name"),
        ({"input": "hi", "tool_choice": "required"}, 400, "tool_choice"),
        ({"input": "hi", "background": True, "store": False}, 400, "store"),
        ({"input": "hi", "truncation": "sideways"}, 400, "truncation"),
        ({"input": "hi", "include": ["everything"]}, 400, "include"),
        ({"input": "hi", "text": {"format": {"type": "xml"}}}, 400, "text.format.type"),
        ({"input": "hi", "reasoning": {"effort": "turbo"}}, 400, "reasoning.effort"),
        ({"input": "hi", "max_output_tokens": -1}, 400, "max_output_tokens"),
        ({"input": "hi", "temperature": 7}, 400, "temperature"),
        ({"input": "hi", "max_tool_calls": 3}, 400, "max_tool_calls"),
        ({"input": "hi", "conversation": "conv_1"}, 400, "conversation"),
        ({"input": []}, 400, "input"),
        ({}, 400, "input"),
        ({"input": "hi", "model": "gpt-nope"}, 404, "model"),
        ({"input": "hi", "stream": "often"}, 400, "stream"),
    ],
)
def test_bad_requests_name_the_field(
    live_server: LiveServer, body: dict[str, Any], status: int, param: str
) -> None:
    with live_server.http() as http:
        assert error_of(http.post("/v1/responses", json=body), status)["param"] == param
        ok = http.post("/v1/responses", json={"input": "hi", "max_output_tokens": 2})
        assert ok.status_code == 200  # still serving


def test_unknown_ids_and_malformed_bodies(live_server: LiveServer) -> None:
    with live_server.http() as http:
        for method, path in [
            ("GET", "/v1/responses/resp_nope"),
            ("DELETE", "/v1/responses/resp_nope"),
            ("POST", "/v1/responses/resp_nope/cancel"),
            ("GET", "/v1/responses/resp_nope/input_items"),
            ("GET", "/v1/responses/resp_nope?stream=true"),
        ]:
            assert error_of(http.request(method, path), 404)["code"] == "not_found"
        error_of(
            http.post("/v1/responses", content=b"{not json", headers={"content-type": "application/json"}),
            400,
        )
        error_of(http.post("/v1/responses", json=["a list"]), 400)
        error_of(http.get("/v1/responses/resp_nope?stream=maybe"), 400)


def test_nulls_mean_the_defaults(live_server: LiveServer) -> None:
    nullable = [
        "instructions", "previous_response_id", "max_output_tokens", "temperature", "top_p", "stop", "n",
        "presence_penalty", "frequency_penalty", "logit_bias", "seed", "logprobs", "top_logprobs", "include",
        "metadata", "parallel_tool_calls", "store", "background", "stream", "stream_options", "text",
        "response_format", "reasoning", "tools", "tool_choice", "truncation", "max_tool_calls", "user",
        "safety_identifier", "prompt_cache_key", "prompt_cache_retention", "service_tier", "conversation",
        "prompt", "top_k", "min_p", "repetition_penalty", "grammar", "model",
    ]  # fmt: skip
    with live_server.http() as http:
        res = http.post(
            "/v1/responses", json={"input": "hi", **dict.fromkeys(nullable), "max_output_tokens": 3}
        )
        assert res.status_code == 200, res.text
        obj = res.json()
        check("Response", obj)
        assert (
            obj["store"] is True
            and obj["tool_choice"] == "auto"
            and obj["text"] == {"format": {"type": "text"}}
        )
        for field in nullable:  # one at a time too
            one = http.post("/v1/responses", json={"input": "hi", field: None, "max_output_tokens": 2})
            assert one.status_code == 200, (field, one.text)
