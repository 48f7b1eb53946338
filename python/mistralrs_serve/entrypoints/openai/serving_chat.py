"""POST /v1/chat/completions, for the server and the in-process Runner alike."""

from __future__ import annotations

import json
import random
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from typing import Any

import anyio

from mistralrs_serve.engine.engine_info import CheckedPrompt, EngineClient
from mistralrs_serve.engine.media import PromptMedia
from mistralrs_serve.engine.sequence import CompletionOutput, StepOutput
from mistralrs_serve.entrypoints.openai import serving_common as common
from mistralrs_serve.entrypoints.openai import structured
from mistralrs_serve.entrypoints.openai.attachments import Attachments, has_file_parts
from mistralrs_serve.entrypoints.openai.chat_output import (
    ChoiceParser,
    OutputDelta,
    finish_reason,
    openai_call_delta,
    parse_text,
)
from mistralrs_serve.entrypoints.openai.image_parts import (
    IMAGE_PART_TYPES,
    ImageParts,
    has_image_parts,
    is_encoded_image,
    place_images,
    template_messages,
)
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
from mistralrs_serve.entrypoints.openai.reasoning import reasoning_parser_for
from mistralrs_serve.entrypoints.openai.tool_parsers import TOKEN_MARKERS, ToolCallFormat, detect_format
from mistralrs_serve.entrypoints.openai.tools import ToolPlan, plan_tools, with_tool_prompt
from mistralrs_serve.errors import InvalidRequestError
from mistralrs_serve.images.inputs import ImageLoader
from mistralrs_serve.sampling_params import Grammar, SamplingParams

ROLES = ("system", "developer", "user", "assistant", "tool")
# Content part types a later part of the server implements.
PENDING_PART_TYPES = ("image_url", "image", "audio")


