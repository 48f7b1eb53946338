"""The agentic runtime of one server: the executors the flags turned on, the
sandbox they share, sessions, approvals and Skills, and the plan of each
request that engages the loop (loop.py).

`AgentRuntime.plan_chat` decides whether a Chat Completions request engages
the loop and what it may use; the Responses endpoint builds its plan with
`plan` from the hosted tools it read itself. Everything a request may not do
is refused here, before any token is generated.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from mistralrs_serve.agent.approvals import effective_permission, request_permission
from mistralrs_serve.agent.hosted_tools import (
    SERVED_TYPES,
    HostedTools,
    SkillRef,
    read_hosted_tools,
    read_max_tool_rounds,
    read_required_files,
    read_web_search_options,
)
from mistralrs_serve.agent.tool import OutputFile, ServerTool, ToolContext
from mistralrs_serve.config import AgentConfig
from mistralrs_serve.errors import InvalidRequestError

if TYPE_CHECKING:
    from mistralrs_serve.agent.loop import AgentCall, AgentResult
    from mistralrs_serve.entrypoints.openai.protocol import ChatCompletionRequest

logger = logging.getLogger(__name__)


@dataclass
class AgentPlan:
    """What one request's loop may use, fixed before it starts."""

    tools: dict[str, ServerTool]  # server-side tools by the name the model calls
    client_tools: list[dict[str, Any]]  # chat-form function tools the client runs itself
    hosted: HostedTools
    max_rounds: int
    permission: str  # auto, ask or deny: the stricter of the server's and the request's
    required_files: list[str]
    session: Any  # agent.sessions.AgentSession
    messages: list[dict[str, Any]]  # the conversation the first round continues
    remembered: dict[str, str] = field(default_factory=dict)  # tool name -> auto/deny, this session


