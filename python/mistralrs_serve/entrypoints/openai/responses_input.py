"""Responses `input` items: checked and given ids (as they are stored and
listed), then turned into the chat messages the chat template renders.

Items map to messages as OpenAI's own conversations read: a user, system or
developer message is a message of that role; an assistant message, the
reasoning before it and the function calls after it make one assistant
message (`reasoning_content`, `content`, `tool_calls`); a function call's
output is a `tool` message, and must answer a call made earlier.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from mistralrs_serve.entrypoints.openai.responses_hosted_input import (
    HOSTED_TYPES,
    hosted_call,
    normalize_hosted,
    shell_output_text,
)
from mistralrs_serve.entrypoints.openai.responses_protocol import new_id
from mistralrs_serve.entrypoints.openai.responses_seal import ReasoningSeal
from mistralrs_serve.entrypoints.openai.responses_tools import CUSTOM_INPUT
from mistralrs_serve.errors import InvalidRequestError

MESSAGE_ROLES = ("user", "system", "developer", "assistant")
CALL_TYPES = ("function_call", "custom_tool_call")
OUTPUT_TYPES = ("function_call_output", "custom_tool_call_output")
TEXT_PARTS = ("input_text", "output_text")


def normalize_input(value: Any, earlier: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The request's `input` as stored items, each with an id and a status.
    `earlier` holds the conversation's items so far by id (for `item_reference`)."""
    if isinstance(value, str):
        return [_message({"role": "user", "content": value}, "input")]
    if not isinstance(value, list) or not value:
        raise InvalidRequestError("input must be a string or a non-empty list of items", "input")
    items: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise InvalidRequestError(f"{where} must be an object", where)
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "item_reference":
            ref = str(item.get("id"))
            found = earlier.get(ref) or next((x for x in items if x["id"] == ref), None)
            if found is None:
                raise InvalidRequestError(f"{where}.id: no earlier item {ref!r}", f"{where}.id")
            items.append(found)
            continue
        normalize = _NORMALIZERS.get(kind) if isinstance(kind, str) else None
        if normalize is None:
            raise InvalidRequestError(
                f"{where}.type {kind!r} is not a supported input item type", f"{where}.type"
            )
        items.append(normalize(item, where))
    return items


