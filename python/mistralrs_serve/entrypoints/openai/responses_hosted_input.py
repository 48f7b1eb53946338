"""Hosted-tool items in a Responses conversation (an earlier response's
output, or items a client sends back in `input`), as the chat messages the
model sees: the call as an assistant tool call of the tool's name, and what
it returned as the tool message. So a second turn reads the first turn's
searches, code and commands as the model made them (agent/loop.py names the
tools the same way)."""

from __future__ import annotations

import json
from typing import Any

from mistralrs_serve.entrypoints.openai.responses_protocol import new_id
from mistralrs_serve.errors import InvalidRequestError

HOSTED_TYPES = (
    "web_search_call",
    "code_interpreter_call",
    "shell_call",
    "shell_call_output",
    "mcp_call",
    "mcp_approval_request",
    "mcp_approval_response",
)
MAX_REPLAYED_CHARS = 8_000  # of one earlier tool result, as the model sees it again


def normalize_hosted(item: dict[str, Any], where: str) -> dict[str, Any]:
    """A hosted item as it is stored: as sent, with an id."""
    if item["type"] in ("shell_call", "shell_call_output") and not isinstance(item.get("call_id"), str):
        raise InvalidRequestError(f"{where}.call_id must be a string", f"{where}.call_id")
    return {**item, "id": item.get("id") if isinstance(item.get("id"), str) else new_id("item")}


def hosted_call(item: dict[str, Any]) -> tuple[dict[str, Any], str | None] | None:
    """(the chat tool call, its result text or None when a later item holds it); None: not shown."""
    kind = item["type"]
    if kind == "web_search_call":
        action = _dict(item.get("action"))
        if action.get("type") == "open_page":
            return _call(item["id"], "open_page", {"url": action.get("url")}), f"Opened {action.get('url')}"
        sources = [s.get("url") for s in action.get("sources") or [] if isinstance(s, dict)]
        result = "Results:\n" + "\n".join(str(u) for u in sources) if sources else "Searched."
        return _call(item["id"], "web_search", {"query": action.get("query") or ""}), result
    if kind == "code_interpreter_call":
        logs = [o.get("logs") or "" for o in item.get("outputs") or [] if isinstance(o, dict)]
        return _call(item["id"], "python", {"code": item.get("code") or ""}), _cap("\n".join(logs))
    if kind == "shell_call":
        action = _dict(item.get("action"))
        return _call(item["call_id"], "shell", {"commands": action.get("commands") or []}), None
    if kind == "mcp_call":
        error = item.get("error")
        output = f"Error: {error}" if error is not None else str(item.get("output") or "")
        return _call(item["id"], str(item.get("name")), _json(item.get("arguments"))), _cap(output)
    return None  # approval requests and answers are not part of the conversation


def shell_output_text(item: dict[str, Any]) -> str:
    parts = []
    for out in item.get("output") or []:
        if not isinstance(out, dict):
            continue
        outcome = out.get("outcome") or {}
        end = "timed out" if outcome.get("type") == "timeout" else f"exit code {outcome.get('exit_code')}"
        parts.append(f"{out.get('stdout') or ''}{out.get('stderr') or ''}[{end}]")
    return _cap("\n".join(parts))


def _call(call_id: str, name: str, arguments: Any) -> dict[str, Any]:
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)},
    }


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _json(text: Any) -> Any:
    try:
        return json.loads(text) if isinstance(text, str) else {}
    except json.JSONDecodeError:
        return {}


def _cap(text: str) -> str:
    return text if len(text) <= MAX_REPLAYED_CHARS else text[:MAX_REPLAYED_CHARS] + "\n[...]"
