"""Wire shapes of the Responses API: the request (pydantic) and the response
object, output items and usage (plain dicts, built here and nowhere else).

Output objects are dicts rather than models: a streamed response builds one
event per token, and dicts go straight to orjson.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from pydantic import AliasChoices, Field

from mistralrs_serve.entrypoints.openai.protocol import SamplingExtensions

INCLUDE_LOGPROBS = "message.output_text.logprobs"
INCLUDE_ENCRYPTED_REASONING = "reasoning.encrypted_content"
# OpenAI's other include values name hosted-tool outputs this server never produces: accepted, no effect.
INCLUDE_VALUES = (
    INCLUDE_LOGPROBS,
    INCLUDE_ENCRYPTED_REASONING,
    "file_search_call.results",
    "web_search_call.results",
    "web_search_call.action.sources",
    "message.input_image.image_url",
    "computer_call_output.output.image_url",
    "code_interpreter_call.outputs",
)
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")
MAX_METADATA_KEYS, MAX_METADATA_KEY_CHARS, MAX_METADATA_VALUE_CHARS = 16, 64, 512


class ResponsesRequest(SamplingExtensions):
    """POST /v1/responses. Every field may be null, which means its default."""

    model: str | None = None
    input: str | list[Any] | None = None
    instructions: str | list[Any] | None = None
    previous_response_id: str | None = None
    max_output_tokens: int | None = Field(
        None, validation_alias=AliasChoices("max_output_tokens", "max_tokens", "max_completion_tokens")
    )
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    include: list[str] | None = None
    metadata: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    background: bool | None = None
    stream: bool | None = None
    stream_options: dict[str, Any] | None = None
    text: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    truncation: str | None = None
    max_tool_calls: int | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    service_tier: str | None = None
    conversation: Any = None
    prompt: Any = None


def new_id(prefix: str) -> str:
    """OpenAI's id style for Responses objects: `resp_...`, `msg_...`, `fc_...`."""
    return f"{prefix}_{uuid.uuid4().hex}"


def now_s() -> int:
    return int(time.time())


# --- output items ------------------------------------------------------------


def output_text_part(text: str = "", logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


def message_item(item_id: str, status: str, content: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": content}


def reasoning_item(item_id: str, status: str, text: str | None) -> dict[str, Any]:
    content = [{"type": "reasoning_text", "text": text}] if text is not None else []
    return {"id": item_id, "type": "reasoning", "status": status, "summary": [], "content": content}


def function_call_item(
    item_id: str, status: str, call_id: str, name: str, arguments: str, namespace: str | None
) -> dict[str, Any]:
    item = {
        "id": item_id,
        "type": "function_call",
        "status": status,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
    }
    if namespace is not None:
        item["namespace"] = namespace
    return item


def custom_call_item(
    item_id: str, status: str, call_id: str, name: str, tool_input: str, namespace: str | None
) -> dict[str, Any]:
    item = {
        "id": item_id,
        "type": "custom_tool_call",
        "status": status,
        "call_id": call_id,
        "name": name,
        "input": tool_input,
    }
    if namespace is not None:
        item["namespace"] = namespace
    return item


def usage(num_input: int, num_cached: int, num_output: int, num_reasoning: int) -> dict[str, Any]:
    return {
        "input_tokens": num_input,
        "input_tokens_details": {"cached_tokens": num_cached, "cache_write_tokens": 0},
        "output_tokens": num_output,
        "output_tokens_details": {"reasoning_tokens": num_reasoning},
        "total_tokens": num_input + num_output,
    }


def error_object(message: str, code: str = "server_error") -> dict[str, Any]:
    return {"code": code, "message": message}


def response_object(
    req: ResponsesRequest,
    *,
    response_id: str,
    created_at: int,
    model: str,
    tools: list[dict[str, Any]],
    text_format: dict[str, Any],
    temperature: float,
    top_p: float,
) -> dict[str, Any]:
    """A new response, queued; every field of OpenAI's `Response` (the SDK-only `output_text`
    aside; `usage` comes when it ends)."""
    text: dict[str, Any] = {"format": text_format}
    verbosity = (req.text or {}).get("verbosity")
    if verbosity is not None:
        text["verbosity"] = verbosity
    obj: dict[str, Any] = {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": "queued",
        "completed_at": None,
        "error": None,
        "incomplete_details": None,
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "max_tool_calls": None,
        "model": model,
        "output": [],
        "parallel_tool_calls": req.parallel_tool_calls is not False,
        "previous_response_id": req.previous_response_id,
        "reasoning": _reasoning_echo(req.reasoning),
        "background": bool(req.background),
        "conversation": None,
        "prompt": None,
        "prompt_cache_key": req.prompt_cache_key,
        "prompt_cache_retention": req.prompt_cache_retention
        if req.prompt_cache_retention in _RETENTIONS
        else None,
        "safety_identifier": req.safety_identifier,
        "service_tier": req.service_tier if req.service_tier in _SERVICE_TIERS else "default",
        "store": req.store is not False,
        "temperature": temperature,
        "text": text,
        "tool_choice": req.tool_choice if req.tool_choice is not None else "auto",
        "tools": tools,
        "top_logprobs": req.top_logprobs or 0,
        "top_p": top_p,
        "truncation": req.truncation or "disabled",
        "metadata": req.metadata or {},
        "moderation": None,
    }
    if req.user is not None:
        obj["user"] = req.user
    return obj


_SERVICE_TIERS = ("auto", "default", "flex", "scale", "priority")
_RETENTIONS = ("in_memory", "24h")  # accepted, no effect: the prefix cache keeps what fits


def _reasoning_echo(reasoning: dict[str, Any] | None) -> dict[str, Any]:
    reasoning = reasoning or {}
    return {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")}


def deleted_object(response_id: str) -> dict[str, Any]:
    return {"id": response_id, "object": "response.deleted", "deleted": True}


def item_list(items: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    """OpenAI's `ResponseItemList` (an empty page has null ids, as OpenAI's own)."""
    return {
        "object": "list",
        "data": items,
        "first_id": items[0]["id"] if items else None,
        "last_id": items[-1]["id"] if items else None,
        "has_more": has_more,
    }