def instruction_items(value: Any) -> list[dict[str, Any]]:
    """`instructions`: a developer message, or a list of input items (given as they are, unstored)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [_message({"role": "developer", "content": value}, "instructions")] if value else []
    if isinstance(value, list):
        try:
            return normalize_input(value, {})
        except InvalidRequestError as e:
            raise InvalidRequestError(str(e).replace("input", "instructions", 1), "instructions") from None
    raise InvalidRequestError("instructions must be a string or a list of items", "instructions")


def _string(item: dict[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise InvalidRequestError(f"{where}.{key} must be a string", f"{where}.{key}")
    return value


def _message(item: dict[str, Any], where: str) -> dict[str, Any]:
    role = item.get("role")
    if role not in MESSAGE_ROLES:
        raise InvalidRequestError(
            f"{where}.role must be one of {', '.join(MESSAGE_ROLES)}; got {role!r}", f"{where}.role"
        )
    content = item.get("content")
    if isinstance(content, str):
        content = [{"type": "input_text", "text": content}]
    if not isinstance(content, list):
        raise InvalidRequestError(f"{where}.content must be a string or a list of parts", f"{where}.content")
    parts = [_part(p, f"{where}.content[{j}]", role == "assistant") for j, p in enumerate(content)]
    return {
        "id": item.get("id") or new_id("msg"),
        "type": "message",
        "role": role,
        "content": parts,
        "status": item.get("status") or "completed",
    }


def _part(part: Any, where: str, is_assistant: bool) -> dict[str, Any]:
    kind = part.get("type") if isinstance(part, dict) else None
    assert kind is None or isinstance(part, dict)
    if kind in TEXT_PARTS or kind == "text":
        text = _string(part, "text", where)
        if is_assistant:
            return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        return {"type": "input_text", "text": text}
    if kind == "refusal" and is_assistant:
        return {"type": "refusal", "refusal": _string(part, "refusal", where)}
    if kind == "input_image" and not is_assistant:
        # read (and refused by a text-only model) when the messages are built
        out = {k: part[k] for k in ("image_url", "file_id") if isinstance(part.get(k), str)}
        if len(out) != 1:
            raise InvalidRequestError(f"{where} needs exactly one of image_url or file_id", where)
        return {"type": "input_image", **out, "detail": part.get("detail") or "auto"}
    if kind == "input_file" and not is_assistant:
        if not any(isinstance(part.get(k), str) for k in ("file_id", "file_data", "file_url")):
            raise InvalidRequestError(f"{where} needs one of file_id, file_data or file_url", where)
        return dict(part)
    raise InvalidRequestError(f"{where}.type {kind!r} is not a supported content part here", f"{where}.type")


def _call(item: dict[str, Any], where: str) -> dict[str, Any]:
    kind = item["type"]
    out: dict[str, Any] = {
        "id": item.get("id") or new_id("fc" if kind == "function_call" else "ctc"),
        "type": kind,
        "status": item.get("status") or "completed",
        "call_id": _string(item, "call_id", where),
        "name": _string(item, "name", where),
    }
    if kind == "function_call":
        arguments = item.get("arguments")
        out["arguments"] = arguments if isinstance(arguments, str) else _string(item, "arguments", where)
    else:
        out["input"] = _string(item, "input", where)
    if isinstance(item.get("namespace"), str):
        out["namespace"] = item["namespace"]
    return out


def _call_output(item: dict[str, Any], where: str) -> dict[str, Any]:
    output = item.get("output")
    if not isinstance(output, str | list):
        raise InvalidRequestError(f"{where}.output must be a string or a list of parts", f"{where}.output")
    return {
        "id": item.get("id") or new_id("fco" if item["type"] == "function_call_output" else "ctco"),
        "type": item["type"],
        "status": item.get("status") or "completed",
        "call_id": _string(item, "call_id", where),
        "output": output,
    }


def _reasoning(item: dict[str, Any], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": item.get("id") or new_id("rs"),
        "type": "reasoning",
        "summary": item.get("summary") if isinstance(item.get("summary"), list) else [],
    }
    for key in ("content", "encrypted_content", "status"):
        if item.get(key) is not None:
            out[key] = item[key]
    return out


_NORMALIZERS: dict[str, Callable[[dict[str, Any], str], dict[str, Any]]] = {
    "message": _message,
    "function_call": _call,
    "custom_tool_call": _call,
    "function_call_output": _call_output,
    "custom_tool_call_output": _call_output,
    "reasoning": _reasoning,
    **dict.fromkeys(HOSTED_TYPES, normalize_hosted),
}


# --- items -> chat messages ---------------------------------------------------


def without_orphans(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Items less the call outputs whose call is not among them (truncation dropped it)."""
    calls = {x["call_id"] for x in items if x["type"] in CALL_TYPES}
    return [x for x in items if x["type"] not in OUTPUT_TYPES or x["call_id"] in calls]


