"""POST /v1/chat/completions, for the server and the in-process Runner alike."""

from __future__ import annotations

from typing import Any

from mistralrs_serve.engine.llm_engine import LLMEngine
from mistralrs_serve.entrypoints.openai import serving_common as common
from mistralrs_serve.entrypoints.openai.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ChoiceLogprobs,
)
from mistralrs_serve.errors import InvalidRequestError

ROLES = ("system", "developer", "user", "assistant", "tool")
# Content part types a later part of the server implements.
PENDING_PART_TYPES = ("image_url", "input_audio", "file", "image", "audio")


class ChatServing:
    def __init__(self, engine: LLMEngine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name

    def create(self, req: ChatCompletionRequest) -> ChatCompletionResponse:
        common.log_unknown_fields(req)
        common.reject_unsupported(req, (*common.NOT_YET_SUPPORTED, "tools", "response_format"))
        params = self.sampling_params(req)
        prompt_ids = common.fit_prompt(
            self.engine, self.prompt_ids(req), params, truncate=req.truncate_sequence, param="messages"
        )
        outputs = common.run_choices(self.engine, prompt_ids, params, "messages")
        choices = [self._choice(o, req.logprobs) for o in outputs]
        return ChatCompletionResponse(
            model=self.model_name, choices=choices, usage=common.usage(prompt_ids, outputs)
        )

    def sampling_params(self, req: ChatCompletionRequest) -> Any:
        if req.top_logprobs is not None and not req.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs to be true", "top_logprobs")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        return common.sampling_params(
            req,
            max_tokens=max_tokens,
            logprobs=req.logprobs,
            top_logprobs=req.top_logprobs or 0,
            defaults=self.engine.loaded.generation_defaults,
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

    def _choice(self, out: Any, want_logprobs: bool) -> ChatChoice:
        logprobs = None
        if want_logprobs:
            logprobs = ChoiceLogprobs(content=[common.chat_logprob(self.engine, lp) for lp in out.logprobs])
        return ChatChoice(
            index=out.index,
            message=ChatMessage(content=out.text),
            logprobs=logprobs,
            finish_reason=out.finish_reason or "stop",
        )


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