class AgentRuntime:
    def __init__(
        self,
        cfg: AgentConfig,
        *,
        files: Any,
        sessions: Any,
        approvals: Any,
        skills: Any = None,
    ) -> None:
        self.cfg = cfg
        self.files, self.sessions, self.approvals, self.skills = files, sessions, approvals, skills
        self.sandbox: Any = None
        self.code: Any = None
        self.shell: Any = None
        self.search: Any = None
        self.mcp: Any = None
        self.loop: asyncio.AbstractEventLoop | None = None  # the server's, set by start()
        if cfg.enable_code_execution or cfg.enable_shell:
            from mistralrs_serve.agent.sandbox import Sandbox

            self.sandbox = Sandbox.from_config(cfg)  # sandbox "on" without bubblewrap fails the start here
        if cfg.enable_code_execution:
            from mistralrs_serve.agent.code_interpreter import CodeInterpreter

            self.code = CodeInterpreter(cfg, self.sandbox)
        if cfg.enable_shell:
            from mistralrs_serve.agent.shell import ShellExecutor

            self.shell = ShellExecutor(cfg, self.sandbox)
        if cfg.enable_search:
            from mistralrs_serve.agent.web_search import WebSearch

            self.search = WebSearch(cfg)
        if cfg.mcp_config:
            from mistralrs_serve.agent.mcp_tools import load_mcp_config

            load_mcp_config(cfg.mcp_config)  # a bad file fails the start here, before the model loads

    async def start(self) -> None:
        """Connect to the MCP servers of --mcp-config (a bad config fails the start)."""
        self.loop = asyncio.get_running_loop()
        self.sessions.add_close_hook(self.close_session)
        if self.cfg.mcp_config:
            from mistralrs_serve.agent.mcp_tools import McpToolSet

            self.mcp = await McpToolSet.start(self.cfg.mcp_config, max_output_bytes=self.cfg.max_output_bytes)

    async def aclose(self) -> None:
        if self.code is not None:
            await self.code.aclose()
        if self.mcp is not None:
            await self.mcp.aclose()

    def close_session(self, session_id: str) -> None:
        """A session was deleted or expired (on any thread): its interpreter goes with it."""
        if self.code is None or self.loop is None or self.loop.is_closed():
            return
        future = asyncio.run_coroutine_threadsafe(self.code.close_session(session_id), self.loop)
        future.add_done_callback(lambda f: f.exception())  # a failure is logged by the interpreter

    # planning

    def engages_chat(self, req: ChatCompletionRequest) -> bool:
        """Whether a chat request needs the loop (otherwise it runs as a plain chat request)."""
        if any(
            getattr(req, name) is not None for name in ("web_search_options", "max_tool_rounds", "session_id")
        ):
            return True
        for tool in req.tools or []:
            if not isinstance(tool, dict):
                continue
            if tool.get("type") in SERVED_TYPES:
                return True
            if tool.get("type", "function") == "function" and self._executor_for(tool) is not None:
                return True
        return False

    def engages_responses(self, hosted: HostedTools, chat_tools: list[dict[str, Any]]) -> bool:
        return hosted.any or any(self._executor_for(t) is not None for t in chat_tools)

    async def plan_chat(self, req: ChatCompletionRequest) -> AgentPlan:
        hosted, client_tools = read_hosted_tools(req.tools, self.cfg)
        if req.web_search_options is not None:
            read_web_search_options(req.web_search_options, self.cfg, hosted)
        if req.n != 1:
            raise InvalidRequestError("n must be 1 when the server runs tools (the agent loop)", "n")
        permission = self.effective_permission(req.agent_permission, req.code_execution_permission)
        if permission == "ask" and not req.stream:
            raise InvalidRequestError(
                "agent_permission 'ask' needs stream: true (the approval request is a stream event)",
                "agent_permission",
            )
        return await self.plan(
            hosted,
            client_tools,
            messages=req.messages if isinstance(req.messages, list) else [],
            session_id=req.session_id,
            max_rounds=read_max_tool_rounds(req.max_tool_rounds),
            permission=permission,
            required_files=read_required_files(req.files),
        )

    async def plan(
        self,
        hosted: HostedTools,
        client_tools: list[dict[str, Any]],
        *,
        messages: list[dict[str, Any]],
        session_id: str | None,
        max_rounds: int | None,
        permission: str,
        required_files: list[str],
        history: bool = True,
    ) -> AgentPlan:
        """`history`: whether the conversation is the session's, spliced with `messages`
        (chat; see agent/sessions.py), or `messages` alone (a Responses chain carries its own)."""
        tools = self._server_tools(hosted)
        kept: list[dict[str, Any]] = []
        for tool in client_tools:
            executor = self._executor_for(tool)
            if executor is not None:
                tools.setdefault(executor.spec.name, executor)
            else:
                kept.append(tool)
        _check_names(kept, tools)
        session = await anyio.to_thread.run_sync(self.sessions.resolve, session_id, messages)
        if hosted.skills:
            await anyio.to_thread.run_sync(self._install_skills, hosted.skills, session.workdir)
        if history:
            messages = session.messages  # the stored conversation spliced with the request's (sessions.py)
        return AgentPlan(
            tools=tools,
            client_tools=kept,
            hosted=hosted,
            max_rounds=max_rounds if max_rounds is not None else self.cfg.max_tool_rounds,
            permission=permission,
            required_files=required_files,
            session=session,
            messages=list(messages),
            remembered={name: "deny" if v == "deny" else "auto" for name, v in session.approvals.items()},
        )

    def _server_tools(self, hosted: HostedTools) -> dict[str, ServerTool]:
        tools: list[ServerTool] = []
        if hosted.search is not None and self.search is not None:
            tools += self.search.tools(hosted.search)
        if hosted.code and self.code is not None:
            tools += self.code.tools()
        if hosted.shell and self.shell is not None:
            tools += self.shell.tools()
        if self.mcp is not None:
            tools += self.mcp.tools()
        return {t.spec.name: t for t in tools}

    def _executor_for(self, tool: dict[str, Any]) -> ServerTool | None:
        """The server-side executor of a client function tool: an MCP tool of that
        name, else the dispatch URL when one is configured."""
        function = tool.get("function") if isinstance(tool.get("function"), dict) else tool
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str):
            return None
        if self.mcp is not None:
            for mcp_tool in self.mcp.tools():
                if mcp_tool.spec.name == name:
                    return mcp_tool
        if self.cfg.tool_dispatch_url:
            from mistralrs_serve.agent.dispatch import dispatch_tools

            nested = tool if "function" in tool else {"type": "function", "function": tool}
            found = dispatch_tools(
                self.cfg.tool_dispatch_url, [nested], max_output_bytes=self.cfg.max_output_bytes
            )
            return found[0] if found else None
        return None

    def _install_skills(self, refs: list[SkillRef], workdir: Path) -> None:
        if self.skills is None:
            raise InvalidRequestError("this server keeps no skills", refs[0].param)
        from mistralrs_serve.store.skills import parse_version

        for ref in refs:
            version = parse_version(ref.version, f"{ref.param}.version")
            self.skills.install(ref.skill_id, version, workdir, param=f"{ref.param}.skill_id")

    # permissions

    def effective_permission(self, requested: str | None, alias: str | None) -> str:
        """The server's --agent-permission, tightened (never loosened) by the request."""
        return effective_permission(self.cfg.agent_permission, request_permission(requested, alias))

    def permission_for(self, plan: AgentPlan, call: AgentCall) -> str:
        remembered = plan.remembered.get(call.name)
        if plan.permission == "ask" and remembered is not None:
            return remembered
        return plan.permission

    def request_approval(self, plan: AgentPlan, call: AgentCall) -> Any:
        return self.approvals.create(plan.session.id, call.name, call.arguments)

    async def await_approval(self, plan: AgentPlan, call: AgentCall, approval_id: str) -> str:
        decision = await self.approvals.wait(approval_id)
        verdict = "auto" if decision.approved else "deny"
        if decision.remember_for_session:
            plan.remembered[call.name] = verdict
        return verdict

    # after the loop

    async def collect_required_files(
        self, plan: AgentPlan, ctx: ToolContext
    ) -> tuple[list[OutputFile], list[str]]:
        """The request's `files`: each one the run left in the session directory, stored."""
        if not plan.required_files:
            return [], []
        return await anyio.to_thread.run_sync(
            self._store_files, plan.required_files, Path(ctx.session.workdir)
        )

    def _store_files(self, names: list[str], workdir: Path) -> tuple[list[OutputFile], list[str]]:
        found, missing = [], []
        root = workdir.resolve()
        for name in names:
            path = (workdir / name).resolve()
            if not path.is_relative_to(root) or not path.is_file():
                missing.append(name)
                continue
            data = path.read_bytes()
            if self.files is None:
                missing.append(name)
                continue
            stored = self.files.create(data, filename=path.name, purpose="assistants_output")
            found.append(OutputFile(stored.id, path.name, len(data), stored.content_type))
        return found, missing

    async def save_session(self, plan: AgentPlan, result: AgentResult) -> None:
        await anyio.to_thread.run_sync(
            lambda: self.sessions.save(
                plan.session,
                result.messages,
                approvals=plan.remembered,
                files=[f.file_id for f in result.files],
            )
        )


def _check_names(client_tools: list[dict[str, Any]], server: dict[str, ServerTool]) -> None:
    for i, tool in enumerate(client_tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if name in server:
            raise InvalidRequestError(
                f"tools[{i}]: the function name {name!r} is taken by a server-side tool of this request; "
                "rename the function",
                f"tools[{i}].function.name",
            )
