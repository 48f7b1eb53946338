"""Chat Completions requests that engage the agent loop (agent/loop.py):
the loop's events turned into a chat completion, or into its chunk stream.

The whole answer is the text of every round; the client sees only its own
tool calls (server-side ones are run here). A streamed run reports each
server-side call as a chunk with no choices and an `agentic_event`
(`tool_call.started`, `approval.requested`, `tool_call.completed`), and its
last chunk carries the finish reason, `session_id` and the files.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from mistralrs_serve.agent.loop import (
    AgentCall,
    AgentLoop,
    AgentResult,
    ApprovalRequested,
    CallFinished,
    CallStarted,
    Delta,
    Finished,
    KeepAlive,
)
from mistralrs_serve.agent.runtime import AgentRuntime
from mistralrs_serve.agent.tool import OutputFile
from mistralrs_serve.entrypoints.openai import serving_common as common
from mistralrs_serve.entrypoints.openai.chat_output import message_content, openai_call_delta
from mistralrs_serve.entrypoints.openai.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ChoiceLogprobs,
    DeltaMessage,
    TokenLogprob,
    random_id,
)
from mistralrs_serve.entrypoints.openai.responses_agent import text_annotations
from mistralrs_serve.entrypoints.openai.serving_chat import ChatServing


class AgentChatServing:
    def __init__(self, chat: ChatServing, runtime: AgentRuntime) -> None:
        self.chat = chat
        self.runtime = runtime

    def engages(self, req: ChatCompletionRequest) -> bool:
        return self.runtime.engages_chat(req)

    async def _loop(self, req: ChatCompletionRequest, idle_s: float | None = None) -> AgentLoop:
        req = await self.chat.attach_files_async(req)
        plan = await self.runtime.plan_chat(req)
        return AgentLoop(self.chat, self.runtime, req, plan, idle_s=idle_s)

    async def create_async(self, req: ChatCompletionRequest) -> ChatCompletionResponse:
        loop = await self._loop(req)
        logprobs: list[TokenLogprob] = []
        async for event in loop.events():
            if isinstance(event, Delta) and req.logprobs:
                lp = event.step.logprob
                if lp is not None and not event.step.is_stop_token:
                    logprobs.append(common.chat_logprob(self.chat.info.tokenizer, lp))
            elif isinstance(event, Finished):
                return self._response(
                    event.result, ChoiceLogprobs(content=logprobs) if req.logprobs else None
                )
        raise AssertionError("the agent loop ended without a result")

    def _response(self, result: AgentResult, logprobs: ChoiceLogprobs | None) -> ChatCompletionResponse:
        calls = result.client_calls or None
        content = message_content(result.content, calls is not None)
        message = ChatMessage(
            content=content,
            reasoning_content=result.reasoning or None,
            reasoning=result.reasoning or None,
            tool_calls=calls,
            annotations=url_citations(content or "", result) or None,
        )
        choice = ChatChoice(index=0, message=message, logprobs=logprobs, finish_reason=result.finish_reason)
        return ChatCompletionResponse(
            model=self.chat.model_name,
            choices=[choice],
            usage=_usage(result),
            agentic_tool_calls=[c.to_openai() for c in result.calls],
            files=[file_object(f) for f in result.files],
            missing_files=result.missing_files or None,
            session_id=result.session_id,
        )

    async def create_stream_async(
        self, req: ChatCompletionRequest, idle_s: float | None = None
    ) -> AsyncIterator[ChatCompletionChunk | None]:
        """Validates and plans now (raises before any chunk); then the chunks."""
        loop = await self._loop(req, idle_s)
        return _ChunkStream(self, req).run(loop)


class _ChunkStream:
    def __init__(self, serving: AgentChatServing, req: ChatCompletionRequest) -> None:
        self.serving = serving
        self.want_logprobs = req.logprobs
        self.include_usage = bool((req.stream_options or {}).get("include_usage"))
        self.id, self.created = random_id("chatcmpl"), int(time.time())

    def chunk(self, choices: list[ChatChunkChoice], **extra: Any) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.serving.chat.model_name, choices=choices, **extra
        )

    async def run(self, loop: AgentLoop) -> AsyncIterator[ChatCompletionChunk | None]:
        yield self.chunk([ChatChunkChoice(index=0, delta=DeltaMessage(role="assistant", content=""))])
        async for event in loop.events():
            if isinstance(event, KeepAlive):
                yield None
            elif isinstance(event, Delta):
                chunk = self._delta(event)
                if chunk is not None:
                    yield chunk
            elif isinstance(event, CallStarted):
                yield self.chunk([], agentic_event=_call_event("tool_call.started", event.call))
            elif isinstance(event, ApprovalRequested):
                approval = {**_call_event("approval.requested", event.call), "approval_id": event.approval_id}
                yield self.chunk([], agentic_event=approval)
            elif isinstance(event, CallFinished):
                entry = event.call.to_openai()
                done = {**entry, "tool_type": entry["type"], "type": "tool_call.completed"}
                yield self.chunk([], agentic_event=done)
            elif isinstance(event, Finished):
                for chunk in self._end(event.result):
                    yield chunk

    def _delta(self, event: Delta) -> ChatCompletionChunk | None:
        out, step = event.delta, event.step
        logprobs = None
        if self.want_logprobs and step.logprob is not None and not step.is_stop_token:
            tokenizer = self.serving.chat.info.tokenizer
            logprobs = ChoiceLogprobs(content=[common.chat_logprob(tokenizer, step.logprob)])
        calls = [openai_call_delta(d) for d in out.tool_calls if d.index not in event.server]
        if not (out.content or out.reasoning or calls or logprobs):
            return None
        delta = DeltaMessage(
            content=out.content or None,
            reasoning_content=out.reasoning or None,
            reasoning=out.reasoning or None,
            tool_calls=calls or None,
        )
        return self.chunk([ChatChunkChoice(index=0, delta=delta, logprobs=logprobs)])

    def _end(self, result: AgentResult) -> list[ChatCompletionChunk]:
        last = self.chunk(
            [ChatChunkChoice(index=0, delta=DeltaMessage(), finish_reason=result.finish_reason)],
            session_id=result.session_id,
            files=[file_object(f) for f in result.files],
            missing_files=result.missing_files or None,
        )
        return [last, self.chunk([], usage=_usage(result))] if self.include_usage else [last]


def _call_event(kind: str, call: AgentCall) -> dict[str, Any]:
    return {"type": kind, "round": call.round, "id": call.id, "name": call.name, "arguments": call.arguments}


def _usage(result: AgentResult) -> common.Usage:
    return common.Usage(
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        total_tokens=result.prompt_tokens + result.completion_tokens,
    )


def file_object(f: OutputFile) -> dict[str, Any]:
    """A produced file as the response lists it (its bytes: GET /v1/files/{id}/content)."""
    return {
        "id": f.file_id,
        "object": "file",
        "filename": f.filename,
        "bytes": f.bytes,
        "purpose": "assistants_output",
        "content_type": f.content_type,
    }


def url_citations(text: str, result: AgentResult) -> list[dict[str, Any]]:
    """Chat's `annotations`: the web sources of the run's searches, where the text cites them."""
    citations = [
        {"url": c.url, "title": c.title}
        for call in result.calls
        if call.output
        for c in call.output.citations
    ]
    found = text_annotations(text, citations, [], "")
    return [
        {"type": "url_citation", "url_citation": {k: v for k, v in a.items() if k != "type"}} for a in found
    ]
