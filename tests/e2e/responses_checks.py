"""Schema checks for the Responses API tests: each stream event against the
schema of its own type (OpenAI's `ResponseStreamEvent` is an anyOf of 50-odd
event schemas, whose failure says only that none matched)."""

from __future__ import annotations

import functools
import json
from typing import Any

from openai_schema import _registry, check

TERMINAL = ("response.completed", "response.incomplete", "response.failed")


@functools.cache
def _event_schemas() -> dict[str, str]:
    """Event type -> the name of its schema."""
    schemas = _registry().contents("urn:openai-openapi")["components"]["schemas"]
    out = {}
    for ref in schemas["ResponseStreamEvent"]["anyOf"]:
        name = ref["$ref"].rsplit("/", 1)[-1]
        for kind in schemas[name]["properties"]["type"].get("enum", []):
            out[kind] = name
    return out


def check_event(event: dict[str, Any]) -> None:
    name = _event_schemas().get(event.get("type", ""))
    assert name is not None, f"not an OpenAI Responses event type: {event.get('type')!r}"
    check(name, event)
    check("ResponseStreamEvent", event)


def check_stream(events: list[dict[str, Any]], first: int = 0) -> dict[str, Any]:
    """Every event valid; sequence numbers counting up from `first`; item ids the same from
    `added` to `done`; exactly one terminal event, last. Returns the final response."""
    for event in events:
        check_event(event)
    assert [e["sequence_number"] for e in events] == list(range(first, first + len(events)))
    terminal = [e for e in events if e["type"] in TERMINAL]
    assert len(terminal) == 1 and events[-1] is terminal[0], [e["type"] for e in events]
    added = {e["item"]["id"]: e["output_index"] for e in events if e["type"] == "response.output_item.added"}
    done = {e["item"]["id"]: e["output_index"] for e in events if e["type"] == "response.output_item.done"}
    assert added == done
    final: dict[str, Any] = terminal[0]["response"]
    check("Response", final)
    if first == 0:
        assert [item["id"] for item in final["output"]] == list(added)
    return final


def created(client: Any, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """client.responses.create: (the SDK's object, the wire JSON, schema-checked)."""
    raw = client.responses.with_raw_response.create(**{"model": "default", **kwargs})
    body = raw.http_response.json()
    check("Response", body)
    return raw.parse(), body


def sse_events(
    http: Any, method: str, path: str, body: Any = None, limit: int | None = None
) -> list[dict[str, Any]]:
    """The `data:` events of an SSE response, parsed (at most `limit`: then the stream is closed)."""
    events: list[dict[str, Any]] = []
    with http.stream(method, path, json=body) as res:
        assert res.status_code == 200, res.read()
        assert res.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in res.iter_lines():
            if line.startswith("event: "):
                kind = line[len("event: ") :]
            elif line.startswith("data: "):
                event = json.loads(line[len("data: ") :])
                assert event["type"] == kind  # the `event:` line names the type
                events.append(event)
                if limit is not None and len(events) >= limit:
                    break
    return events


def error_of(res: Any, status: int) -> dict[str, Any]:
    """The OpenAI error envelope of a failed request, with its status checked."""
    assert res.status_code == status, (res.status_code, res.text)
    error: dict[str, Any] = res.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error
