"""Responses `tools`, `tool_choice` and `text.format`, turned into the chat
endpoint's forms, so that tool planning, constrained decoding and call
parsing are the chat endpoint's own.

Function tools come flat (`{"type": "function", "name", ...}`) or nested as in
chat; a `namespace` tool's functions join the set (a call to one carries the
namespace back); a `custom` tool becomes a function of one string argument,
`input` (constrained by its regex when it gives one). Hosted tools (web
search, code interpreter, shell) are read by the agent runtime
(agent/hosted_tools.py); the others are left out with a warning, and forcing
any hosted tool is a 400.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

from mistralrs_serve.agent.hosted_tools import SERVED_TYPES
from mistralrs_serve.errors import InvalidRequestError

logger = logging.getLogger(__name__)

HOSTED_TOOL_TYPES = frozenset(
    {
        "web_search",
        "web_search_preview",
        "web_search_preview_2025_03_11",
        "web_search_2025_08_26",
        "file_search",
        "code_interpreter",
        "computer",
        "computer_use",
        "computer_use_preview",
        "image_generation",
        "mcp",
        "local_shell",
        "shell",
        "apply_patch",
        "tool_search",
        "programmatic_tool_calling",
    }
)
_NAME = re.compile(r"^[A-Za-z0-9_\-.]{1,128}$")
CUSTOM_INPUT = "input"  # the one argument of a custom tool, as the model sees it


@dataclass
class ToolSet:
    """The request's tools: what the model is offered (chat form), what the
    response echoes, and how a call's name is read back."""

    chat_tools: list[dict[str, Any]] = field(default_factory=list)
    echo: list[dict[str, Any]] = field(default_factory=list)
    origins: list[str] = field(default_factory=list)  # chat tool i came from this request path
    namespaces: dict[str, str] = field(default_factory=dict)  # function name -> its namespace
    custom: set[str] = field(default_factory=set)  # names of custom tools
    hosted: set[str] = field(default_factory=set)  # hosted tool types that were left out

    def add(self, function: dict[str, Any], where: str, namespace: str | None) -> None:
        name = function["name"]
        if any(t["function"]["name"] == name for t in self.chat_tools):
            raise InvalidRequestError(
                f"{where}.name: a tool named {name!r} is declared twice", f"{where}.name"
            )
        self.chat_tools.append({"type": "function", "function": function})
        self.origins.append(where)
        if namespace is not None:
            self.namespaces[name] = namespace


def convert_tools(tools: list[Any] | None) -> ToolSet:
    out = ToolSet()
    for i, tool in enumerate(tools or []):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise InvalidRequestError(f"{where} must be an object", where)
        kind = tool.get("type", "function")
        if kind == "namespace":
            out.echo.append(_namespace(tool, where, out))
        elif kind in ("function", "custom"):
            out.echo.append(_member(tool, where, out, None))
        elif kind in HOSTED_TOOL_TYPES:
            out.hosted.add(kind)
            out.echo.append(tool)
        else:
            raise InvalidRequestError(f"{where}.type {kind!r} is not a known tool type", f"{where}.type")
    unserved = out.hosted - SERVED_TYPES  # the rest the agent runtime reads (agent/hosted_tools.py)
    if unserved:
        logger.warning(
            "hosted tools (%s) are left out: this server does not run them", ", ".join(sorted(unserved))
        )
    return out


def _namespace(tool: dict[str, Any], where: str, out: ToolSet) -> dict[str, Any]:
    name = tool.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidRequestError(f"{where}.name must be a non-empty string", f"{where}.name")
    members = tool.get("tools")
    if not isinstance(members, list) or not members:
        raise InvalidRequestError(f"{where}.tools must be a non-empty list of tools", f"{where}.tools")
    echoed = [_member(t, f"{where}.tools[{j}]", out, name) for j, t in enumerate(members)]
    return {**tool, "description": tool.get("description") or "", "tools": echoed}


def _member(tool: Any, where: str, out: ToolSet, namespace: str | None) -> dict[str, Any]:
    """A function or custom tool: added to the set; returns its echo in the response."""
    if not isinstance(tool, dict):
        raise InvalidRequestError(f"{where} must be an object", where)
    kind = tool.get("type", "function")
    if kind == "custom":
        return _custom(tool, where, out, namespace)
    if kind != "function":
        raise InvalidRequestError(
            f"{where}.type must be function or custom inside a namespace; got {kind!r}", f"{where}.type"
        )
    nested = tool.get("function")
    flat = not isinstance(nested, dict)
    spec = tool if flat else nested
    assert isinstance(spec, dict)  # for mypy: nested is a dict when not flat
    fwhere = where if flat else f"{where}.function"
    name = _name(spec, fwhere)
    parameters = spec.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise InvalidRequestError(f"{fwhere}.parameters must be a JSON schema object", f"{fwhere}.parameters")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise InvalidRequestError(f"{fwhere}.strict must be a boolean", f"{fwhere}.strict")
    # OpenAI's Responses functions are strict unless they say otherwise; chat's nested form is not.
    strict = flat if strict is None else strict
    function: dict[str, Any] = {"name": name}
    if isinstance(spec.get("description"), str):
        function["description"] = spec["description"]
    function["parameters"] = parameters or {"type": "object", "properties": {}}
    function["strict"] = strict
    out.add(function, where, namespace)
    return {"type": "function", **function}


