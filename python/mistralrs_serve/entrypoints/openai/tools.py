"""`tools` and `tool_choice` of a chat request: validation, which functions
the model may call, and whether it must call one.

A call the request obliges (`required`, a named function, `allowed_tools`
with mode `required`) is guaranteed by constraining the output to a tool
call in the model family's own format; `parallel_tool_calls: false` and
`strict` functions constrain `auto` too (text, or text then calls).
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from typing import Any

from mistralrs_serve.errors import InvalidRequestError

_NAME = re.compile(r"^[A-Za-z0-9_\-.]{1,64}$")
CHOICES = ("none", "auto", "required")


@dataclass(frozen=True)
class ToolPlan:
    """What the request asks of tools. `tools` are the functions offered to
    the model (already narrowed by `allowed_tools`); `mode` is none, auto or
    required; `parallel` allows several calls per turn."""

    tools: list[dict[str, Any]]
    mode: str
    parallel: bool

    @property
    def active(self) -> bool:
        return self.mode != "none" and bool(self.tools)

    @property
    def names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]

    @property
    def any_strict(self) -> bool:
        return any(t["function"].get("strict") for t in self.tools)


def _check_tool(index: int, tool: Any) -> dict[str, Any]:
    where = f"tools[{index}]"
    if not isinstance(tool, dict):
        raise InvalidRequestError(f"{where} must be an object", where)
    kind = tool.get("type", "function")
    if kind != "function":
        raise InvalidRequestError(
            f"{where}.type {kind!r} is not supported; only function tools are "
            "(hosted tools need the agentic runtime)",
            f"{where}.type",
        )
    function = tool.get("function")
    if not isinstance(function, dict):
        raise InvalidRequestError(f"{where}.function must be an object", f"{where}.function")
    name = function.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidRequestError(
            f"{where}.function.name must be 1-64 letters, digits, '_', '-' or '.'; got {name!r}",
            f"{where}.function.name",
        )
    parameters = function.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise InvalidRequestError(
            f"{where}.function.parameters must be a JSON schema object", f"{where}.function.parameters"
        )
    strict = function.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise InvalidRequestError(f"{where}.function.strict must be a boolean", f"{where}.function.strict")
    return {"type": "function", "function": function}


def _ref_name(ref: Any, where: str) -> str:
    """A function named by `{"type": "function", "function": {"name"}}` or `{"type": "function", "name"}`."""
    if isinstance(ref, dict) and ref.get("type", "function") == "function":
        inner = ref.get("function")
        name = inner.get("name") if isinstance(inner, dict) else ref.get("name")
        if isinstance(name, str):
            return name
    raise InvalidRequestError(
        f'{where} must name a function: {{"type": "function", "function": {{"name": ...}}}}', where
    )


def _pick(tools: list[dict[str, Any]], names: list[str], where: str) -> list[dict[str, Any]]:
    declared = {t["function"]["name"]: t for t in tools}
    unknown = [n for n in names if n not in declared]
    if unknown:
        raise InvalidRequestError(
            f"{where} names {unknown[0]!r}, which is not among the declared tools ({', '.join(declared)})",
            where,
        )
    return [declared[n] for n in dict.fromkeys(names)]


def _allowed_tools(choice: dict[str, Any], tools: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """OpenAI nests `{"allowed_tools": {"mode", "tools"}}`; the spec's flat form has them at the top."""
    nested = choice.get("allowed_tools")
    spec: dict[str, Any] = nested if isinstance(nested, dict) else choice
    mode = spec.get("mode", "auto")
    if mode not in ("auto", "required"):
        raise InvalidRequestError(
            f"tool_choice.mode must be auto or required; got {mode!r}", "tool_choice.mode"
        )
    refs = spec.get("tools")
    if not isinstance(refs, list) or not refs:
        raise InvalidRequestError(
            "tool_choice.tools must be a non-empty list of functions", "tool_choice.tools"
        )
    names = [_ref_name(r, f"tool_choice.tools[{i}]") for i, r in enumerate(refs)]
    return _pick(tools, names, "tool_choice.tools"), mode


def plan_tools(tools: Any, tool_choice: Any, parallel_tool_calls: bool | None) -> ToolPlan:
    """Validate the request's tool fields; raise InvalidRequestError with the field's name."""
    if tools is not None and not isinstance(tools, list):
        raise InvalidRequestError("tools must be a list", "tools")
    checked = [_check_tool(i, t) for i, t in enumerate(tools or [])]
    parallel = parallel_tool_calls is not False
    if tool_choice is None:
        return ToolPlan(checked, "auto", parallel)
    if isinstance(tool_choice, str):
        if tool_choice not in CHOICES:
            raise InvalidRequestError(
                f"tool_choice must be one of {', '.join(CHOICES)} or an object; got {tool_choice!r}",
                "tool_choice",
            )
        if tool_choice != "none" and not checked:
            raise InvalidRequestError(f"tool_choice {tool_choice!r} requires tools", "tool_choice")
        return ToolPlan(checked, tool_choice, parallel)
    if not isinstance(tool_choice, dict):
        raise InvalidRequestError("tool_choice must be a string or an object", "tool_choice")
    if not checked:
        raise InvalidRequestError("tool_choice is only allowed when tools are given", "tool_choice")
    if tool_choice.get("type") == "allowed_tools":
        allowed, mode = _allowed_tools(tool_choice, checked)
        return ToolPlan(allowed, mode, parallel)
    name = _ref_name(tool_choice, "tool_choice")
    return ToolPlan(_pick(checked, [name], "tool_choice"), "required", parallel)


def tool_system_prompt(tools: list[dict[str, Any]]) -> str:
    """Tool instructions for a chat template that has no tool support of its
    own; the reply format is the plain-JSON one the fallback parser reads."""
    specs = [
        {
            "name": t["function"]["name"],
            "description": t["function"].get("description", ""),
            "parameters": t["function"].get("parameters", {"type": "object"}),
        }
        for t in tools
    ]
    lines = [
        "You can call these functions:",
        *(json.dumps(s, ensure_ascii=False) for s in specs),
        "To call a function, reply with only a JSON object: "
        '{"name": <function name>, "arguments": <arguments object>}.',
    ]
    return "\n".join(lines)


def with_tool_prompt(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages for a template without tool support: the tool instructions in
    the system message, and earlier calls written out as their JSON."""
    prompt = tool_system_prompt(tools)
    out = [_calls_as_text(m) for m in messages]
    if out and out[0].get("role") == "system" and isinstance(out[0].get("content"), str):
        out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{prompt}"}
    else:
        out.insert(0, {"role": "system", "content": prompt})
    return out


def _calls_as_text(message: dict[str, Any]) -> dict[str, Any]:
    calls = message.get("tool_calls")
    if message.get("role") != "assistant" or not calls:
        return message
    written = []
    for call in calls:
        function = call.get("function", {}) if isinstance(call, dict) else {}
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            with contextlib.suppress(json.JSONDecodeError):
                arguments = json.loads(arguments)
        written.append(json.dumps({"name": function.get("name"), "arguments": arguments}, ensure_ascii=False))
    text = "\n".join(written)
    content = message.get("content")
    return {**message, "content": f"{content}\n{text}" if content else text, "tool_calls": None}
