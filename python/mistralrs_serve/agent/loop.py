"""The agent loop: generate, run the server-side tools the model called, add
their results to the conversation, generate again.

One `AgentLoop` runs one request's rounds and reports them as events, so the
Chat Completions and Responses endpoints (entrypoints/openai/serving_agent.py
and responses_run.py) each turn the same run into their own objects and
streams. A round is one generation through `ChatServing.prepare` (the
request's own template, tool parsing and constrained arguments) with the
server tools offered as function tools. The loop stops when the model answers
without a server-side call, calls a client-side function (returned to the
client as usual), or has used its rounds: then one last generation without
the server tools makes it answer from what it has. Cancelling the task that
iterates the events (a disconnect, a Responses cancel) stops the loop where it
is and sets `cancelled`, which kills a running tool process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mistralrs_serve.agent.tool import OutputFile, ServerTool, ToolContext, ToolOutput
from mistralrs_serve.engine.sequence import StepOutput
from mistralrs_serve.entrypoints.openai.chat_output import OutputDelta, message_content, openai_call
from mistralrs_serve.entrypoints.openai.protocol import ChatCompletionRequest
from mistralrs_serve.errors import InvalidRequestError

if TYPE_CHECKING:
    from mistralrs_serve.agent.runtime import AgentPlan, AgentRuntime
    from mistralrs_serve.entrypoints.openai.serving_chat import ChatServing, Prepared

logger = logging.getLogger(__name__)

MIN_RESULT_CHARS = 2_000
PERMISSION_DENIED = "The call was not run: the user denied permission to run {name}."


@dataclass
class AgentCall:
    """One server-side tool call of a round, from the model's call to its result."""

    round: int
    id: str  # the model's call id (its tool message answers this id)
    name: str
    arguments: str  # JSON text, as the model wrote it
    kind: str  # the ToolSpec's kind: web_search, code_interpreter, shell or function
    index: int  # the call's index in its round (the stream parsers' numbering)
    status: str = "in_progress"  # completed, failed, denied, cancelled
    output: ToolOutput | None = None
    approval_id: str | None = None
    started_at: float = field(default_factory=time.time)

    def tool_message(self, max_chars: int) -> dict[str, Any]:
        """The result as the model reads it, cut to `max_chars` (the client gets all of it)."""
        text = self.output.text if self.output is not None else ""
        if len(text) > max_chars:
            cut = len(text) - max_chars
            text = f"{text[:max_chars]}\n[{cut} more characters cut: longer than the model can read]"
        return {"role": "tool", "tool_call_id": self.id, "content": text}

    def to_openai(self) -> dict[str, Any]:
        """The `agentic_tool_calls` entry of a chat completion."""
        out = self.output
        entry: dict[str, Any] = {
            "round": self.round,
            "id": self.id,
            "type": self.kind,
            "name": self.name,
            "arguments": self.arguments,
            "status": self.status,
            "result": out.text if out is not None else None,
            "is_error": out.is_error if out is not None else False,
        }
        if out is not None and out.files:
            entry["files"] = [f.file_id for f in out.files]
        if out is not None and out.citations:
            entry["citations"] = [{"url": c.url, "title": c.title} for c in out.citations]
        return entry


# Events, in order: RoundStarted, Delta*, RoundEnded, then per server call
# CallStarted, [ApprovalRequested], CallFinished; the next round; Finished last.


@dataclass
class RoundStarted:
    round: int
    prep: Prepared


@dataclass
class Delta:
    """One engine step of the round, parsed: `server` holds the indices of the
    round's calls (so far) that go to server tools, which a client must not
    see as its own calls."""

    step: StepOutput
    delta: OutputDelta
    server: frozenset[int]


@dataclass
class KeepAlive:
    """No output for a while (a stream sends a keep-alive)."""


@dataclass
class RoundEnded:
    round: int
    finish_reason: str  # stop, length or tool_calls
    calls: list[AgentCall]  # the round's server-side calls, about to run


@dataclass
class CallStarted:
    call: AgentCall


@dataclass
class ApprovalRequested:
    call: AgentCall
    approval_id: str


@dataclass
class CallFinished:
    call: AgentCall


