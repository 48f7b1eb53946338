"""The Responses API end to end: the real server on loopback, the official
openai client, every object and event checked against OpenAI's schema."""

from __future__ import annotations

import concurrent.futures
import json
from typing import Any

import openai
from live_server import LiveServer
from openai_schema import check
from pydantic import BaseModel
from responses_checks import check_stream, created, error_of, sse_events

QUESTION = "What is the capital of France? Answer in one sentence."
ANSWER = "The capital of France is Paris."  # greedy on the default model (the chat tests' answer)
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
}


def greedy(**kwargs: Any) -> dict[str, Any]:
    return {"input": QUESTION, "temperature": 0, "max_output_tokens": 20, **kwargs}


def chat_prompt_tokens(live: LiveServer, messages: list[dict[str, Any]], **kwargs: Any) -> int:
    with live.http() as http:
        res = http.post("/tokenize", json={"messages": messages, **kwargs})
    assert res.status_code == 200, res.text
    return int(res.json()["count"])


def test_create_retrieve_delete(live_server: LiveServer, client: openai.OpenAI) -> None:
    raw = client.responses.with_raw_response.create(model="default", **greedy(metadata={"k": "v"}))
    res, body = raw.parse(), raw.http_response.json()
    check("Response", body)
    assert res.status == "completed" and res.output_text == ANSWER
    assert body["id"].startswith("resp_") and body["completed_at"] >= body["created_at"]
    assert body["metadata"] == {"k": "v"} and body["store"] is True and body["truncation"] == "disabled"
    usage = body["usage"]
    assert usage["output_tokens"] == 8 and usage["total_tokens"] == usage["input_tokens"] + 8
    assert usage["input_tokens"] == chat_prompt_tokens(live_server, [{"role": "user", "content": QUESTION}])
    with live_server.http() as http:
        got = http.get(f"/v1/responses/{res.id}")
        assert got.status_code == 200 and got.content == raw.http_response.content  # the stored bytes
        assert client.responses.retrieve(res.id).output_text == ANSWER
        deleted = http.delete(f"/v1/responses/{res.id}")
        assert deleted.json() == {"id": res.id, "object": "response.deleted", "deleted": True}
        assert error_of(http.get(f"/v1/responses/{res.id}"), 404)["code"] == "not_found"
        error_of(http.delete(f"/v1/responses/{res.id}"), 404)


def test_stream_events_equal_the_whole_response(live_server: LiveServer, client: openai.OpenAI) -> None:
    with live_server.http() as http:
        events = sse_events(http, "POST", "/v1/responses", {"model": "default", **greedy(), "stream": True})
        final = check_stream(events)
        kinds = [e["type"] for e in events]
        assert kinds[:2] == ["response.created", "response.in_progress"]
        for kind in ("output_item.added", "content_part.added", "output_text.delta", "output_text.done"):
            assert f"response.{kind}" in kinds
        assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == ANSWER
        assert final["status"] == "completed" and final["output"][0]["content"][0]["text"] == ANSWER
        stored = http.get(f"/v1/responses/{final['id']}").json()
        assert stored == final  # ids and text as streamed
    with client.responses.create(model="default", stream=True, **greedy()) as stream:
        sdk_events = list(stream)
    assert sdk_events[-1].type == "response.completed" and sdk_events[-1].response.output_text == ANSWER


def test_input_items_paginate(client: openai.OpenAI, live_server: LiveServer) -> None:
    given = [{"role": "user", "content": f"message {i}"} for i in range(5)]
    res, _ = created(client, input=given, max_output_tokens=1)
    with live_server.http() as http:
        page = http.get(f"/v1/responses/{res.id}/input_items", params={"limit": 2, "order": "asc"}).json()
        check("ResponseItemList", page)
        assert [i["content"][0]["text"] for i in page["data"]] == ["message 0", "message 1"] and page[
            "has_more"
        ]
        rest = http.get(
            f"/v1/responses/{res.id}/input_items",
            params={"limit": 10, "order": "asc", "after": page["last_id"]},
        ).json()
        assert [i["content"][0]["text"] for i in rest["data"]] == ["message 2", "message 3", "message 4"]
        assert not rest["has_more"]
        error_of(http.get(f"/v1/responses/{res.id}/input_items", params={"limit": 0}), 400)
        error_of(http.get(f"/v1/responses/{res.id}/input_items", params={"order": "up"}), 400)
        error_of(http.get("/v1/responses/resp_nope/input_items"), 404)
    every = list(client.responses.input_items.list(res.id, limit=2))  # the SDK follows `after` by itself
    assert [i.content[0].text for i in every] == [f"message {i}" for i in (4, 3, 2, 1, 0)]  # type: ignore[union-attr]


