"""mistralrs-serve: an OpenAI-compatible inference server and SDK with a Rust core.

from mistralrs_serve import Runner, Which, ChatCompletionRequest
runner = Runner(which=Which.Default())

The public names load on first use (PEP 562): importing the package, or any
module under it such as `mistralrs_serve._native`, does not pull in torch,
the engine or the HTTP stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from mistralrs_serve.errors import InvalidRequestError, MistralrsServeError, ModelLoadError

if TYPE_CHECKING:
    from mistralrs_serve.entrypoints.openai.protocol import (
        ChatCompletionRequest,
        ChatCompletionResponse,
        CompletionRequest,
        CompletionResponse,
        EmbeddingRequest,
        EmbeddingResponse,
        SpeechRequest,
    )
    from mistralrs_serve.entrypoints.openai.serving_audio import TranscriptionRequest
    from mistralrs_serve.runner import Runner, Which
    from mistralrs_serve.sampling_params import SamplingParams

# public name -> the module that defines it
_LAZY = {
    "ChatCompletionRequest": "mistralrs_serve.entrypoints.openai.protocol",
    "ChatCompletionResponse": "mistralrs_serve.entrypoints.openai.protocol",
    "CompletionRequest": "mistralrs_serve.entrypoints.openai.protocol",
    "CompletionResponse": "mistralrs_serve.entrypoints.openai.protocol",
    "EmbeddingRequest": "mistralrs_serve.entrypoints.openai.protocol",
    "EmbeddingResponse": "mistralrs_serve.entrypoints.openai.protocol",
    "SpeechRequest": "mistralrs_serve.entrypoints.openai.protocol",
    "TranscriptionRequest": "mistralrs_serve.entrypoints.openai.serving_audio",
    "Runner": "mistralrs_serve.runner",
    "Which": "mistralrs_serve.runner",
    "SamplingParams": "mistralrs_serve.sampling_params",
}

__all__ = [
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "CompletionRequest",
    "CompletionResponse",
    "EmbeddingRequest",
    "EmbeddingResponse",
    "InvalidRequestError",
    "MistralrsServeError",
    "ModelLoadError",
    "Runner",
    "SamplingParams",
    "SpeechRequest",
    "TranscriptionRequest",
    "Which",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        # AttributeError also lets `from mistralrs_serve import <submodule>` import the submodule.
        raise AttributeError(f"module 'mistralrs_serve' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
