"""The in-process SDK, shaped like mistral.rs's Python `Runner` and `Which`:
load a model onto an engine thread, then answer OpenAI-shaped requests with
the same serving classes as the HTTP server."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from mistralrs_serve.config import EngineConfig
from mistralrs_serve.engine.engine_info import EngineInfo
from mistralrs_serve.engine.engine_loop import EngineLoop
from mistralrs_serve.engine.llm_engine import LLMEngine
from mistralrs_serve.entrypoints.openai.attachments import Attachments
from mistralrs_serve.entrypoints.openai.model_set import build_serving
from mistralrs_serve.entrypoints.openai.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    SpeechRequest,
)
from mistralrs_serve.entrypoints.openai.serving_audio import (
    SpeechServing,
    TranscriptionRequest,
    TranscriptionServing,
)
from mistralrs_serve.entrypoints.openai.serving_chat import ChatServing
from mistralrs_serve.entrypoints.openai.serving_completion import CompletionServing
from mistralrs_serve.entrypoints.openai.serving_embedding import EmbeddingServing
from mistralrs_serve.errors import InvalidRequestError
from mistralrs_serve.models.loader import ModelSource, load_model
from mistralrs_serve.models.model_specs import ModelSpec
from mistralrs_serve.store.db import SqliteDatabase
from mistralrs_serve.store.files import FileStore, SqlFileStore


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
        mmproj: str | None = None  # llama.cpp's multimodal projector GGUF (images in, Gemma 3 / Qwen2.5-VL)

        def source(self, chat_template: str | None) -> ModelSource:
            return ModelSource(
                "gguf",
                self.quantized_model_id,
                filename=self.quantized_filename,
                revision=self.revision,
                tokenizer_location=self.tok_model_id,
                chat_template=chat_template,
                mmproj=self.mmproj,
            )

    @dataclass(frozen=True)
    class Embedding:
        """An embedding model: a packaged name, a sentence-transformers directory or a hub id."""

        model_id: str = "all-minilm-l6-v2"
        matryoshka_dimensions: tuple[int, ...] = ()

        def spec(self) -> ModelSpec:
            opts = (
                {"matryoshka_dimensions": list(self.matryoshka_dimensions)}
                if self.matryoshka_dimensions
                else {}
            )
            return ModelSpec("embedding", self.model_id, options=opts)

    @dataclass(frozen=True)
    class Speech:
        """A Piper voice (packaged name, .onnx file or its directory); `voices` names several."""

        model_id: str = "en_US-joe-medium"
        voices: tuple[tuple[str, str], ...] = ()  # (voice name, source), the first the default

        def spec(self) -> ModelSpec:
            return ModelSpec(
                "speech", self.model_id, options={"voices": dict(self.voices)} if self.voices else {}
            )

    @dataclass(frozen=True)
    class Transcription:
        """A CTranslate2 Whisper model: a packaged name (whisper-tiny.en, whisper-base) or directory."""

        model_id: str = "whisper-tiny.en"
        compute_type: str = "int8"

        def spec(self) -> ModelSpec:
            return ModelSpec("transcription", self.model_id, options={"compute_type": self.compute_type})


AnyWhich = Which.Default | Which.Plain | Which.GGUF
OtherWhich = Which.Embedding | Which.Speech | Which.Transcription


class Runner:
    """Load a model once, then answer OpenAI-shaped requests in process.

    Chat file parts: `file_data` always works; `file_id` needs `data_dir`, the
    data directory of a server whose files to read (inline files are then
    stored there too). Without it there is no store, and a `file_id` part is
    a 400 that says so."""

    def __init__(
        self,
        which: AnyWhich | OtherWhich | None = None,
        *,
        chat_template: str | None = None,
        dtype: str = "auto",
        num_threads: int | None = None,
        engine_config: EngineConfig | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        transcriber: Which.Transcription | None = None,
    ) -> None:
        """`which` a chat model (the default), or an embedding, speech or transcription model,
        whose requests go to `send_embedding_request`, `generate_speech` and
        `send_transcription_request`. `transcriber` lets a chat model hear `input_audio` parts."""
        which = which if which is not None else Which.Default()
        self._listener = build_serving(transcriber.spec()) if transcriber is not None else None
        if isinstance(which, (Which.Embedding, Which.Speech, Which.Transcription)):
            self.kind = which.spec().kind
            self._serving = build_serving(which.spec())
            return
        self._setup(which.source(chat_template), dtype, num_threads, engine_config, data_dir)

    @classmethod
    def from_model(
        cls,
        model: str | None,
        *,
        chat_template: str | None = None,
        dtype: str = "auto",
        num_threads: int | None = None,
        engine_config: EngineConfig | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        mmproj: str | None = None,
    ) -> Runner:
        """A Runner for a CLI-style model reference: file, directory, repo id or "default"
        (`mmproj`: a GGUF model's multimodal projector)."""
        runner = cls.__new__(cls)
        source = ModelSource.parse(model, chat_template, mmproj)
        runner._setup(source, dtype, num_threads, engine_config, data_dir)
        return runner

    def _setup(
        self,
        source: ModelSource,
        dtype: str,
        num_threads: int | None,
        engine_config: EngineConfig | None,
        data_dir: str | os.PathLike[str] | None,
    ) -> None:
        self.kind = "chat"
        self._serving = None
        self._listener = getattr(self, "_listener", None)
        # opened first: a bad data_dir fails before the model loads
        self.files: FileStore | None = (
            SqlFileStore(SqliteDatabase(data_dir)) if data_dir is not None else None
        )
        self.client = start_engine(source, dtype, num_threads, engine_config)
        self.info: EngineInfo = self.client.info  # the model's tokenizer, template and limits
        listen = self._listener.hear if self._listener is not None else None
        self._chat = ChatServing(self.client, self.info.model_name, Attachments(self.files, listen=listen))
        self._completion = CompletionServing(self.client, self.info.model_name)

    def send_chat_completion_request(
        self, request: ChatCompletionRequest
    ) -> ChatCompletionResponse | Iterator[ChatCompletionChunk]:
        """The response, or with `stream=True` an iterator of chunks (closing it aborts the request)."""
        self._model_of("chat")
        if request.stream:
            return self._chat.create_stream(request)
        return self._chat.create(request)

    def send_completion_request(self, request: CompletionRequest) -> CompletionResponse:
        self._model_of("chat")
        if request.stream:
            raise InvalidRequestError("stream=True is not supported for completions by the Runner", "stream")
        return self._completion.create(request)

    def send_embedding_request(self, request: EmbeddingRequest) -> EmbeddingResponse:
        """One vector per input, as /v1/embeddings answers (a Runner of Which.Embedding)."""
        serving: EmbeddingServing = self._model_of("embedding")
        return serving.create(request)

    def generate_speech(self, request: SpeechRequest) -> bytes:
        """The whole audio file of `request.input` in `request.response_format` (Which.Speech)."""
        serving: SpeechServing = self._model_of("speech")
        return serving.create(request)

    def send_transcription_request(self, request: TranscriptionRequest) -> dict[str, Any] | str:
        """The transcript as /v1/audio/transcriptions answers it: a dict for json and
        verbose_json, text for text, srt and vtt (Which.Transcription)."""
        serving: TranscriptionServing = self._model_of("transcription")
        body, _ = serving.body(request, serving.transcript(request))
        return body if isinstance(body, dict) else body.decode()

    def _model_of(self, kind: str) -> Any:
        if self.kind != kind:
            raise InvalidRequestError(f"this Runner serves a model of kind {self.kind}, not {kind}", "model")
        return self._serving

    def close(self) -> None:
        """Stop the engine thread (it also stops with the process)."""
        if self.kind == "chat":
            self.client.shutdown()
        elif self.kind == "embedding":
            self._serving.engine.shutdown()

    def tokenize_text(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.info.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def detokenize_text(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.info.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)


def start_engine(
    source: ModelSource, dtype: str, num_threads: int | None, engine_config: EngineConfig | None
) -> EngineLoop:
    """Load the model and run its engine on a background thread. One engine
    thread serves every caller (requests from many threads batch together);
    it also loads the model, see EngineLoop for why."""
    if num_threads:
        torch.set_num_threads(num_threads)
    torch_dtype = resolve_dtype(dtype)

    def build() -> LLMEngine:
        return LLMEngine(load_model(source, dtype=torch_dtype), engine_config)

    return EngineLoop(build)


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