def test_previous_response_chain_of_three(live_server: LiveServer, client: openai.OpenAI) -> None:
    turns = ["My name is Ada.", "What is my name?", "Say it once more."]
    first, _ = created(
        client, input=turns[0], instructions="Answer in French.", temperature=0, max_output_tokens=12
    )
    second, _ = created(
        client, input=turns[1], previous_response_id=first.id, temperature=0, max_output_tokens=12
    )
    third, body = created(
        client, input=turns[2], previous_response_id=second.id, temperature=0, max_output_tokens=12
    )
    assert body["previous_response_id"] == second.id and body["instructions"] is None
    # The prompt is the conversation so far, without the first turn's instructions (as OpenAI).
    messages = []
    for turn, res in zip(turns, (first, second), strict=False):
        messages += [{"role": "user", "content": turn}, {"role": "assistant", "content": res.output_text}]
    messages.append({"role": "user", "content": turns[2]})
    assert third.usage is not None and third.usage.input_tokens == chat_prompt_tokens(live_server, messages)
    # The second turn's prompt is a prefix of the third's: the prefix cache served part of it.
    assert third.usage.input_tokens_details.cached_tokens > 0


def test_store_false_cannot_be_fetched_or_continued(live_server: LiveServer, client: openai.OpenAI) -> None:
    res, body = created(client, **greedy(store=False))
    assert body["store"] is False and res.output_text == ANSWER
    with live_server.http() as http:
        assert error_of(http.get(f"/v1/responses/{res.id}"), 404)["param"] == "response_id"
        follow = http.post("/v1/responses", json={"input": "and?", "previous_response_id": res.id})
        assert error_of(follow, 404)["param"] == "previous_response_id"


def test_function_call_round_trip_model_to_client(client: openai.OpenAI) -> None:
    ask, body = created(
        client,
        input="What is the weather in Paris?",
        tools=[WEATHER],
        tool_choice="required",
        max_output_tokens=60,
        temperature=0,  # greedy: sampled, the model may add a second call
    )
    (call,) = [item for item in ask.output if item.type == "function_call"]
    assert call.name == "get_weather" and isinstance(json.loads(call.arguments)["city"], str)
    assert body["tools"][0]["name"] == "get_weather" and body["tools"][0]["strict"] is True
    output = {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 24 C"}
    answer, _ = created(
        client, input=[output], previous_response_id=ask.id, tools=[WEATHER], max_output_tokens=20
    )
    assert answer.status in ("completed", "incomplete") and answer.output
    assert answer.usage is not None and ask.usage is not None
    assert answer.usage.input_tokens > ask.usage.input_tokens  # the call and its output are in the prompt


def test_function_call_round_trip_client_to_model(live_server: LiveServer, client: openai.OpenAI) -> None:
    """The client holds the history (store: false, as Codex): calls and their outputs come back as input."""
    history = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {
            "type": "function_call",
            "call_id": "call_1",
            "name": "get_weather",
            "arguments": '{"city": "Paris"}',
        },
        {"type": "function_call_output", "call_id": "call_1", "output": "Sunny, 24 C"},
    ]
    res, _ = created(client, input=history, tools=[WEATHER], store=False, max_output_tokens=10, temperature=0)
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    messages = [
        history[0],
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 24 C"},
    ]
    chat_tool = {
        "type": "function",
        "function": {k: v for k, v in WEATHER.items() if k != "type"} | {"strict": True},
    }
    assert res.usage is not None
    assert res.usage.input_tokens == chat_prompt_tokens(live_server, messages, tools=[chat_tool])


def test_namespace_and_custom_tools(client: openai.OpenAI) -> None:
    shell = {
        "type": "namespace",
        "name": "shell",
        "description": "Run commands",
        "tools": [{"type": "function", "name": "run", "parameters": {"type": "object", "properties": {}}}],
    }
    custom = {
        "type": "custom",
        "name": "word",
        "format": {"type": "grammar", "syntax": "regex", "definition": "[a-z]{1,8}"},
    }
    hosted = {"type": "web_search", "external_web_access": False}  # left out, with a warning
    res, body = created(
        client,
        input="List files.",
        tools=[shell, custom, hosted],
        tool_choice={"type": "function", "name": "run"},
        temperature=0,  # greedy: sampled, the model may add a second call
    )
    (call,) = res.output
    assert call.type == "function_call" and call.name == "run" and call.namespace == "shell"
    assert [t["type"] for t in body["tools"]] == ["namespace", "custom", "web_search"]
    res, _ = created(
        client,
        input="Say a word.",
        tools=[shell, custom],
        tool_choice={"type": "custom", "name": "word"},
        temperature=0,
    )
    (call,) = res.output
    assert call.type == "custom_tool_call" and call.name == "word"
    assert call.input.isalpha() and call.input.islower() and 1 <= len(call.input) <= 8


