"""POST /v1/chat/completions, for the server and the in-process Runner alike."""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from mistralrs_serve.engine.engine_loop import EngineLoop
from mistralrs_serve.engine.sequence import CompletionOutput, StepOutput
from mistralrs_serve.entrypoints.openai import serving_common as common
from mistralrs_serve.entrypoints.openai.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ChoiceLogprobs,
    DeltaMessage,
    random_id,
)
from mistralrs_serve.errors import InvalidRequestError
from mistralrs_serve.sampling_params import SamplingParams

ROLES = ("system", "developer", "user", "assistant", "tool")
# Content part types a later part of the server implements.
PENDING_PART_TYPES = ("image_url", "input_audio", "file", "image", "audio")


class ChatServing:
    def __init__(self, client: EngineLoop, model_name: str) -> None:
        self.client = client
        self.engine = client.engine
        self.model_name = model_name
        self.seeds: random.Random | None = None  # the server's --seed, if any

    def prepare(self, req: ChatCompletionRequest) -> tuple[list[int], SamplingParams]:
        """Validated prompt ids and sampling params; raises InvalidRequestError.
        Everything the engine would reject is checked here, before a stream starts."""
        common.log_unknown_fields(req)
        common.reject_unsupported(req, (*common.NOT_YET_SUPPORTED, "tools", "response_format"))
        _check_tool_fields(req)
        params = self.sampling_params(req)
        prompt_ids = common.fit_prompt(
            self.engine, self.prompt_ids(req), params, truncate=req.truncate_sequence, param="messages"
        )
        common.check_fits(self.engine, prompt_ids, params, "messages")
        return prompt_ids, params

    def create(self, req: ChatCompletionRequest) -> ChatCompletionResponse:
        prompt_ids, params = self.prepare(req)
        outputs = self.client.generate(prompt_ids, params, "messages")
        return self.response(req, prompt_ids, outputs)

    async def create_async(self, req: ChatCompletionRequest) -> ChatCompletionResponse:
        """As `create`, on the event loop; cancelling it aborts the request."""
        prompt_ids, params = self.prepare(req)
        outputs = await common.collect_async(self.client, prompt_ids, params, "messages")
        return self.response(req, prompt_ids, outputs)

    def response(
        self, req: ChatCompletionRequest, prompt_ids: list[int], outputs: list[CompletionOutput]
    ) -> ChatCompletionResponse:
        choices = [self._choice(o, req.logprobs) for o in outputs]
        return ChatCompletionResponse(
            model=self.model_name, choices=choices, usage=common.usage(prompt_ids, outputs)
        )

    def create_stream(self, req: ChatCompletionRequest) -> Iterator[ChatCompletionChunk]:
        """OpenAI's chunk sequence: a role chunk per choice, content deltas, finish, optional usage."""
        prompt_ids, params = self.prepare(req)
        chunks = ChunkBuilder(self, req, len(prompt_ids))
        return self._stream(chunks, prompt_ids, params)

    def create_stream_async(
        self, req: ChatCompletionRequest, idle_s: float | None = None
    ) -> AsyncIterator[ChatCompletionChunk | None]:
        """As `create_stream` for asyncio: validates now (raises before any chunk),
        then yields chunks, and None after idle_s without output (keep-alives)."""
        prompt_ids, params = self.prepare(req)
        chunks = ChunkBuilder(self, req, len(prompt_ids))
        return self._stream_async(chunks, prompt_ids, params, idle_s)

    def _stream(
        self, chunks: ChunkBuilder, prompt_ids: list[int], params: SamplingParams
    ) -> Iterator[ChatCompletionChunk]:
        yield from chunks.start(params.n)
        for step in self.client.stream(prompt_ids, params, "messages"):
            yield from chunks.step(step)
        yield from chunks.end()

    async def _stream_async(
        self, chunks: ChunkBuilder, prompt_ids: list[int], params: SamplingParams, idle_s: float | None
    ) -> AsyncIterator[ChatCompletionChunk | None]:
        for chunk in chunks.start(params.n):
            yield chunk
        steps = self.client.stream_async(prompt_ids, params, "messages", idle_s)
        try:
            async for step in steps:
                if step is None:
                    yield None
                    continue
                for chunk in chunks.step(step):
                    yield chunk
        finally:
            await steps.aclose()  # aborts the request if it is still running
        for chunk in chunks.end():
            yield chunk

    def sampling_params(self, req: ChatCompletionRequest) -> SamplingParams:
        if req.top_logprobs is not None and not req.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs to be true", "top_logprobs")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        return common.sampling_params(
            req,
            max_tokens=max_tokens,
            logprobs=req.logprobs,
            top_logprobs=req.top_logprobs or 0,
            defaults=self.engine.loaded.generation_defaults,
            seeds=self.seeds,
        )

    def prompt_ids(self, req: ChatCompletionRequest) -> list[int]:
        tokenizer = self.engine.tokenizer
        if isinstance(req.messages, str):
            # mistral.rs SDK: a string is an already templated prompt.
            return tokenizer.encode(req.messages, add_special_tokens=False)
        messages = [_check_message(i, m) for i, m in enumerate(req.messages)]
        if not messages:
            raise InvalidRequestError("messages must not be empty", "messages")
        extra = {"reasoning_effort": req.reasoning_effort} if req.reasoning_effort else {}
        return tokenizer.encode_chat(messages, enable_thinking=req.enable_thinking, **extra)

    def _choice(self, out: CompletionOutput, want_logprobs: bool) -> ChatChoice:
        logprobs = None
        if want_logprobs:
            logprobs = ChoiceLogprobs(content=[common.chat_logprob(self.engine, lp) for lp in out.logprobs])
        return ChatChoice(
            index=out.index,
            message=ChatMessage(content=out.text),
            logprobs=logprobs,
            finish_reason=out.finish_reason or "stop",
        )


