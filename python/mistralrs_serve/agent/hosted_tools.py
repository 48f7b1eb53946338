"""Which server-side tools a request asks for, checked against the spec's
rules and against what this server has enabled.

Hosted tool entries (`web_search`, `web_search_preview`, `code_interpreter`,
`shell`) are read from Chat Completions and Responses `tools` alike, and the
Chat extensions (`web_search_options`, `max_tool_rounds`, `session_id`,
`files`, `agent_permission`) beside them. Every shape the spec rejects is a
400 naming the field. A hosted tool the server cannot serve as asked (not
enabled, or `external_web_access: false`) is left out of the model's tools
with a logged warning: Codex sends `{"type": "web_search",
"external_web_access": false}` on every turn, and refusing it would refuse
every Codex request. Forcing a hosted tool through `tool_choice` is refused
by the callers (responses_tools.py, tools.py).
"""

from __future__ import annotations

import logging
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any

from mistralrs_serve.config import AgentConfig
from mistralrs_serve.errors import InvalidRequestError

logger = logging.getLogger(__name__)

WEB_SEARCH_TYPES = frozenset({"web_search", "web_search_2025_08_26"})
WEB_SEARCH_PREVIEW_TYPES = frozenset({"web_search_preview", "web_search_preview_2025_03_11"})
SERVED_TYPES = WEB_SEARCH_TYPES | WEB_SEARCH_PREVIEW_TYPES | {"code_interpreter", "shell"}
MAX_REQUIRED_FILES = 32
MAX_TOOL_ROUNDS = 64
_SKILL_ID = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")


@dataclass(frozen=True)
class SkillRef:
    skill_id: str
    version: str | None  # a positive integer as text, "latest", or None for the skill's default
    param: str  # where the request named it, for errors


@dataclass
class HostedTools:
    """What a request asks the agentic runtime for (empty: it asks for nothing)."""

    search: Any = None  # agent.web_search.SearchOptions when web search is on for this request
    code: bool = False
    shell: bool = False
    skills: list[SkillRef] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # hosted tool types left out (with the reason logged)

    @property
    def any(self) -> bool:
        return self.search is not None or self.code or self.shell


def read_hosted_tools(tools: list[Any] | None, cfg: AgentConfig) -> tuple[HostedTools, list[Any]]:
    """A request's `tools`: the hosted ones this runtime serves, read into HostedTools
    (each checked by the spec's rules), and the rest as they came."""
    hosted, rest = HostedTools(), []
    for i, tool in enumerate(tools or []):
        if isinstance(tool, dict) and tool.get("type") in SERVED_TYPES:
            read_hosted_tool(tool, f"tools[{i}]", cfg, hosted)
        else:
            rest.append(tool)
    return hosted, rest


def read_hosted_tool(tool: dict[str, Any], where: str, cfg: AgentConfig, out: HostedTools) -> None:
    """One hosted entry of `tools` (its type in SERVED_TYPES) into `out`."""
    kind = tool.get("type")
    if kind in WEB_SEARCH_TYPES or kind in WEB_SEARCH_PREVIEW_TYPES:
        _web_search(tool, where, cfg, out)
    elif kind == "code_interpreter":
        _check_container(tool.get("container"), f"{where}.container")
        _enable(out, "code_interpreter", cfg.enable_code_execution, "--enable-code-execution")
    elif kind == "shell":
        skills = _shell_skills(tool.get("environment"), f"{where}.environment")
        if _enable(out, "shell", cfg.enable_shell, "--enable-shell"):
            out.skills.extend(skills)


def _enable(out: HostedTools, kind: str, enabled: bool, flag: str) -> bool:
    if not enabled:
        logger.warning("the hosted tool %r is left out: this server was not started with %s", kind, flag)
        out.dropped.append(kind)
        return False
    if kind == "code_interpreter":
        out.code = True
    elif kind == "shell":
        out.shell = True
    return True


def _web_search(tool: dict[str, Any], where: str, cfg: AgentConfig, out: HostedTools) -> None:
    from mistralrs_serve.agent.web_search import SearchOptions, UnservableToolError

    try:
        options = SearchOptions.from_tool(tool, where)
    except UnservableToolError as e:
        logger.warning("the hosted tool %r is left out: %s", tool.get("type"), e)
        out.dropped.append(str(tool.get("type")))
        return
    if _enable(out, str(tool.get("type")), cfg.enable_search, "--enable-search"):
        out.search = options


