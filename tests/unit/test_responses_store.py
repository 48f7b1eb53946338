"""The Responses store, the reasoning seal and the request conversions, without a model."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from mistralrs_serve.entrypoints.openai.responses_input import MessageBuilder, normalize_input
from mistralrs_serve.entrypoints.openai.responses_run import RESTARTED, fail_interrupted
from mistralrs_serve.entrypoints.openai.responses_seal import ReasoningSeal
from mistralrs_serve.entrypoints.openai.responses_tools import (
    convert_text_format,
    convert_tool_choice,
    convert_tools,
)
from mistralrs_serve.errors import InvalidRequestError
from mistralrs_serve.store.db import SqlDatabase
from mistralrs_serve.store.responses import InputItem, SqlResponseStore, StoredResponse

OpenDb = Callable[..., SqlDatabase]  # the open_db fixture (tests/conftest.py): SQLite, then PostgreSQL


def record(response_id: str, status: str = "completed", prev: str | None = None) -> StoredResponse:
    obj = {"id": response_id, "object": "response", "status": status, "output": [], "created_at": 1}
    return StoredResponse(response_id, 1, status, True, prev, orjson.dumps(obj))


def items(n: int) -> list[InputItem]:
    return [InputItem(f"msg_{i}", orjson.dumps({"id": f"msg_{i}", "n": i})) for i in range(n)]


def test_store_round_trip_and_pages(open_db: OpenDb, tmp_path: Path) -> None:
    store = SqlResponseStore(open_db(tmp_path))
    store.insert(record("resp_a"), items(5))
    got = store.get("resp_a")
    assert got is not None and got.object_json == record("resp_a").object_json
    assert [orjson.loads(x)["n"] for x in store.input_items("resp_a")] == [0, 1, 2, 3, 4]
    page, more = store.page_input_items("resp_a", limit=2, descending=True, after=None)
    assert [p.id for p in page] == ["msg_4", "msg_3"] and more
    page, more = store.page_input_items("resp_a", limit=2, descending=True, after="msg_1")
    assert [p.id for p in page] == ["msg_0"] and not more
    page, more = store.page_input_items("resp_a", limit=10, descending=False, after="msg_2")
    assert [p.id for p in page] == ["msg_3", "msg_4"] and not more
    with pytest.raises(InvalidRequestError) as e:
        store.page_input_items("resp_a", limit=2, descending=False, after="msg_nope")
    assert e.value.param == "after"
    assert store.delete("resp_a") and not store.delete("resp_a")
    assert store.get("resp_a") is None and store.input_items("resp_a") == []
    assert not store.update("resp_a", "completed", b"{}")  # a deleted response is not brought back


def test_unfinished_responses_fail_after_a_restart(open_db: OpenDb, tmp_path: Path) -> None:
    store = SqlResponseStore(open_db(tmp_path))
    store.insert(record("resp_run", "in_progress"), [])
    store.insert(record("resp_q", "queued"), [])
    store.insert(record("resp_done"), [])
    store = SqlResponseStore(open_db(tmp_path))  # as a new server opens it
    assert fail_interrupted(store) == 2
    for rid in ("resp_run", "resp_q"):
        got = store.get(rid)
        assert got is not None and got.status == "failed"
        obj = orjson.loads(got.object_json)
        assert obj["status"] == "failed" and obj["error"]["message"] == RESTARTED
    done = store.get("resp_done")
    assert done is not None and done.object_json == record("resp_done").object_json


def test_concurrent_writers_lose_nothing(open_db: OpenDb, tmp_path: Path) -> None:
    store = SqlResponseStore(open_db(tmp_path))
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for i in range(20):
                rid = f"resp_{worker}_{i}"
                store.insert(record(rid, "in_progress"), items(3))
                assert store.update(rid, "completed", record(rid).object_json)
                if i % 2:
                    assert store.delete(rid)
        except BaseException as e:  # reported on the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    left = store.db.read("SELECT COUNT(*) FROM responses")[0][0]
    assert left == 16 * 10 and store.unfinished() == []


def test_seal_round_trips_and_refuses_forgeries(tmp_path: Path) -> None:
    seal = ReasoningSeal(tmp_path)
    token = seal.seal("thinking about cats")
    assert ReasoningSeal(tmp_path).open(token) == "thinking about cats"  # the key survives a restart
    for bad in (token[:-3] + "abc", "mrs1h.aGVsbG8.AAAA", "garbage", ""):
        with pytest.raises(ValueError):
            seal.open(bad)
    with pytest.raises(ValueError):
        ReasoningSeal(tmp_path / "other").open(token)


def test_tools_flat_nested_namespace_custom_and_hosted() -> None:
    tools = convert_tools(
        [
            {"type": "function", "name": "a", "parameters": {"type": "object"}},
            {"type": "function", "function": {"name": "b", "parameters": {"type": "object"}}},
            {
                "type": "namespace",
                "name": "ns",
                "description": "d",
                "tools": [{"type": "function", "name": "c"}],
            },
            {
                "type": "custom",
                "name": "patch",
                "format": {"type": "grammar", "syntax": "regex", "definition": "x+"},
            },
            {"type": "web_search", "external_web_access": False},
        ]
    )
    names = [t["function"]["name"] for t in tools.chat_tools]
    assert names == ["a", "b", "c", "patch"]
    assert tools.chat_tools[0]["function"]["strict"] is True  # Responses functions are strict by default
    assert tools.chat_tools[1]["function"]["strict"] is False  # chat's nested form is not
    assert tools.namespaces == {"c": "ns"} and tools.custom == {"patch"} and tools.hosted == {"web_search"}
    assert tools.chat_tools[3]["function"]["parameters"]["properties"]["input"]["pattern"] == "^(?:x+)$"
    assert tools.origins[2] == "tools[2].tools[0]"
    assert convert_tool_choice({"type": "custom", "name": "patch"}, tools) == {
        "type": "function",
        "name": "patch",
    }
    for forced in (
        {"type": "web_search_preview"},
        {"type": "allowed_tools", "mode": "auto", "tools": [{"type": "mcp"}]},
    ):
        with pytest.raises(InvalidRequestError) as e:
            convert_tool_choice(forced, tools)
        assert e.value.param == "tool_choice" and "hosted" in str(e.value)
    with pytest.raises(InvalidRequestError) as e:
        convert_tools([{"type": "function", "name": "a"}, {"type": "function", "name": "a"}])
    assert e.value.param == "tools[1].name"


def test_text_format_forms() -> None:
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}}
    chat, echo = convert_text_format({"format": {"type": "json_schema", "name": "n", "schema": schema}}, None)
    assert chat == {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}
    assert echo == {"type": "json_schema", "name": "n", "schema": schema}
    nested = {"type": "json_schema", "json_schema": {"name": "n", "schema": schema, "strict": True}}
    chat, echo = convert_text_format(None, nested)
    assert chat["json_schema"]["strict"] is True and echo["strict"] is True
    assert convert_text_format(None, None) == (None, {"type": "text"})


def test_items_become_chat_messages(tmp_path: Path) -> None:
    seal = ReasoningSeal(tmp_path)
    given = [
        {"role": "developer", "content": "be brief"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
        {"type": "reasoning", "summary": [], "encrypted_content": seal.seal("think")},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "42"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "it is 42"}]},
    ]
    items = normalize_input(given, {})
    assert all(x["id"] for x in items) and items[3]["id"].startswith("fc_")
    messages = MessageBuilder(seal, lambda i: f"input[{i}]").build(items)
    assert messages[0] == {"role": "developer", "content": "be brief"}
    assistant = messages[2]
    assert assistant["reasoning_content"] == "think" and assistant["tool_calls"][0]["id"] == "c1"
    assert messages[3] == {"role": "tool", "tool_call_id": "c1", "content": "42"}
    assert messages[4]["content"] == "it is 42"


@pytest.mark.parametrize(
    ("bad", "param"),
    [
        ([{"type": "wat"}], "input[0].type"),
        ([{"type": "function_call_output", "call_id": "nope", "output": "x"}], "input[0].call_id"),
        ([{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}], "input[0].content[0]"),
        ([{"type": "reasoning", "summary": [], "encrypted_content": "forged"}], "input[0].encrypted_content"),
        ([{"role": "robot", "content": "x"}], "input[0].role"),
    ],
)
def test_bad_items_name_their_field(tmp_path: Path, bad: list[dict[str, object]], param: str) -> None:
    seal = ReasoningSeal(tmp_path)
    with pytest.raises(InvalidRequestError) as e:
        MessageBuilder(seal, lambda i: f"input[{i}]").build(normalize_input(bad, {}))
    assert e.value.param == param
