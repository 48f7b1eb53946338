"""What the serving layer may know about a running engine, and the one check
of a prompt.

`EngineInfo` is a read-only view, safe on any thread: the tokenizer and chat
template, the limits, the model's generation defaults and the grammar
compiler. `EngineInfo.check_prompt` validates a prompt and its sampling
params on the caller's thread and returns a `CheckedPrompt`, which the engine
runs without checking it again. `EngineClient` is what serving calls to run
one (EngineLoop implements it).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from mistralrs_serve.engine.media import PromptMedia
from mistralrs_serve.errors import InvalidRequestError
from mistralrs_serve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from mistralrs_serve import _native
    from mistralrs_serve.engine.grammar import GrammarCompiler
    from mistralrs_serve.engine.llm_engine import LLMEngine
    from mistralrs_serve.engine.sequence import CompletionOutput, Request, StepOutput
    from mistralrs_serve.models.vision import VisionModel
    from mistralrs_serve.tokenizer.chat_template import ChatTemplate
    from mistralrs_serve.tokenizer.tokenizer import Tokenizer


@dataclass(frozen=True)
class CheckedPrompt:
    """A prompt the engine can run as it is; only `EngineInfo.check_prompt` makes one."""

    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int  # per choice: what the context, the KV cache and max_tokens leave room for
    matcher: _native.GrammarMatcher | None  # the compiled grammar; the engine forks it for each choice
    media: PromptMedia | None = None  # the prompt's images, placed (engine/media.py)


@dataclass(frozen=True)
class EngineInfo:
    """The model and limits of one engine. Every field is fixed once the engine
    is built, and the tokenizer and grammar compiler are thread-safe."""

    model_name: str  # the id /v1/models reports
    tokenizer: Tokenizer
    vocab_size: int  # rows of the model's logits (may exceed the tokenizer's vocabulary)
    max_model_len: int  # prompt plus output, in tokens
    num_kv_tokens: int  # what the KV cache holds; one sequence must fit it alone
    max_num_seqs: int  # sequences running at once, so the most choices (n) of one request
    generation_defaults: Mapping[str, Any]  # the model's generation_config: unset sampling fields
    grammars: GrammarCompiler
    load_time_s: float  # how long loading the model took
    vision: VisionModel | None = None  # set for a vision-language model: it takes image parts
    max_num_batched_tokens: int = 8192  # tokens one step computes (an image must fit one, Gemma 3)

    @classmethod
    def of(cls, engine: LLMEngine) -> EngineInfo:
        return cls(
            model_name=engine.loaded.name,
            tokenizer=engine.tokenizer,
            vocab_size=engine.model.config.vocab_size,
            max_model_len=engine.max_model_len,
            num_kv_tokens=engine.num_kv_tokens,
            max_num_seqs=engine.config.max_num_seqs,
            generation_defaults=dict(engine.loaded.generation_defaults),
            grammars=engine.grammars,
            load_time_s=engine.loaded.load_time_s,
            vision=engine.loaded.vision,
            max_num_batched_tokens=engine.config.max_num_batched_tokens,
        )

    @property
    def chat_template(self) -> ChatTemplate | None:
        return self.tokenizer.chat_template

    def check_prompt(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        param: str = "prompt",
        media: PromptMedia | None = None,
    ) -> CheckedPrompt:
        """Everything the engine needs to hold of a request: it fits the context and
        the KV cache, its logit bias names real tokens, its grammar compiles, an image
        computed in one step fits a step. Raises InvalidRequestError naming the field
        (`param` for the prompt itself)."""
        budget = self._token_budget(prompt_ids, params, param)
        for im in media.images if media is not None else ():
            if im.bidirectional and im.end - im.start > self.max_num_batched_tokens:
                raise InvalidRequestError(
                    f"an image of {im.end - im.start} tokens does not fit one step of "
                    f"{self.max_num_batched_tokens} tokens (raise --max-batched-tokens)",
                    param,
                )
        params.check_vocab(self.vocab_size)
        matcher = self.grammars.compile(params.grammar) if params.grammar is not None else None
        if params.n > self.max_num_seqs:
            raise InvalidRequestError(f"n must be <= {self.max_num_seqs} (--max-seqs)", "n")
        return CheckedPrompt(list(prompt_ids), params, budget, matcher, media)

    def _token_budget(self, prompt_ids: list[int], params: SamplingParams, param: str) -> int:
        """Tokens each choice may generate; raises if the prompt cannot fit."""
        num_prompt = len(prompt_ids)
        if not num_prompt:
            raise InvalidRequestError("the prompt is empty", param)
        room = self.max_model_len - num_prompt
        if room < 1:
            raise InvalidRequestError(
                f"the prompt has {num_prompt} tokens; this model's context holds {self.max_model_len}", param
            )
        # A sequence must fit the KV cache on its own, or it would preempt itself forever.
        kv_tokens = self.num_kv_tokens
        if num_prompt + 1 > kv_tokens:
            raise InvalidRequestError(
                f"the prompt has {num_prompt} tokens; the KV cache holds {kv_tokens} (raise --kv-cache-mb)",
                param,
            )
        if params.max_tokens is not None and num_prompt + params.max_tokens > kv_tokens:
            raise InvalidRequestError(
                f"prompt ({num_prompt} tokens) plus max_tokens ({params.max_tokens}) exceeds the "
                f"KV cache of {kv_tokens} tokens (raise --kv-cache-mb)",
                "max_tokens",
            )
        room = min(room, kv_tokens - num_prompt)
        return room if params.max_tokens is None else min(room, params.max_tokens)


class EngineClient(Protocol):
    """What serving calls on an engine; `EngineLoop` is the one implementation.
    Outputs arrive as StepOutputs, one per choice per step; every method is safe
    on any thread."""

    info: EngineInfo

    def generate(self, prompt: CheckedPrompt) -> list[CompletionOutput]:
        """Every choice, finished (blocks)."""
        ...

    def stream(self, prompt: CheckedPrompt) -> Iterator[StepOutput]:
        """Outputs as they come; closing the iterator aborts the request."""
        ...

    def stream_async(
        self, prompt: CheckedPrompt, *, idle_s: float | None = None
    ) -> AsyncGenerator[StepOutput | None, None]:
        """As `stream`, for asyncio; None after idle_s without output (keep-alives)."""
        ...

    def add_finished_hook(self, hook: Callable[[Request], None]) -> None:
        """Call `hook` on the engine thread with each request that finishes (metrics)."""
        ...

    def stats(self) -> dict[str, int]:
        """Scheduler counters for metrics."""
        ...