def _check_container(container: Any, where: str) -> None:
    """The one supported container: `{"type": "auto"}` (OpenAI's default, also when absent)."""
    if container is None or container == "auto":
        return
    if isinstance(container, str):
        raise InvalidRequestError(f"{where}: container ids are not supported; use {{'type': 'auto'}}", where)
    if not isinstance(container, dict) or container.get("type", "auto") != "auto":
        raise InvalidRequestError(f"{where} must be {{'type': 'auto'}}", f"{where}.type")
    for key in ("file_ids", "memory_limit"):
        if container.get(key) is not None:
            raise InvalidRequestError(
                f"{where}.{key} is not supported: the code interpreter runs in the server's own "
                "sandbox (attach files to the conversation instead)",
                f"{where}.{key}",
            )


def _shell_skills(environment: Any, where: str) -> list[SkillRef]:
    """A shell tool's environment: only `container_auto`, with uploaded `skill_reference` skills."""
    if environment is None:
        return []
    if not isinstance(environment, dict):
        raise InvalidRequestError(f"{where} must be an object", where)
    kind = environment.get("type")
    if kind in ("local", "container_reference"):
        raise InvalidRequestError(
            f"{where}.type {kind!r} is not supported: shell commands run in the server's sandboxed "
            "session directory; use {'type': 'container_auto'}",
            f"{where}.type",
        )
    if kind != "container_auto":
        raise InvalidRequestError(f"{where}.type must be 'container_auto'", f"{where}.type")
    for key in ("file_ids", "memory_limit", "network_policy"):
        if environment.get(key) is not None:
            raise InvalidRequestError(f"{where}.{key} is not supported", f"{where}.{key}")
    skills = environment.get("skills") or []
    if not isinstance(skills, list):
        raise InvalidRequestError(f"{where}.skills must be a list", f"{where}.skills")
    return [_skill_ref(s, f"{where}.skills[{i}]") for i, s in enumerate(skills)]


def _skill_ref(skill: Any, where: str) -> SkillRef:
    kind = skill.get("type") if isinstance(skill, dict) else None
    if kind != "skill_reference":
        what = "inline skills" if kind == "inline" else "local skill paths" if kind is None else repr(kind)
        raise InvalidRequestError(
            f"{where}: {what} are not supported; upload the skill with POST /v1/skills and use "
            "{'type': 'skill_reference', 'skill_id': ...}",
            f"{where}.type",
        )
    assert isinstance(skill, dict)
    skill_id = skill.get("skill_id")
    if not isinstance(skill_id, str) or not _SKILL_ID.match(skill_id):
        raise InvalidRequestError(f"{where}.skill_id must be a skill id", f"{where}.skill_id")
    version = skill.get("version")
    if version is not None and not (
        isinstance(version, str) and (version == "latest" or (version.isdigit() and int(version) > 0))
    ):
        raise InvalidRequestError(
            f"{where}.version must be a positive integer or 'latest'", f"{where}.version"
        )
    return SkillRef(skill_id, version, where)


def read_web_search_options(options: Any, cfg: AgentConfig, out: HostedTools) -> None:
    """The Chat extension `web_search_options`: search for this request, or a 400 when the server has none."""
    from mistralrs_serve.agent.web_search import SearchOptions

    if not isinstance(options, dict):
        raise InvalidRequestError("web_search_options must be an object", "web_search_options")
    parsed = SearchOptions.from_web_search_options(options)
    if not cfg.enable_search:
        raise InvalidRequestError(
            "web_search_options needs web search, which this server was not started with "
            "(--enable-search or --agent)",
            "web_search_options",
        )
    out.search = parsed


def read_max_tool_rounds(value: Any, param: str = "max_tool_rounds") -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_TOOL_ROUNDS:
        raise InvalidRequestError(f"{param} must be an integer from 1 to {MAX_TOOL_ROUNDS}", param)
    return value


def read_required_files(value: Any) -> list[str]:
    """`files`: names of the output files the run must leave in the session directory."""
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_REQUIRED_FILES:
        raise InvalidRequestError(f"files must be a list of at most {MAX_REQUIRED_FILES} file names", "files")
    names = []
    for i, name in enumerate(value):
        where = f"files[{i}]"
        if not isinstance(name, str) or not name or len(name) > 255 or "\x00" in name:
            raise InvalidRequestError(f"{where} must be a relative file name", where)
        norm = posixpath.normpath(name)
        if name.startswith("/") or norm == ".." or norm.startswith("../") or "\\" in name:
            raise InvalidRequestError(
                f"{where} must be a path inside the session directory; got {name!r}", where
            )
        names.append(norm)
    return names
