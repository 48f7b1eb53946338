"""mistralrs-serve: an OpenAI-compatible inference server and SDK with a Rust core.

from mistralrs_serve import Runner, Which, ChatCompletionRequest
runner = Runner(which=Which.Default())
"""

from mistralrs_serve.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
)
from mistralrs_serve.errors import InvalidRequestError, MistralrsServeError, ModelLoadError
from mistralrs_serve.runner import Runner, Which
from mistralrs_serve.sampling_params import SamplingParams

__all__ = [
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "CompletionRequest",
    "CompletionResponse",
    "InvalidRequestError",
    "MistralrsServeError",
    "ModelLoadError",
    "Runner",
    "SamplingParams",
    "Which",
]
__version__ = "0.1.0"
