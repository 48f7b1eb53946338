"""The in-process SDK, shaped like mistral.rs's Python `Runner` and `Which`."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from mistralrs_serve.engine.llm_engine import LLMEngine
from mistralrs_serve.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
)
from mistralrs_serve.entrypoints.openai.serving_chat import ChatServing
from mistralrs_serve.entrypoints.openai.serving_completion import CompletionServing
from mistralrs_serve.errors import InvalidRequestError
from mistralrs_serve.models.loader import ModelSource, load_model


class Which:
    """Which model to load. Every `*_model_id` is a local path or a Hugging Face repo id."""

    @dataclass(frozen=True)
    class Default:
        """The embedded default: SmolLM2-135M-Instruct (GGUF, Q4_1)."""

        def source(self, chat_template: str | None) -> ModelSource:
            return ModelSource("default", chat_template=chat_template)

    @dataclass(frozen=True)
    class Plain:
        """A model in Hugging Face layout (config.json + safetensors)."""

        model_id: str
        arch: str | None = None  # read from config.json; accepted for mistral.rs compatibility
        tokenizer_json: str | None = None
        revision: str | None = None

        def source(self, chat_template: str | None) -> ModelSource:
            kind = "hub" if ModelSource.parse(self.model_id).kind == "hub" else "hf_dir"
            return ModelSource(kind, self.model_id, revision=self.revision, chat_template=chat_template)

    @dataclass(frozen=True)
    class GGUF:
        """A GGUF file `quantized_filename` in the directory or repo `quantized_model_id`."""

        quantized_model_id: str
        quantized_filename: str
        tok_model_id: str | None = None  # take the tokenizer and template from here instead
        revision: str | None = None

        def source(self, chat_template: str | None) -> ModelSource:
            return ModelSource(
                "gguf",
                self.quantized_model_id,
                filename=self.quantized_filename,
                revision=self.revision,
                tokenizer_location=self.tok_model_id,
                chat_template=chat_template,
            )


AnyWhich = Which.Default | Which.Plain | Which.GGUF


class Runner:
    """Load a model once, then answer OpenAI-shaped requests in process."""

    def __init__(
        self,
        which: AnyWhich | None = None,
        *,
        chat_template: str | None = None,
        dtype: str = "auto",
        num_threads: int | None = None,
    ) -> None:
        which = which if which is not None else Which.Default()
        self._setup(which.source(chat_template), dtype, num_threads)

    @classmethod
    def from_model(
        cls,
        model: str | None,
        *,
        chat_template: str | None = None,
        dtype: str = "auto",
        num_threads: int | None = None,
    ) -> Runner:
        """A Runner for a CLI-style model reference: file, directory, repo id or "default"."""
        runner = cls.__new__(cls)
        runner._setup(ModelSource.parse(model, chat_template), dtype, num_threads)
        return runner

    def _setup(self, source: ModelSource, dtype: str, num_threads: int | None) -> None:
        if num_threads:
            torch.set_num_threads(num_threads)
        self.loaded = load_model(source, dtype=resolve_dtype(dtype))
        self.engine = LLMEngine(self.loaded)
        self._chat = ChatServing(self.engine, self.loaded.name)
        self._completion = CompletionServing(self.engine, self.loaded.name)
        # One request at a time until the batching engine lands.
        self._lock = threading.Lock()

    def send_chat_completion_request(self, request: ChatCompletionRequest) -> ChatCompletionResponse:
        _reject_stream(request.stream)
        with self._lock:
            return self._chat.create(request)

    def send_completion_request(self, request: CompletionRequest) -> CompletionResponse:
        _reject_stream(request.stream)
        with self._lock:
            return self._completion.create(request)

    def tokenize_text(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.engine.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def detokenize_text(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.engine.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)


def _reject_stream(stream: bool) -> None:
    if stream:
        raise InvalidRequestError("stream=True is not supported by the Runner yet", "stream")


DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "f32": torch.float32,
    "float32": torch.float32,
    "f16": torch.float16,
    "float16": torch.float16,
}


def resolve_dtype(name: str) -> torch.dtype:
    """ "auto" is bf16: on this CPU class it runs 4-bit and bf16 matmuls fastest (see layers/linear.py)."""
    if name == "auto":
        return torch.bfloat16
    if name not in DTYPES:
        raise InvalidRequestError(f"dtype must be auto or one of {', '.join(DTYPES)}; got {name!r}", "dtype")
    return DTYPES[name]