class Place(BaseModel):
    city: str
    country: str


def test_structured_output(client: openai.OpenAI) -> None:
    schema = Place.model_json_schema() | {"additionalProperties": False}
    fmt = {"type": "json_schema", "name": "place", "schema": schema, "strict": True}
    res, body = created(client, input=QUESTION, text={"format": fmt}, max_output_tokens=60, temperature=0)
    assert (
        set(json.loads(res.output_text)) == {"city", "country"} and body["text"]["format"]["name"] == "place"
    )
    alias, body = created(
        client,
        input=QUESTION,
        extra_body={"response_format": {"type": "json_object"}},
        max_output_tokens=80,
        temperature=0,
    )
    assert isinstance(json.loads(alias.output_text), dict) and body["text"]["format"] == {
        "type": "json_object"
    }
    parsed = client.responses.parse(
        model="default", input=QUESTION, text_format=Place, max_output_tokens=60, temperature=0
    )
    assert isinstance(parsed.output_parsed, Place)


def test_logprobs_and_reasoning_fields(client: openai.OpenAI) -> None:
    include: Any = ["message.output_text.logprobs"]
    _, body = created(client, **greedy(include=include, top_logprobs=2, reasoning={"effort": "low"}))
    part = body["output"][0]["content"][0]
    assert part["text"] == ANSWER and len(part["logprobs"]) == 7  # 8 tokens, the last is the stop token
    assert "".join(lp["token"] for lp in part["logprobs"]) == ANSWER
    assert all(len(lp["top_logprobs"]) == 2 for lp in part["logprobs"])
    assert body["reasoning"]["effort"] == "low" and body["top_logprobs"] == 2
    plain, _ = created(client, **greedy())
    assert plain.output[0].content[0].logprobs == []  # type: ignore[union-attr]


def test_async_client(live_server: LiveServer) -> None:
    import asyncio

    async def go() -> None:
        client = openai.AsyncOpenAI(base_url=f"{live_server.base_url}/v1", api_key="unused", max_retries=0)
        res = await client.responses.create(model="default", **greedy())
        assert res.output_text == ANSWER
        events = [e async for e in await client.responses.create(model="default", stream=True, **greedy())]
        for e in events:
            check("ResponseStreamEvent", e.model_dump(mode="json", exclude_unset=True))
        assert events[-1].type == "response.completed"
        assert (await client.responses.retrieve(res.id)).id == res.id
        assert [i.type async for i in client.responses.input_items.list(res.id)] == ["message"]
        bg = await client.responses.create(
            model="default", input=QUESTION, background=True, max_output_tokens=5
        )
        assert bg.status == "queued"
        await client.responses.cancel(bg.id)
        await client.responses.delete(res.id)
        await client.close()

    asyncio.run(go())


def test_32_clients_create_fetch_and_delete_at_once(live_server: LiveServer) -> None:
    def client_session(i: int) -> None:
        with live_server.http() as http:
            made = http.post(
                "/v1/responses",
                json={"input": f"Say {i}.", "max_output_tokens": 2, "metadata": {"i": str(i)}},
            )
            assert made.status_code == 200, made.text
            response_id = made.json()["id"]
            assert http.get(f"/v1/responses/{response_id}").content == made.content
            assert (
                http.get(f"/v1/responses/{response_id}/input_items").json()["data"][0]["content"][0]["text"]
                == f"Say {i}."
            )
            if i % 2:
                assert http.delete(f"/v1/responses/{response_id}").status_code == 200
                assert http.get(f"/v1/responses/{response_id}").status_code == 404
            else:
                assert http.get(f"/v1/responses/{response_id}").json()["metadata"] == {"i": str(i)}

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        list(pool.map(client_session, range(32)))  # re-raises the first failure


def test_max_output_tokens_aliases(live_server: LiveServer) -> None:
    with live_server.http() as http:
        for alias in ("max_output_tokens", "max_tokens", "max_completion_tokens"):
            obj = http.post("/v1/responses", json={"input": QUESTION, alias: 3, "ignore_eos": True}).json()
            check("Response", obj)
            assert obj["max_output_tokens"] == 3 and obj["usage"]["output_tokens"] == 3
            assert obj["status"] == "incomplete" and obj["incomplete_details"] == {
                "reason": "max_output_tokens"
            }
