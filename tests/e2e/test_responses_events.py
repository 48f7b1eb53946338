"""The Responses event builder on scripted engine outputs (no model): every
event and the final object valid against OpenAI's schema, sequence numbers
counting up from 0, item ids stable from `added` to `done`, one terminal event."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from mistralrs_serve.engine.sequence import StepOutput
from mistralrs_serve.entrypoints.openai.chat_output import ChoiceParser
from mistralrs_serve.entrypoints.openai.reasoning import ReasoningParser
from mistralrs_serve.entrypoints.openai.responses_protocol import ResponsesRequest, response_object
from mistralrs_serve.entrypoints.openai.responses_seal import ReasoningSeal
from mistralrs_serve.entrypoints.openai.responses_stream import ResponseStream
from mistralrs_serve.entrypoints.openai.responses_tools import convert_tools
from mistralrs_serve.entrypoints.openai.tool_parsers import get_format
from responses_checks import check_stream

TOOLS = [
    {"type": "function", "name": "get_weather", "parameters": {"type": "object"}, "strict": False},
    {
        "type": "namespace",
        "name": "shell",
        "description": "d",
        "tools": [{"type": "function", "name": "run"}],
    },
    {"type": "custom", "name": "patch"},
    {"type": "web_search"},
]


def build(
    texts: list[str], finish: str = "stop", thinking: bool = False, seal: Any = None
) -> list[dict[str, Any]]:
    tools = convert_tools(TOOLS)
    req = ResponsesRequest(input="hi", tools=TOOLS)
    obj = response_object(
        req,
        response_id="resp_x",
        created_at=1,
        model="m",
        tools=tools.echo,
        text_format={"type": "text"},
        temperature=1.0,
        top_p=1.0,
    )
    reasoning = ReasoningParser() if thinking else None
    parser = ChoiceParser(reasoning, get_format("json").streamer(tools=tools.chat_tools))
    out = ResponseStream(obj, [parser], tools, None, num_prompt_tokens=7, want_logprobs=False, seal=seal)  # type: ignore[arg-type]
    events = out.created() + out.in_progress()
    for i, text in enumerate(texts):
        last = i == len(texts) - 1
        events += out.step(
            StepOutput(
                0, i, text, finish_reason=finish if last else None, num_cached_tokens=3 if last else None
            )
        )
    events += out.finish("completed")
    return events


def check_events(events: list[dict[str, Any]]) -> dict[str, Any]:
    return check_stream(events)


def test_text_answer() -> None:
    final = check_events(build(["Hel", "lo", " world", ""]))
    assert final["status"] == "completed" and final["output"][0]["content"][0]["text"] == "Hello world"
    assert final["usage"]["input_tokens_details"]["cached_tokens"] == 3
    assert final["usage"]["output_tokens"] == 4


def test_reasoning_then_text_with_encrypted_content(tmp_path: Path) -> None:
    seal = ReasoningSeal(tmp_path)
    events = build(["<think>", "let me", " see", "</think>", "Yes", ""], thinking=True, seal=seal)
    final = check_events(events)
    reasoning, message = final["output"]
    assert reasoning["type"] == "reasoning" and reasoning["content"][0]["text"] == "let me see"
    assert seal.open(reasoning["encrypted_content"]) == "let me see"
    assert message["content"][0]["text"] == "Yes"
    assert any(e["type"] == "response.reasoning_text.delta" for e in events)
    assert final["usage"]["output_tokens_details"]["reasoning_tokens"] >= 2


@pytest.mark.parametrize(
    ("name", "kind", "namespace"),
    [
        ("get_weather", "function_call", None),
        ("run", "function_call", "shell"),
        ("patch", "custom_tool_call", None),
    ],
)
def test_tool_calls(name: str, kind: str, namespace: str | None) -> None:
    args = '{"input": "diff"}' if kind == "custom_tool_call" else '{"city": "Paris"}'
    events = build(['{"name": "', name, '", "arguments": ', args, "}", ""])
    final = check_events(events)
    (call,) = final["output"]
    assert call["type"] == kind and call["name"] == name and call.get("namespace") == namespace
    if kind == "custom_tool_call":
        assert call["input"] == "diff"
        assert any(e["type"] == "response.custom_tool_call_input.done" for e in events)
    else:
        deltas = "".join(e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta")
        assert deltas == call["arguments"] == '{"city": "Paris"}'


def test_cut_short_is_incomplete() -> None:
    final = check_events(build(["one", " two"], finish="length"))
    assert final["status"] == "incomplete" and final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["output"][0]["status"] == "incomplete"


def test_empty_answer_still_has_a_message() -> None:
    final = check_events(build([""]))
    assert final["output"][0]["type"] == "message" and final["output"][0]["content"][0]["text"] == ""