@dataclass
class AgentResult:
    content: str
    reasoning: str
    client_calls: list[dict[str, Any]]  # OpenAI tool_calls the client runs (the loop stopped for them)
    finish_reason: str
    calls: list[AgentCall]
    files: list[OutputFile]
    missing_files: list[str]
    session_id: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    messages: list[dict[str, Any]]  # the conversation as the session keeps it


@dataclass
class Finished:
    result: AgentResult


LoopEvent = (
    RoundStarted | Delta | KeepAlive | RoundEnded | CallStarted | ApprovalRequested | CallFinished | Finished
)


class AgentLoop:
    def __init__(
        self,
        serving: ChatServing,
        runtime: AgentRuntime,
        req: ChatCompletionRequest,
        plan: AgentPlan,
        *,
        idle_s: float | None = None,
        prepare: Callable[[ChatCompletionRequest], Prepared] | None = None,
    ) -> None:
        self.serving, self.runtime, self.req, self.plan = serving, runtime, req, plan
        self.idle_s = idle_s
        # how a round's chat request is checked and rendered (Responses renames its errors' fields)
        self.prepare = prepare or serving.prepare
        self.cancelled = asyncio.Event()
        self.ctx = ToolContext(plan.session, self.cancelled, runtime.files)
        self.messages: list[dict[str, Any]] = list(plan.messages)
        self.calls: list[AgentCall] = []
        self.files: list[OutputFile] = []
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.prompt_tokens = self.completion_tokens = self.cached_tokens = 0
        # what of one tool result the model reads: about half the context at two characters a token
        self.max_result_chars = max(MIN_RESULT_CHARS, serving.info.max_model_len // 2)
        # the first round is checked now, so that a bad request fails before any output
        self.first: Prepared | None = self.prepare(self._round_request(with_server_tools=plan.max_rounds > 0))

    async def events(self) -> AsyncGenerator[LoopEvent, None]:
        try:
            async for event in self._rounds():
                yield event
        finally:
            self.cancelled.set()  # a tool still running (disconnect, cancel) kills its process

    async def _rounds(self) -> AsyncIterator[LoopEvent]:
        rounds = 0
        while True:
            last = rounds >= self.plan.max_rounds
            try:
                prep, self.first = (
                    self.first or self.prepare(self._round_request(with_server_tools=not last)),
                    None,
                )
            except (
                InvalidRequestError
            ) as e:  # the tools' results outgrew the context: answer with what there is
                logger.warning("agent loop ended after %d rounds: %s", rounds, e)
                yield Finished(await self._result([], "length"))
                return
            yield RoundStarted(rounds, prep)
            parser = prep.parser()
            server: set[int] = set()
            finish = "stop"
            round_content: list[str] = []
            async for event in self._generate(prep, parser, server, round_content):
                if isinstance(event, StepOutput):
                    finish = event.finish_reason or finish
                    continue
                yield event
            calls = parser.calls
            server_calls = [
                AgentCall(rounds, c.id, c.name, c.arguments, self.plan.tools[c.name].spec.kind, i)
                for i, c in enumerate(calls)
                if c.name in self.plan.tools and not last
            ]
            client_calls = [
                openai_call(c) for i, c in enumerate(calls) if i not in {s.index for s in server_calls}
            ]
            text = "".join(round_content)
            finish_reason = "tool_calls" if calls and finish == "stop" else finish
            yield RoundEnded(rounds, finish_reason, server_calls)
            self.messages.append(_assistant_message(text, [openai_call(c) for c in calls]))
            for call in server_calls:
                async for event in self._run_call(call):
                    yield event
                self.messages.append(call.tool_message(self.max_result_chars))
            if not server_calls or client_calls or finish != "stop":
                yield Finished(await self._result(client_calls, finish_reason if client_calls else finish))
                return
            rounds += 1

    def _round_request(self, *, with_server_tools: bool) -> ChatCompletionRequest:
        """The request one round generates for: the conversation so far, the client's
        tools and (until the rounds are used up) the server's."""
        tools = list(self.plan.client_tools)
        if with_server_tools:
            tools += [t.spec.as_chat_tool() for t in self.plan.tools.values()]
        messages = _with_file_note(self.messages, self.plan.required_files)
        update: dict[str, Any] = {"messages": messages, "tools": tools or None, "stream": True}
        if not tools:
            update["tool_choice"] = None
        elif self.calls and self.req.tool_choice not in (None, "auto", "none"):
            update["tool_choice"] = "auto"  # a forced call was made in the first round
        return self.req.model_copy(update=update)

    async def _generate(
        self, prep: Prepared, parser: Any, server: set[int], content: list[str]
    ) -> AsyncIterator[LoopEvent | StepOutput]:
        self.prompt_tokens += len(prep.prompt.prompt_ids)
        names: dict[int, str] = {}
        steps = self.serving.client.stream_async(prep.prompt, idle_s=self.idle_s)
        try:
            async for step in steps:
                if step is None:
                    yield KeepAlive()
                    continue
                self.completion_tokens += 1
                if step.num_cached_tokens is not None:
                    self.cached_tokens = max(self.cached_tokens, step.num_cached_tokens)
                delta = parser.feed(step.text) if step.text else OutputDelta()
                if step.finish_reason is not None:
                    delta.extend(parser.finish())
                for call in delta.tool_calls:
                    if call.name is not None:
                        names[call.index] = call.name
                        if call.name in self.plan.tools:
                            server.add(call.index)
                content.append(delta.content)
                self.content.append(delta.content)
                self.reasoning.append(delta.reasoning)
                yield Delta(step, delta, frozenset(server))
                if step.finish_reason is not None:
                    yield step
        finally:
            await steps.aclose()  # aborts the engine request if it is still running

    async def _run_call(self, call: AgentCall) -> AsyncIterator[LoopEvent]:
        self.calls.append(call)
        yield CallStarted(call)
        decision = self.runtime.permission_for(self.plan, call)
        if decision == "ask":
            approval = self.runtime.request_approval(self.plan, call)
            call.approval_id = approval.id
            yield ApprovalRequested(call, approval.id)
            decision = await self.runtime.await_approval(self.plan, call, approval.id)
        if decision == "deny":
            call.status = "denied"
            call.output = ToolOutput(PERMISSION_DENIED.format(name=call.name), is_error=True)
        else:
            call.output = await self._execute(call)
            call.status = "failed" if call.output.is_error else "completed"
            self.files.extend(call.output.files)
        yield CallFinished(call)

    async def _execute(self, call: AgentCall) -> ToolOutput:
        tool: ServerTool = self.plan.tools[call.name]
        try:
            arguments = json.loads(call.arguments or "{}")
        except json.JSONDecodeError as e:
            return ToolOutput(
                f"The arguments are not valid JSON ({e}); call {call.name} again.", is_error=True
            )
        if not isinstance(arguments, dict):
            return ToolOutput(f"The arguments of {call.name} must be a JSON object.", is_error=True)
        try:
            return await tool.run(arguments, self.ctx)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a broken tool fails its call, not the request
            logger.exception("the server tool %s failed", call.name)
            return ToolOutput(f"{call.name} failed: {type(e).__name__}: {e}", is_error=True)

    async def _result(self, client_calls: list[dict[str, Any]], finish_reason: str) -> AgentResult:
        files, missing = await self.runtime.collect_required_files(self.plan, self.ctx)
        self.files.extend(files)
        result = AgentResult(
            content="".join(self.content),
            reasoning="".join(self.reasoning),
            client_calls=client_calls,
            finish_reason=finish_reason,
            calls=self.calls,
            files=self.files,
            missing_files=missing,
            session_id=self.plan.session.id,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            cached_tokens=self.cached_tokens,
            messages=self.messages,
        )
        await self.runtime.save_session(self.plan, result)
        return result


def _assistant_message(content: str, calls: list[dict[str, Any]]) -> dict[str, Any]:
    message: dict[str, Any] = {
        "role": "assistant",
        "content": message_content(content, bool(calls)),
    }
    if calls:
        message["tool_calls"] = calls
    return message


def _with_file_note(messages: list[dict[str, Any]], files: list[str]) -> list[dict[str, Any]]:
    """The conversation as the model reads it: when the request names files the run must produce,
    the system message says so (the session keeps the conversation without the note)."""
    if not files:
        return messages
    note = "Save these files in the working directory before you answer: " + ", ".join(files) + "."
    if messages and messages[0].get("role") == "system" and isinstance(messages[0].get("content"), str):
        return [{**messages[0], "content": f"{messages[0]['content']}\n\n{note}"}, *messages[1:]]
    return [{"role": "system", "content": note}, *messages]
