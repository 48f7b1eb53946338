"""Background responses: queued at once, polled to the end, cancelled (the
engine request is aborted and its KV blocks freed), streamed and resumed."""

from __future__ import annotations

import time
from typing import Any

import openai
import pytest
from live_server import LiveServer
from openai_schema import check
from responses_checks import check_stream, created, sse_events

QUESTION = "What is the capital of France? Answer in one sentence."
# Long enough to be cancelled mid-way on any machine: EOS is ignored.
ENDLESS = {
    "input": "Count from one to one thousand.",
    "max_output_tokens": 4000,
    "extra_body": {"ignore_eos": True},
}


def poll(client: openai.OpenAI, response_id: str, until: Any, timeout_s: float = 120) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        raw = client.responses.with_raw_response.retrieve(response_id)
        check("Response", raw.http_response.json())
        res = raw.parse()
        if until(res):
            return res
        time.sleep(0.05)
    raise AssertionError(f"response {response_id} never reached the awaited state")


def test_background_runs_to_completion(client: openai.OpenAI) -> None:
    res, body = created(client, input=QUESTION, background=True, temperature=0, max_output_tokens=20)
    assert body["status"] == "queued" and body["background"] is True and body["output"] == []
    done = poll(client, res.id, lambda r: r.status not in ("queued", "in_progress"))
    assert done.status == "completed" and done.output_text == "The capital of France is Paris."
    assert done.usage.output_tokens == 8
    again = client.responses.cancel(res.id)  # a finished response comes back unchanged
    assert again.model_dump() == done.model_dump()


def test_cancel_stops_generation_and_frees_blocks(live_server: LiveServer, client: openai.OpenAI) -> None:
    res, _ = created(client, background=True, **ENDLESS)
    poll(client, res.id, lambda r: r.status == "in_progress" and r.output)  # some output is stored
    with live_server.http() as http:
        cancel = http.post(f"/v1/responses/{res.id}/cancel")
        assert cancel.status_code == 200
        obj = cancel.json()
        check("Response", obj)
        assert obj["status"] == "cancelled" and obj["output"] and obj["usage"]["output_tokens"] < 4000
        live_server.wait_idle()  # the engine dropped the request and its KV blocks
        assert http.post(f"/v1/responses/{res.id}/cancel").content == cancel.content  # unchanged
        assert http.get(f"/v1/responses/{res.id}").content == cancel.content


def test_delete_while_running_cancels(live_server: LiveServer, client: openai.OpenAI) -> None:
    res, _ = created(client, background=True, **ENDLESS)
    poll(client, res.id, lambda r: r.status == "in_progress")
    client.responses.delete(res.id)
    live_server.wait_idle()
    with live_server.http() as http:
        assert http.get(f"/v1/responses/{res.id}").status_code == 404


def test_background_stream_resumes_after_a_disconnect(live_server: LiveServer) -> None:
    body = {
        "model": "default",
        "input": QUESTION,
        "background": True,
        "stream": True,
        "max_output_tokens": 30,
        "temperature": 0,  # greedy: the answer ends within max_output_tokens, so the job completes
    }
    with live_server.http() as http:
        head = sse_events(http, "POST", "/v1/responses", body, limit=4)  # then the client goes away
        assert head[0]["type"] == "response.created" and head[0]["response"]["status"] == "queued"
        response_id, last = head[0]["response"]["id"], head[-1]["sequence_number"]
        tail = sse_events(http, "GET", f"/v1/responses/{response_id}?stream=true&starting_after={last}")
        final = check_stream(head + tail)  # one stream, as if never cut
        assert final["status"] == "completed"  # leaving the stream did not cancel the job
        replay = sse_events(http, "GET", f"/v1/responses/{response_id}?stream=true&starting_after=2")
        assert replay == (head + tail)[3:]  # a finished job's events are kept with it
        stored = http.get(f"/v1/responses/{response_id}").json()
        assert stored == final
        plain = http.post("/v1/responses", json={"input": "hi", "max_output_tokens": 2}).json()
        error = http.get(f"/v1/responses/{plain['id']}?stream=true").json()["error"]
        assert error["param"] == "stream"  # only background responses stream again


def test_background_stream_through_the_sdk(client: openai.OpenAI) -> None:
    with client.responses.create(
        model="default", input=QUESTION, background=True, stream=True, max_output_tokens=20, temperature=0
    ) as stream:
        events = list(stream)
    for event in events:
        check("ResponseStreamEvent", event.model_dump(mode="json", exclude_unset=True))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    response_id = events[0].response.id  # type: ignore[union-attr]
    assert client.responses.retrieve(response_id).output_text == "The capital of France is Paris."


def test_engine_error_ends_in_response_failed(
    live_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = live_server.engine
    calls = {"n": 0}
    real = engine.runner.execute

    def failing(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("secret internal detail")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.runner, "execute", failing)
    body = {
        "model": "default",
        "input": QUESTION,
        "stream": True,
        "max_output_tokens": 50,
        "ignore_eos": True,
    }
    with live_server.http() as http:
        events = sse_events(http, "POST", "/v1/responses", body)
        monkeypatch.undo()
        final = check_stream(events)
        assert final["status"] == "failed" and "secret" not in final["error"]["message"]
        assert http.get(f"/v1/responses/{final['id']}").json()["status"] == "failed"  # stored as it ended
        calls["n"] = 0
        monkeypatch.setattr(engine.runner, "execute", failing)
        bg = http.post("/v1/responses", json={**body, "stream": False, "background": True}).json()
        deadline = time.monotonic() + 60
        while (obj := http.get(f"/v1/responses/{bg['id']}").json())["status"] in ("queued", "in_progress"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        monkeypatch.undo()
        check("Response", obj)
        assert obj["status"] == "failed" and obj["error"]["code"] == "server_error"
    live_server.wait_idle()