class ChunkBuilder:
    """Turns StepOutputs into ChatCompletionChunks (shared by sync and async streams)."""

    def __init__(self, serving: ChatServing, req: ChatCompletionRequest, num_prompt_tokens: int) -> None:
        self.serving = serving
        self.want_logprobs = req.logprobs
        self.include_usage = bool((req.stream_options or {}).get("include_usage"))
        self.id, self.created = random_id("chatcmpl"), int(time.time())
        self.num_prompt_tokens = num_prompt_tokens
        self.num_completion_tokens = 0

    def _chunk(self, choices: list[ChatChunkChoice], usage: Any = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.serving.model_name, choices=choices, usage=usage
        )

    def start(self, n: int) -> Iterator[ChatCompletionChunk]:
        for i in range(n):
            yield self._chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])

    def step(self, step: StepOutput) -> Iterator[ChatCompletionChunk]:
        self.num_completion_tokens += 1
        logprobs = None
        if self.want_logprobs and step.logprob is not None and not step.is_stop_token:
            logprobs = ChoiceLogprobs(content=[common.chat_logprob(self.serving.engine, step.logprob)])
        if step.text or logprobs is not None or step.finish_reason:
            finish = step.finish_reason if step.finish_reason in ("stop", "length") else None
            delta = DeltaMessage(content=step.text) if step.text else DeltaMessage()
            yield self._chunk(
                [ChatChunkChoice(index=step.index, delta=delta, logprobs=logprobs, finish_reason=finish)]
            )

    def end(self) -> Iterator[ChatCompletionChunk]:
        if self.include_usage:
            usage = common.Usage(
                prompt_tokens=self.num_prompt_tokens,
                completion_tokens=self.num_completion_tokens,
                total_tokens=self.num_prompt_tokens + self.num_completion_tokens,
            )
            yield self._chunk([], usage)


def _check_message(index: int, message: Any) -> dict[str, Any]:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise InvalidRequestError(f"{where} must be an object", where)
    role = message.get("role")
    if role not in ROLES:
        raise InvalidRequestError(
            f"{where}.role must be one of {', '.join(ROLES)}; got {role!r}", f"{where}.role"
        )
    content = message.get("content")
    if isinstance(content, list):
        for j, part in enumerate(content):
            _check_part(f"{where}.content[{j}]", part)
    elif content is not None and not isinstance(content, str):
        raise InvalidRequestError(f"{where}.content must be a string or a list of parts", f"{where}.content")
    elif content is None and role != "assistant":
        raise InvalidRequestError(f"{where}.content is required for role {role!r}", f"{where}.content")
    return {**message, "role": "system"} if role == "developer" else message


def _check_part(where: str, part: Any) -> None:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return
    if kind in PENDING_PART_TYPES:
        raise InvalidRequestError(f"{where}: content parts of type {kind!r} are not supported yet", where)
    raise InvalidRequestError(f"{where} must be a text part {{'type': 'text', 'text': ...}}", where)


def _check_tool_fields(req: ChatCompletionRequest) -> None:
    """The spec's rejected values; tool_choice without tools is OpenAI's 400 too."""
    if req.tool_choice is not None and req.tool_choice != "none" and not req.tools:
        raise InvalidRequestError("tool_choice is only allowed when tools are given", "tool_choice")
    if req.parallel_tool_calls is False:
        raise InvalidRequestError("parallel_tool_calls must be true or omitted", "parallel_tool_calls")
    if (req.model_extra or {}).get("max_tool_calls") is not None:
        raise InvalidRequestError(
            "max_tool_calls is not supported; the server caps tool rounds itself", "max_tool_calls"
        )
