"""Structured output and tool calls through the real server with the
default model (small and weak, which is the point: the grammar, not the
model, makes the output valid). Every response and chunk is checked
against OpenAI's schema."""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import openai
import pytest
from live_server import LiveServer
from openai_schema import checked_chat, checked_chat_stream
from tool_specs import ADD, WEATHER

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 16},
            "location": {
                "type": "object",
                "properties": {
                    "lat": {"type": "number", "minimum": -90, "maximum": 90},
                    "lon": {"type": "number", "minimum": -180, "maximum": 180},
                },
                "required": ["lat", "lon"],
                "additionalProperties": False,
            },
        },
        "required": ["city", "location"],
        "additionalProperties": False,
    },
    "array_enum": {
        "type": "object",
        "properties": {
            "colors": {
                "type": "array",
                "items": {"enum": ["red", "green", "blue"]},
                "minItems": 1,
                "maxItems": 3,
            },
            "ok": {"type": "boolean"},
        },
        "required": ["colors", "ok"],
        "additionalProperties": False,
    },
    "optional_pattern": PERSON,
}
ASK = [{"role": "user", "content": "Describe it as JSON."}]
WEATHER_Q = [{"role": "user", "content": "What is the weather in Paris?"}]


def create(client: openai.OpenAI, **kwargs: Any) -> Any:
    return checked_chat(client, **{"messages": ASK, **kwargs})


def stream(client: openai.OpenAI, **kwargs: Any) -> list[Any]:
    return checked_chat_stream(client, **{"messages": ASK, **kwargs})


def streamed(chunks: list[Any]) -> tuple[str, list[dict[str, Any]], str | None]:
    """(content, tool calls assembled from deltas, finish_reason) of choice 0."""
    content, calls, finish = "", {}, None
    for c in chunks:
        for choice in c.choices:
            delta = choice.delta
            content += delta.content or ""
            for piece in delta.tool_calls or []:
                call = calls.setdefault(piece.index, {"id": None, "name": None, "arguments": ""})
                if piece.id:
                    assert call["id"] is None, "only a call's first delta carries its id"
                    call["id"] = piece.id
                if piece.function and piece.function.name:
                    call["name"] = piece.function.name
                call["arguments"] += (piece.function.arguments or "") if piece.function else ""
            finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_output_always_validates(client: openai.OpenAI, name: str) -> None:
    schema = SCHEMAS[name]
    fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
    for seed in range(6):
        res = create(client, response_format=fmt, seed=seed, temperature=1.0, max_tokens=120)
        choice = res.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_json_schema_streamed_equals_and_validates(client: openai.OpenAI) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    for seed in range(3):
        whole = create(client, response_format=fmt, seed=seed, temperature=0.9, max_tokens=120)
        content, calls, finish = streamed(
            stream(client, response_format=fmt, seed=seed, temperature=0.9, max_tokens=120)
        )
        assert content == whole.choices[0].message.content and not calls and finish == "stop"
        jsonschema.validate(json.loads(content), PERSON)


def test_json_object_is_any_object(client: openai.OpenAI) -> None:
    for seed in range(3):
        res = create(client, response_format={"type": "json_object"}, seed=seed, max_tokens=150)
        if res.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(res.choices[0].message.content), dict)
        else:  # a free object may run past max_tokens; what came is still an object's start
            assert res.choices[0].message.content.startswith("{")


def test_n_choices_each_follow_the_schema(client: openai.OpenAI) -> None:
    schema = SCHEMAS["array_enum"]
    fmt = {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}
    res = create(client, response_format=fmt, n=3, seed=7, max_tokens=60)
    assert len(res.choices) == 3
    for choice in res.choices:
        jsonschema.validate(json.loads(choice.message.content), schema)


@pytest.mark.parametrize(
    ("grammar", "pattern"),
    [
        ({"type": "regex", "value": r"(yes|no), [a-z]{2,8}\."}, r"(yes|no), [a-z]{2,8}\."),
        (
            {
                "type": "lark",
                "value": 'start: "ANSWER: " NUM " " UNIT\nNUM: /[1-9][0-9]?/\nUNIT: "km" | "mi"',
            },
            r"ANSWER: [1-9][0-9]? (km|mi)",
        ),
        ({"type": "llguidance", "value": 'start: "x" /[ab]{3}/'}, r"x[ab]{3}"),
    ],
)
def test_grammar_extension_constrains_output(
    client: openai.OpenAI, grammar: dict[str, Any], pattern: str
) -> None:
    for seed in range(4):
        res = create(client, extra_body={"grammar": grammar}, seed=seed, max_tokens=30)
        assert res.choices[0].finish_reason == "stop"
        assert re.fullmatch(pattern, res.choices[0].message.content), res.choices[0].message.content
    content, _, finish = streamed(stream(client, extra_body={"grammar": grammar}, seed=1, max_tokens=30))
    assert re.fullmatch(pattern, content) and finish == "stop"


def test_legacy_completions_take_a_grammar(client: openai.OpenAI) -> None:
    res = client.completions.create(
        model="default",
        prompt="The answer is",
        max_tokens=10,
        extra_body={"grammar": {"type": "regex", "value": " [0-9]{2}"}},
    )
    assert re.fullmatch(" [0-9]{2}", res.choices[0].text)


def _check_call(call: dict[str, Any], tools: list[dict[str, Any]]) -> None:
    spec = next(t["function"] for t in tools if t["function"]["name"] == call["name"])
    jsonschema.validate(json.loads(call["arguments"]), spec["parameters"])
    assert call["id"].startswith("call_")