class MessageBuilder:
    """Folds items into chat messages; `where(i)` names item i in errors."""

    def __init__(self, seal: ReasoningSeal, where: Callable[[int], str]) -> None:
        self.seal = seal
        self.where = where
        self.messages: list[dict[str, Any]] = []
        self.pending: dict[str, Any] | None = None  # the assistant message being assembled
        self.call_ids: set[str] = set()

    def build(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for i, item in enumerate(items):
            self._add(i, item)
        self._flush()
        return _merge_leading_system(self.messages)

    def _add(self, i: int, item: dict[str, Any]) -> None:
        kind = item["type"]
        if kind == "message" and item["role"] != "assistant":
            self._flush()
            self.messages.append({"role": item["role"], "content": self._content(i, item["content"])})
        elif kind == "message":
            assistant = self._assistant(i, starts_turn=False)
            text = "".join(p.get("text") or p.get("refusal") or "" for p in item["content"])
            assistant["content"] = (assistant.get("content") or "") + text
        elif kind == "reasoning":
            assistant = self._assistant(i, starts_turn=True)
            assistant["reasoning_content"] = (assistant.get("reasoning_content") or "") + self._thinking(
                i, item
            )
        elif kind in CALL_TYPES:
            self._assistant(i, starts_turn=False).setdefault("tool_calls", []).append(_chat_call(item))
            self.call_ids.add(item["call_id"])
        elif kind == "shell_call_output":
            if item["call_id"] in self.call_ids:
                self._flush()
                self.messages.append(
                    {"role": "tool", "tool_call_id": item["call_id"], "content": shell_output_text(item)}
                )
        elif kind in HOSTED_TYPES:
            self._hosted(i, item)
        else:  # a call's output
            if item["call_id"] not in self.call_ids:
                where = self.where(i)
                raise InvalidRequestError(
                    f"{where}.call_id: no function_call with call_id {item['call_id']!r} comes before it",
                    f"{where}.call_id",
                )
            self._flush()
            self.messages.append(
                {"role": "tool", "tool_call_id": item["call_id"], "content": _output_text(item["output"])}
            )

    def _hosted(self, i: int, item: dict[str, Any]) -> None:
        """A server-side call of an earlier turn: its call, and its result when the item holds it."""
        replay = hosted_call(item)
        if replay is None:
            return
        call, result = replay
        self._assistant(i, starts_turn=False).setdefault("tool_calls", []).append(call)
        self.call_ids.add(call["id"])
        if result is not None:
            self._flush()
            self.messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})

    def _assistant(self, i: int, starts_turn: bool) -> dict[str, Any]:
        """The assistant message being assembled; reasoning after text or calls starts a new one."""
        if (
            self.pending is not None
            and starts_turn
            and (self.pending.get("content") or "tool_calls" in self.pending)
        ):
            self._flush()
        if self.pending is None:
            self.pending = {"role": "assistant", "content": None}
        return self.pending

    def _flush(self) -> None:
        if self.pending is not None:
            self.messages.append(self.pending)
            self.pending = None

    def _thinking(self, i: int, item: dict[str, Any]) -> str:
        parts = item.get("content") or []
        text = "".join(p.get("text", "") for p in parts if isinstance(p, dict))
        if text:
            return text
        sealed = item.get("encrypted_content")
        if isinstance(sealed, str):
            try:
                return self.seal.open(sealed)
            except ValueError as e:
                raise InvalidRequestError(str(e), f"{self.where(i)}.encrypted_content") from None
        return "".join(p.get("text", "") for p in item.get("summary", []) if isinstance(p, dict))

    def _content(self, i: int, parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
        """The text of a message (file parts were read into text parts before: see
        `with_file_texts`), or its text and image parts where it has images (encoded
        before, for a model that takes them: an unread one is refused)."""
        where = self.where(i)
        for j, p in enumerate(parts):
            if p["type"] == "input_image":
                raise InvalidRequestError(
                    f"{where}.content[{j}]: this model is served for text only, so it takes no "
                    "input_image parts; the part is refused rather than dropped",
                    f"{where}.content[{j}]",
                )
            if p["type"] not in (*TEXT_PARTS, "image"):
                raise InvalidRequestError(f"{where}: a file part was not read", f"{where}.content")
        if any(p["type"] == "image" for p in parts):
            return [p if p["type"] == "image" else {"type": "text", "text": p["text"]} for p in parts]
        return "\n".join(p["text"] for p in parts)


def has_files(items: list[dict[str, Any]], images: bool = False) -> bool:
    """Whether messages of `items` have file parts (with `images`, or image parts) to read."""
    kinds = ("input_file", "input_image") if images else ("input_file",)
    return any(p.get("type") in kinds for x in items if x["type"] == "message" for p in x["content"])


def with_file_texts(items: list[dict[str, Any]], expanded: list[Any]) -> list[dict[str, Any]]:
    """Items whose `input_file` parts are replaced by the text parts `Attachments.expand`
    made of them (`expanded[i]` is item i as a message of parts)."""
    out = []
    for item, message in zip(items, expanded, strict=True):
        content = message.get("content") if isinstance(message, dict) else None
        if item["type"] == "message" and isinstance(content, list) and content != item["content"]:
            parts = [
                {"type": "input_text", "text": p["text"]} if p.get("type") == "text" else p for p in content
            ]
            item = {**item, "content": parts}
        out.append(item)
    return out


def _chat_call(item: dict[str, Any]) -> dict[str, Any]:
    if item["type"] == "custom_tool_call":
        arguments = json.dumps({CUSTOM_INPUT: item["input"]}, ensure_ascii=False)
    else:
        arguments = item["arguments"]
    return {
        "id": item["call_id"],
        "type": "function",
        "function": {"name": item["name"], "arguments": arguments},
    }


def _output_text(output: str | list[Any]) -> str:
    if isinstance(output, str):
        return output
    return "\n".join(p["text"] for p in output if isinstance(p, dict) and isinstance(p.get("text"), str))


def _merge_leading_system(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Instructions and the developer messages that open the input become one system message:
    many templates take only one, first."""
    head = 0
    while (
        head < len(messages)
        and messages[head]["role"] in ("system", "developer")
        and isinstance(messages[head]["content"], str)
    ):
        head += 1
    if head < 2:
        return messages
    merged = {"role": "system", "content": "\n\n".join(m["content"] for m in messages[:head])}
    return [merged, *messages[head:]]
