"""Per-request and per-choice state on the Python side of the engine.

The Rust scheduler owns token ids (the history the sampler reads), blocks and
positions; a `Sequence` here owns what Python needs to turn sampled ids into
text: the detokenizer, the stop-string matcher, the sampling params and the
logprobs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from mistralrs_serve import _native
from mistralrs_serve.engine.detokenizer import IncrementalDetokenizer
from mistralrs_serve.engine.media import PromptMedia
from mistralrs_serve.engine.stop import StopStringMatcher
from mistralrs_serve.sampling_params import SamplingParams
from mistralrs_serve.tokenizer.tokenizer import Tokenizer


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class StepOutput:
    """What one step adds to one choice of a request."""

    index: int  # the choice
    token_id: int
    text: str  # newly released text (stop strings held back or cut)
    logprob: TokenLogprob | None = None
    finish_reason: str | None = None  # "stop", "length" or "abort" on the last step
    is_stop_token: bool = False  # an EOS/stop token: counted, but not part of the text
    error: str | None = None  # the engine failed this request
    num_cached_tokens: int | None = None  # on a choice's last output: prompt tokens the prefix cache served


@dataclass
class CompletionOutput:
    """A whole choice, assembled from its StepOutputs."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, step: StepOutput) -> None:
        self.text += step.text
        self.token_ids.append(step.token_id)
        if step.logprob is not None and not step.is_stop_token:
            self.logprobs.append(step.logprob)
        self.finish_reason = step.finish_reason or self.finish_reason


@dataclass
class Timestamps:
    """Per-request times (time.monotonic) for TTFT and inter-token latency."""

    queued: float = field(default_factory=time.monotonic)
    scheduled: float | None = None
    first_token: float | None = None
    tokens: list[float] = field(default_factory=list)
    finished: float | None = None


OutputCallback = Callable[[StepOutput], None]


@dataclass
class Request:
    request_id: str
    prompt_ids: np.ndarray  # uint32
    params: SamplingParams
    budget: int  # most tokens any choice may generate
    on_output: OutputCallback
    seq_ids: list[int] = field(default_factory=list)  # choice i -> sequence id (leader first)
    times: Timestamps = field(default_factory=Timestamps)
    num_unfinished: int = 0
    matcher: _native.GrammarMatcher | None = None  # the compiled grammar each choice forks
    num_cached_tokens: int | None = None  # prompt tokens found in the prefix cache when first scheduled
    media: PromptMedia | None = None  # the prompt's images (engine/media.py)

    @property
    def num_pending_forks(self) -> int:
        return self.params.n - len(self.seq_ids)


class Sequence:
    """One choice of a request."""

    def __init__(
        self,
        seq_id: int,
        index: int,
        request: Request,
        tokenizer: Tokenizer,
        native: _native.SamplingParams,
        stop_ids: frozenset[int],
    ) -> None:
        self.seq_id = seq_id
        self.index = index
        self.request = request
        self.native = native
        self.stop_ids = stop_ids
        self.num_output_tokens = 0  # the ids themselves live in the scheduler
        self.detokenizer = IncrementalDetokenizer(tokenizer, request.params.skip_special_tokens)
        self.stops = StopStringMatcher(request.params.stop)
        self.finished = False
        self.matcher: _native.GrammarMatcher | None = None

    def append(self, token_id: int, logprob: TokenLogprob | None) -> StepOutput:
        """Record a sampled token; decide whether the choice is finished."""
        self.num_output_tokens += 1
        is_stop_token = token_id in self.stop_ids
        text = "" if is_stop_token else self.stops.push(self.detokenizer.push(token_id))
        finish = None
        if is_stop_token or self.stops.matched is not None:
            finish = "stop"
        elif self.num_output_tokens >= self.request.budget:
            finish = "length"
        if finish is not None and self.stops.matched is None:
            text += self.stops.push(self.detokenizer.flush()) + self.stops.flush()
        self.finished = finish is not None
        return StepOutput(self.index, token_id, text, logprob, finish, is_stop_token)