@pytest.mark.parametrize(
    "tool_choice",
    [
        "required",
        {"type": "function", "function": {"name": "add"}},
        {"type": "function", "name": "get_weather"},
        {"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "add"}]},
    ],
)
def test_forced_tool_calls_are_always_valid(client: openai.OpenAI, tool_choice: Any) -> None:
    tools = [WEATHER, ADD]
    named = None
    if isinstance(tool_choice, dict):
        named = (tool_choice.get("function") or tool_choice).get("name") or tool_choice["tools"][0]["name"]
    for seed in range(4):
        res = create(
            client,
            messages=WEATHER_Q,
            tools=tools,
            tool_choice=tool_choice,
            parallel_tool_calls=False,
            seed=seed,
            temperature=1.0,
            max_tokens=100,
        )
        choice = res.choices[0]
        assert choice.finish_reason == "tool_calls", choice.message
        assert choice.message.content is None and len(choice.message.tool_calls) == 1
        call = choice.message.tool_calls[0]
        _check_call({"id": call.id, "name": call.function.name, "arguments": call.function.arguments}, tools)
        if named:
            assert call.function.name == named


def test_streamed_tool_call_follows_openai_delta_shape(client: openai.OpenAI) -> None:
    tools = [WEATHER, ADD]
    kwargs = {"messages": WEATHER_Q, "tools": tools, "tool_choice": "required", "seed": 3, "max_tokens": 100}
    chunks = stream(client, parallel_tool_calls=False, **kwargs)
    content, calls, finish = streamed(chunks)
    assert finish == "tool_calls" and content == "" and len(calls) == 1
    _check_call(calls[0], tools)
    whole = create(client, parallel_tool_calls=False, **kwargs).choices[0].message.tool_calls[0]
    assert (whole.function.name, json.loads(whole.function.arguments)) == (
        calls[0]["name"],
        json.loads(calls[0]["arguments"]),
    )


def test_parallel_calls_allowed_by_default(live_server: LiveServer, client: openai.OpenAI) -> None:
    """Without parallel_tool_calls, a required call may be several calls. The small model
    seldom makes a second call by itself, so a logit bias scripts it: every token that
    opens a JSON list is favoured and every token with a "]" is banned, so where the
    grammar allows a list of calls the model writes one and keeps calling until
    max_tokens. With parallel_tool_calls false the same bias must get exactly one call."""
    tokenizer = live_server.info.tokenizer
    texts = [tokenizer.token_text(i) for i in range(tokenizer.vocab_size)]
    bias = {str(i): 100 for i, t in enumerate(texts) if t.startswith("[")}
    bias |= {str(i): -100 for i, t in enumerate(texts) if "]" in t}
    # ADD's arguments are integers, so the bias on "[" cannot leak into them
    forced = {"messages": WEATHER_Q, "tools": [ADD], "tool_choice": "required", "logit_bias": bias}
    res = create(client, seed=0, max_tokens=60, **forced)
    calls = res.choices[0].message.tool_calls
    assert res.choices[0].finish_reason == "length" and len(calls) >= 2, res.choices[0].message
    for call in calls[:2]:  # the last call may be cut by max_tokens
        _check_call({"id": call.id, "name": call.function.name, "arguments": call.function.arguments}, [ADD])
    single = create(client, seed=0, max_tokens=60, parallel_tool_calls=False, **forced).choices[0]
    assert single.finish_reason == "tool_calls" and len(single.message.tool_calls) == 1


def test_tool_choice_none_and_auto_answer_in_text(client: openai.OpenAI) -> None:
    for choice in ("none", "auto"):
        res = create(client, messages=WEATHER_Q, tools=[ADD], tool_choice=choice, seed=0, max_tokens=12)
        message = res.choices[0].message
        assert message.content and not message.tool_calls


def test_tool_history_renders_back(live_server: LiveServer, client: openai.OpenAI) -> None:
    """An assistant turn with tool_calls and a tool result render through the template."""
    messages = [
        *WEATHER_Q,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    ]
    body = {"model": "default", "messages": messages, "tools": [WEATHER]}
    with live_server.http() as http:
        tokens = http.post("/tokenize", json=body).json()["tokens"]
        prompt = http.post("/detokenize", json={"tokens": tokens}).json()["prompt"]
    # the question, then the call (its name and arguments), then the tool's answer
    question = prompt.index("What is the weather in Paris?")
    call = prompt.index('"get_weather"', question)
    assert prompt.index('"city": "Paris"', call) < prompt.index('{"temp": 21}', call)
    res = create(client, messages=messages, tools=[WEATHER], max_tokens=8, seed=0)
    assert res.usage.prompt_tokens == len(tokens)  # the model was given that prompt


def test_matcher_failure_ends_only_that_request(live_server: LiveServer, client: openai.OpenAI) -> None:
    """A grammar that fails mid-decode (here: forced by consuming a token it rejects) gives that
    request an error; the server and other requests go on."""
    engine = live_server.engine
    original = engine.grammars.bitmask

    def broken(matchers: list[Any]) -> Any:
        out, errors = original(matchers)
        return out, ["injected matcher failure" for _ in errors]

    engine.grammars.bitmask = broken
    try:
        with pytest.raises(openai.InternalServerError):
            create(client, response_format={"type": "json_object"}, max_tokens=5)
    finally:
        engine.grammars.bitmask = original
    live_server.wait_idle()
    assert create(client, max_tokens=3).usage.completion_tokens == 3