class ChatServing:
    def __init__(self, client: EngineClient, model_name: str, attachments: Attachments | None = None) -> None:
        self.client = client
        self.info = client.info
        self.model_name = model_name
        self.seeds: random.Random | None = None  # the server's --seed, if any
        # file parts: without a store, file_id parts are refused and inline files are not kept
        self.attachments = attachments if attachments is not None else Attachments(None)
        self.images: ImageParts | None = None  # a vision-language model's image parts
        if self.info.vision is not None:
            limits = self.attachments.limits
            loader = ImageLoader(
                self.attachments.store, limits.max_file_bytes, limits.allow_private_file_urls
            )
            self.images = ImageParts(self.info.vision, loader)

    def prepare(self, req: ChatCompletionRequest, *, allow_file_urls: bool = False) -> Prepared:
        """The checked prompt and the output parsing; raises InvalidRequestError.
        This is the request's one check: the engine runs what it returns as it is.
        File parts are read here (blocking) unless `attach_files_async` did it
        already; `allow_file_urls` lets them fetch `file_url` (Responses does)."""
        common.log_unknown_fields(req)
        req = self.attach_files(req, allow_file_urls=allow_file_urls)
        _check_tool_fields(req)
        plan = plan_tools(req.tools, req.tool_choice, req.parallel_tool_calls)
        template = self.info.chat_template
        fmt = None
        if plan.active:
            fmt = detect_format(
                template.tools_source if template is not None and template.supports_tools else None
            )
        grammar = structured.request_grammar(req.response_format, req.grammar, req.grammar_type)
        tool_grammar = _tool_grammar(plan, fmt, self.info.tokenizer) if fmt is not None else None
        if tool_grammar is not None and grammar is not None:
            raise InvalidRequestError(
                "response_format and grammar cannot be combined with tool_choice that forces or constrains "
                "tool calls",
                "tool_choice",
            )
        params = self.sampling_params(req)
        params = replace(params, grammar=grammar or tool_grammar, skip_special_tokens=fmt is None)
        prompt_ids, prompt_text, media = self.render(req, plan)
        prompt = common.checked_prompt(
            self.info, prompt_ids, params, truncate=req.truncate_sequence, param="messages", media=media
        )
        thinks = template is not None and template.supports_thinking and not isinstance(req.messages, str)
        return Prepared(prompt, plan, fmt, template.source if thinks and template else None, prompt_text)

    def create(self, req: ChatCompletionRequest) -> ChatCompletionResponse:
        prep = self.prepare(req)
        outputs = self.client.generate(prep.prompt)
        return self.response(req, prep, outputs)

    async def create_async(self, req: ChatCompletionRequest) -> ChatCompletionResponse:
        """As `create`, on the event loop; cancelling it aborts the request."""
        prep = self.prepare(await self.attach_files_async(req))
        outputs = await common.collect_async(self.client, prep.prompt)
        return self.response(req, prep, outputs)

    def response(
        self, req: ChatCompletionRequest, prep: Prepared, outputs: list[CompletionOutput]
    ) -> ChatCompletionResponse:
        choices = [self._choice(o, req.logprobs, prep) for o in outputs]
        return ChatCompletionResponse(
            model=self.model_name, choices=choices, usage=common.usage(prep.prompt.prompt_ids, outputs)
        )

    def create_stream(self, req: ChatCompletionRequest) -> Iterator[ChatCompletionChunk]:
        """OpenAI's chunk sequence: a role chunk per choice, content deltas, finish, optional usage."""
        prep = self.prepare(req)
        chunks = ChunkBuilder(self, req, prep)
        return self._stream(chunks, prep.prompt)

    def create_stream_async(
        self, req: ChatCompletionRequest, idle_s: float | None = None
    ) -> AsyncIterator[ChatCompletionChunk | None]:
        """As `create_stream` for asyncio: validates now (raises before any chunk),
        then yields chunks, and None after idle_s without output (keep-alives)."""
        prep = self.prepare(req)
        chunks = ChunkBuilder(self, req, prep)
        return self._stream_async(chunks, prep.prompt, idle_s)

    def _stream(self, chunks: ChunkBuilder, prompt: CheckedPrompt) -> Iterator[ChatCompletionChunk]:
        yield from chunks.start(prompt.params.n)
        for step in self.client.stream(prompt):
            yield from chunks.step(step)
        yield from chunks.end()

    async def _stream_async(
        self, chunks: ChunkBuilder, prompt: CheckedPrompt, idle_s: float | None
    ) -> AsyncIterator[ChatCompletionChunk | None]:
        for chunk in chunks.start(prompt.params.n):
            yield chunk
        steps = self.client.stream_async(prompt, idle_s=idle_s)
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
            defaults=self.info.generation_defaults,
            seeds=self.seeds,
        )

    def attach_files(
        self, req: ChatCompletionRequest, *, allow_file_urls: bool = False, persist: bool = True
    ) -> ChatCompletionRequest:
        """req with each file part of its messages replaced by a text part
        holding what the model sees of the file (see attachments.py), and for a
        vision-language model each image part by the encoded image (image_parts.py);
        req itself when it has neither. Blocking: reads the store, may fetch and
        store, runs the vision encoder."""
        if isinstance(req.messages, str) or not self._has_attachments(req.messages):
            return req
        messages = self.expand_parts(req.messages, allow_file_urls=allow_file_urls, persist=persist)
        return req.model_copy(update={"messages": messages})

    def expand_parts(
        self, messages: list[Any], *, allow_file_urls: bool, persist: bool, param: str = "messages"
    ) -> list[Any]:
        """File parts to text, image parts to encoded images (for a model that takes them)."""
        if has_file_parts(messages):
            messages = self.attachments.expand(
                messages, allow_file_urls=allow_file_urls, persist=persist, param=param
            )
        if self.images is not None and has_image_parts(messages):
            messages = self.images.encode(messages, param)
        return messages

    def _has_attachments(self, messages: Any) -> bool:
        return has_file_parts(messages) or (self.images is not None and has_image_parts(messages))

    async def attach_files_async(
        self, req: ChatCompletionRequest, *, allow_file_urls: bool = False
    ) -> ChatCompletionRequest:
        """As `attach_files`, on a worker thread (the store, fetches and encoder block)."""
        if not self._has_attachments(req.messages):
            return req
        return await anyio.to_thread.run_sync(lambda: self.attach_files(req, allow_file_urls=allow_file_urls))

    def prompt_ids(self, req: ChatCompletionRequest) -> list[int]:
        """The prompt of a request (the /tokenize route's view of it); inline
        files are read but not stored."""
        req = self.attach_files(req, persist=False)
        plan = plan_tools(req.tools, req.tool_choice, req.parallel_tool_calls)
        return self.render(req, plan)[0]

    def render(self, req: ChatCompletionRequest, plan: ToolPlan) -> tuple[list[int], str, PromptMedia | None]:
        """Prompt ids and text, and the images placed in it. Tools go to the template
        when it takes them; otherwise into the system message, in the plain-JSON call format."""
        tokenizer = self.info.tokenizer
        if isinstance(req.messages, str):
            # mistral.rs SDK: a string is an already templated prompt.
            return tokenizer.encode(req.messages, add_special_tokens=False), req.messages, None
        takes_images = self.images is not None
        messages = [_check_message(i, m, takes_images) for i, m in enumerate(req.messages)]
        messages, images = template_messages(messages)
        if not messages:
            raise InvalidRequestError("messages must not be empty", "messages")
        template = tokenizer.chat_template
        tools = plan.tools if plan.active else None
        if tools and template is not None and not template.supports_tools:
            messages, tools = with_tool_prompt(messages, tools), None
        extra = {"reasoning_effort": req.reasoning_effort} if req.reasoning_effort else {}
        text = tokenizer.render_chat(messages, tools=tools, enable_thinking=req.enable_thinking, **extra)
        if images and self.images is not None:
            return place_images(self.images.vision, tokenizer, text, images)
        return tokenizer.encode(text, add_special_tokens=False), text, None

    def _choice(self, out: CompletionOutput, want_logprobs: bool, prep: Prepared) -> ChatChoice:
        logprobs = None
        if want_logprobs:
            tokenizer = self.info.tokenizer
            logprobs = ChoiceLogprobs(content=[common.chat_logprob(tokenizer, lp) for lp in out.logprobs])
        parser = prep.parser()
        parsed = parse_text(parser, out.text)
        message = ChatMessage(
            content=parsed.content,
            reasoning_content=parsed.reasoning,
            reasoning=parsed.reasoning,
            tool_calls=parsed.tool_calls,
        )
        finish = finish_reason(out.finish_reason, parser)
        return ChatChoice(index=out.index, message=message, logprobs=logprobs, finish_reason=finish)