def _custom(tool: dict[str, Any], where: str, out: ToolSet, namespace: str | None) -> dict[str, Any]:
    name = _name(tool, where)
    text: dict[str, Any] = {"type": "string"}
    fmt = tool.get("format")
    strict = False
    if isinstance(fmt, dict) and fmt.get("type") == "grammar":
        syntax, definition = fmt.get("syntax"), fmt.get("definition")
        if not isinstance(definition, str) or syntax not in ("lark", "regex"):
            raise InvalidRequestError(
                f"{where}.format must be a grammar with syntax lark or regex and a definition string",
                f"{where}.format",
            )
        if syntax == "regex":
            # A JSON Schema pattern matches anywhere in the string; the tool's regex is the whole input.
            text["pattern"] = f"^(?:{definition})$"
            strict = True
        else:
            logger.info("custom tool %s: its lark grammar is not enforced (free-form input)", name)
    elif fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise InvalidRequestError(f"{where}.format must be a text or grammar format", f"{where}.format")
    function = {
        "name": name,
        "description": tool.get("description") or "",
        "parameters": {
            "type": "object",
            "properties": {CUSTOM_INPUT: text},
            "required": [CUSTOM_INPUT],
            "additionalProperties": False,
        },
        "strict": strict,
    }
    out.add(function, where, namespace)
    out.custom.add(name)
    return tool


def _name(spec: dict[str, Any], where: str) -> str:
    name = spec.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidRequestError(
            f"{where}.name must be 1-128 letters, digits, '_', '-' or '.'; got {name!r}", f"{where}.name"
        )
    return name


def _forced_hosted(kind: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"tool_choice cannot force or filter the hosted tool {kind!r}: hosted tools run through the "
        "server-side agentic runtime, not the grammar-constrained function-tool path; use a function tool",
        "tool_choice",
    )


def convert_tool_choice(choice: Any, tools: ToolSet) -> Any:
    """The chat form of a Responses `tool_choice` (strings pass through; the chat planner checks names)."""
    if choice is None or isinstance(choice, str):
        return choice
    if not isinstance(choice, dict):
        raise InvalidRequestError("tool_choice must be a string or an object", "tool_choice")
    kind = choice.get("type")
    if kind in ("function", "custom"):
        return {"type": "function", "name": _choice_name(choice, "tool_choice")}
    if kind == "allowed_tools":
        refs = choice.get("tools")
        if not isinstance(refs, list):
            raise InvalidRequestError("tool_choice.tools must be a list of tools", "tool_choice.tools")
        names = [_allowed_ref(r, f"tool_choice.tools[{i}]") for i, r in enumerate(refs)]
        return {"type": "allowed_tools", "mode": choice.get("mode", "auto"), "tools": names}
    if kind in HOSTED_TOOL_TYPES:
        raise _forced_hosted(str(kind))
    raise InvalidRequestError(f"tool_choice.type {kind!r} is not a known tool choice", "tool_choice.type")


def _choice_name(ref: dict[str, Any], where: str) -> str:
    nested = ref.get("function")
    name = nested.get("name") if isinstance(nested, dict) else ref.get("name")
    if not isinstance(name, str):
        raise InvalidRequestError(f"{where}.name must name a declared tool", f"{where}.name")
    return name


def _allowed_ref(ref: Any, where: str) -> dict[str, Any]:
    kind = ref.get("type") if isinstance(ref, dict) else None
    if kind in ("function", "custom"):
        assert isinstance(ref, dict)
        return {"type": "function", "name": _choice_name(ref, where)}
    if kind in HOSTED_TOOL_TYPES:
        raise _forced_hosted(str(kind))
    raise InvalidRequestError(f"{where} must be a function or custom tool reference", where)


def convert_text_format(text: dict[str, Any] | None, response_format: Any) -> tuple[Any, dict[str, Any]]:
    """(chat `response_format`, the `text.format` the response echoes). `response_format`
    is the spec's alias, in chat's nested form or the flat one."""
    fmt = (text or {}).get("format")
    if fmt is not None and response_format is not None and fmt != response_format:
        raise InvalidRequestError("give text.format or response_format, not both", "response_format")
    given = fmt if fmt is not None else response_format
    if given is None:
        return None, {"type": "text"}
    param = "text.format" if fmt is not None else "response_format"
    if not isinstance(given, dict):
        raise InvalidRequestError(f"{param} must be an object", param)
    if given.get("type") != "json_schema":
        return given, given
    nested = given.get("json_schema")
    spec = nested if isinstance(nested, dict) else given
    inner = {k: spec[k] for k in ("name", "schema", "strict", "description") if spec.get(k) is not None}
    echo = {"type": "json_schema", "name": inner.get("name") or "response", **inner}
    if "schema" not in echo:
        raise InvalidRequestError(f"{param}.schema is required for a json_schema format", f"{param}.schema")
    return {"type": "json_schema", "json_schema": inner}, echo
