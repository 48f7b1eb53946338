"""OpenAI wire models (pydantic), and nothing else.

Unknown request fields are accepted (OpenAI clients send new ones often);
the serving layer logs them. An explicit `null` for an optional field means
its default, as in OpenAI's API. mistral.rs SDK names (`n_choices`,
`stop_seqs`) are accepted as aliases so that porting is an import change.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

# Identifies the backend build in responses (OpenAI: "the backend configuration").
SYSTEM_FINGERPRINT = "fp_mistralrs_serve_0.1"


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="allow", validate_by_name=True, validate_by_alias=True)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        """Drop top-level nulls of fields that are not required (and of unknown fields)."""
        if not isinstance(data, dict):
            return data
        required = {name for name, f in cls.model_fields.items() if f.is_required()}
        return {k: v for k, v in data.items() if v is not None or k in required}


class SamplingExtensions(OpenAIModel):
    """The sampling extensions (mistral.rs / vLLM names) of every generating endpoint."""

    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    dry_multiplier: float | None = None
    dry_base: float | None = None
    dry_allowed_length: int | None = None
    dry_sequence_breakers: list[str] | None = None
    # {"type", "value"}; or, as the mistral.rs SDK writes it, the source text with grammar_type
    grammar: dict[str, Any] | str | None = None
    grammar_type: str | None = None
    ignore_eos: bool = False


class SamplingFields(SamplingExtensions):
    """Sampling fields shared by chat and legacy completions."""

    model: str = "default"
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = Field(1, validation_alias=AliasChoices("n", "n_choices"))
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = Field(None, validation_alias=AliasChoices("stop", "stop_seqs"))
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    user: str | None = None
    truncate_sequence: bool = False


class ChatCompletionRequest(SamplingFields):
    messages: list[dict[str, Any]] | str
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    enable_thinking: bool | None = None
    reasoning_effort: str | None = None
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    store: bool | None = None
    # The agentic runtime's extensions (agent/; checked by agent/hosted_tools.py and agent/runtime.py).
    web_search_options: Any = None
    session_id: str | None = None
    files: Any = None  # names of the output files server-side code must produce
    agent_permission: str | None = None
    code_execution_permission: str | None = None
    max_tool_rounds: Any = None


class CompletionRequest(SamplingFields):
    # absent or null: OpenAI's default, generation from the start of a document
    prompt: str | list[str] | list[int] | list[list[int]] = ""
    max_tokens: int | None = 16  # OpenAI's default for legacy completions
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None  # the same text, under the name newer vLLM and OpenRouter clients read
    tool_calls: list[dict[str, Any]] | None = None
    annotations: list[dict[str, Any]] | None = None  # url_citation, when server-side search ran


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls", "content_filter", "function_call"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: random_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str = SYSTEM_FINGERPRINT
    # set when the agent loop ran (agent/loop.py): the server-side calls, their files, the session
    agentic_tool_calls: list[dict[str, Any]] | None = None
    files: list[dict[str, Any]] | None = None
    missing_files: list[str] | None = None
    session_id: str | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length", "content_filter"]


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: random_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str = SYSTEM_FINGERPRINT


class CompletionStreamChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length", "content_filter"] | None = None


class CompletionStreamResponse(BaseModel):
    """A streamed legacy completion chunk (OpenAI sends finish_reason null until the last)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionStreamChoice]
    usage: Usage | None = None
    system_fingerprint: str = SYSTEM_FINGERPRINT


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None  # = reasoning_content (see ChatMessage)
    tool_calls: list[dict[str, Any]] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls", "content_filter", "function_call"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str = SYSTEM_FINGERPRINT
    # the agent loop's progress (a chunk with no choices) and, on its last chunk, the session
    agentic_event: dict[str, Any] | None = None
    session_id: str | None = None
    files: list[dict[str, Any]] | None = None
    missing_files: list[str] | None = None


class EmbeddingRequest(OpenAIModel):
    """POST /v1/embeddings. `input`: a string, strings, token ids, or lists of token ids."""

    model: str = "default-embedding"
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    truncate_sequence: bool = False  # extension: cut inputs over the model's limit instead of a 400


class SpeechRequest(OpenAIModel):
    """POST /v1/audio/speech. `voice` is a name or OpenAI's `{"id": ...}` object."""

    model: str = "default-speech"
    input: str
    voice: str | dict[str, str] | None = None
    instructions: str | None = None  # accepted; Piper voices take no instructions
    response_format: str = "wav"  # beyond OpenAI's default (mp3): wav is what Piper makes
    speed: float = 1.0
    stream_format: Literal["audio", "sse"] = "audio"


class EmbeddingData(OpenAIModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # floats, or base64 of little-endian float32 with encoding_format=base64


class EmbeddingUsage(OpenAIModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(OpenAIModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


class ImageGenerationRequest(OpenAIModel):
    """POST /v1/images/generations. `size` ("WxH") or `height`/`width` (the spec's);
    `steps`, `guidance_scale` and `seed` are extensions."""

    model: str = "default-image"
    prompt: str
    n: int = 1
    size: str | None = None
    height: int | None = None
    width: int | None = None
    response_format: Literal["url", "b64_json", "Url", "B64Json"] = "url"
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    quality: str | None = None  # accepted, not used (as the spec says)
    style: str | None = None
    user: str | None = None