@dataclass(frozen=True)
class Prepared:
    """A validated chat request: what the engine runs and how its text is read back."""

    prompt: CheckedPrompt
    tools: ToolPlan
    tool_format: ToolCallFormat | None  # None: no tools offered, the text is all content
    thinking_template: str | None  # the template source when it has thinking markers
    prompt_text: str

    def parser(self) -> ChoiceParser:
        reasoning = None
        if self.thinking_template is not None:
            reasoning = reasoning_parser_for(self.thinking_template, self.prompt_text)
        tools = self.tool_format.streamer(tools=self.tools.tools) if self.tool_format is not None else None
        return ChoiceParser(reasoning, tools)


class ChunkBuilder:
    """Turns StepOutputs into ChatCompletionChunks (shared by sync and async streams)."""

    def __init__(self, serving: ChatServing, req: ChatCompletionRequest, prep: Prepared) -> None:
        self.serving = serving
        self.want_logprobs = req.logprobs
        self.include_usage = bool((req.stream_options or {}).get("include_usage"))
        self.id, self.created = random_id("chatcmpl"), int(time.time())
        self.num_prompt_tokens = len(prep.prompt.prompt_ids)
        self.num_completion_tokens = 0
        self.parsers = [prep.parser() for _ in range(prep.prompt.params.n)]

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
            tokenizer = self.serving.info.tokenizer
            logprobs = ChoiceLogprobs(content=[common.chat_logprob(tokenizer, step.logprob)])
        parser = self.parsers[step.index]
        out = parser.feed(step.text) if step.text else OutputDelta()
        finish = None
        if step.finish_reason in ("stop", "length"):
            out.extend(parser.finish())
            finish = finish_reason(step.finish_reason, parser)
        if out or logprobs is not None or finish:
            delta = DeltaMessage(
                content=out.content or None,
                reasoning_content=out.reasoning or None,
                reasoning=out.reasoning or None,
                tool_calls=[openai_call_delta(d) for d in out.tool_calls] or None,
            )
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


def _check_message(index: int, message: Any, takes_images: bool = False) -> dict[str, Any]:
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
            _check_part(f"{where}.content[{j}]", part, takes_images)
    elif content is not None and not isinstance(content, str):
        raise InvalidRequestError(f"{where}.content must be a string or a list of parts", f"{where}.content")
    elif content is None and role != "assistant":
        raise InvalidRequestError(f"{where}.content is required for role {role!r}", f"{where}.content")
    return {**message, "role": "system"} if role == "developer" else message


def _check_part(where: str, part: Any, takes_images: bool) -> None:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return
    if takes_images and is_encoded_image(part):
        return
    if takes_images and kind in (*IMAGE_PART_TYPES, "image"):  # not read by attach_files
        raise InvalidRequestError(f"{where}: an image part must be {{'type': 'image_url', ...}}", where)
    if kind in PENDING_PART_TYPES or kind == "input_image":
        raise InvalidRequestError(
            f"{where}: this model is served for text only, so it takes no {kind!r} parts; the "
            "part is refused rather than dropped",
            where,
        )
    raise InvalidRequestError(f"{where} must be a text part {{'type': 'text', 'text': ...}}", where)


def _check_tool_fields(req: ChatCompletionRequest) -> None:
    """The spec's rejected value (max_tool_calls: the server caps tool rounds itself)."""
    if (req.model_extra or {}).get("max_tool_calls") is not None:
        raise InvalidRequestError(
            "max_tool_calls is not supported; the server caps tool rounds itself", "max_tool_calls"
        )


def _tool_grammar(plan: ToolPlan, fmt: ToolCallFormat, tokenizer: Any) -> Grammar | None:
    """The constraint a tool plan needs: a call in the family's format when one
    is required; in auto mode, when parallel calls are off or a function is
    strict, text without call markup, or text and then the calls where the
    family writes calls after text (see `ToolCallFormat.auto_grammar`). None:
    free text."""
    if plan.mode == "required":
        return Grammar(
            "lark",
            _special_markers(fmt.call_grammar(plan.tools, parallel=plan.parallel), tokenizer),
            "tool_choice",
        )
    if plan.parallel and not plan.any_strict:
        return None
    source = fmt.auto_grammar(plan.tools, parallel=plan.parallel)
    return Grammar("lark", _special_markers(source, tokenizer), "tools")


def _special_markers(source: str, tokenizer: Any) -> str:
    """A tool-call marker the vocabulary holds as one special token is written
    `<[id]>`: llguidance never matches special tokens from plain text."""
    added = tokenizer.backend.get_added_tokens_decoder()
    for token_id, token in added.items():
        if token.special and token.content in TOKEN_MARKERS:
            quoted = json.dumps(token.content, ensure_ascii=False)
            if quoted in source:
                source = source.replace(quoted, f"<[{token_id}]>")
    return source
