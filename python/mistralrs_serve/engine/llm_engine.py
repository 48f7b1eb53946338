"""Generation on one sequence at a time: prefill, then decode token by token.

Continuous batching over a paged cache replaces the loop body later; the
outputs and the stop logic stay.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from mistralrs_serve import _native
from mistralrs_serve.engine.detokenizer import IncrementalDetokenizer
from mistralrs_serve.engine.kv_cache import ContiguousKVCache
from mistralrs_serve.engine.stop import StopStringMatcher
from mistralrs_serve.errors import InvalidRequestError
from mistralrs_serve.models.loader import LoadedModel
from mistralrs_serve.sampling_params import SamplingParams

# The KV cache is fp32 on the CPU whatever the compute dtype: torch's CPU
# attention kernels run fp32 5-9x faster than bf16 (decode over 512 cached
# positions: 68 vs 380 us per layer), for twice the cache memory.
KV_CACHE_DTYPE = torch.float32

# Prompt tokens per forward pass: bounds attention scratch memory (T x S
# scores) on long prompts.
PREFILL_CHUNK_TOKENS = 512


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class StepOutput:
    """What one decode step adds to a sequence."""

    token_id: int
    text: str  # newly released text (stop strings held back or cut)
    logprob: TokenLogprob | None = None
    finish_reason: str | None = None  # "stop" or "length" on the last step
    is_stop_token: bool = False  # an EOS/stop token: counted, but not part of the text


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


class LLMEngine:
    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.max_model_len = loaded.config.max_position_embeddings

    def check_prompt(self, prompt_ids: list[int], params: SamplingParams, param: str) -> int:
        """Number of tokens we may generate; raises if the prompt cannot fit."""
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty", param)
        room = self.max_model_len - len(prompt_ids)
        if room < 1:
            raise InvalidRequestError(
                f"the prompt has {len(prompt_ids)} tokens; this model's context holds {self.max_model_len}",
                param,
            )
        return room if params.max_tokens is None else min(room, params.max_tokens)

    def generate(
        self, prompt_ids: list[int], params: SamplingParams, choice_index: int = 0, param: str = "prompt"
    ) -> CompletionOutput:
        out = CompletionOutput(index=choice_index)
        for step in self.stream(prompt_ids, params, choice_index, param):
            out.text += step.text
            out.token_ids.append(step.token_id)
            if step.logprob is not None and not step.is_stop_token:
                out.logprobs.append(step.logprob)
            out.finish_reason = step.finish_reason
        return out

    def stream(
        self, prompt_ids: list[int], params: SamplingParams, choice_index: int = 0, param: str = "prompt"
    ) -> Iterator[StepOutput]:
        budget = self.check_prompt(prompt_ids, params, param)
        native = params.to_native(
            self.model.config.vocab_size,
            lambda s: self.tokenizer.encode(s, add_special_tokens=False),
            choice_index,
        )
        cache = ContiguousKVCache(self.model.config, len(prompt_ids) + budget, KV_CACHE_DTYPE)
        detok = IncrementalDetokenizer(self.tokenizer)
        stops = StopStringMatcher(params.stop)
        stop_ids = set(params.stop_token_ids) | (
            set() if params.ignore_eos else set(self.tokenizer.eos_token_ids)
        )
        prompt = np.asarray(prompt_ids, dtype=np.uint32)
        output: list[int] = []
        logits = self._prefill(cache, prompt_ids)
        while True:
            token, logprob = self._sample(logits, native, prompt, output)
            output.append(token)
            is_stop_token = token in stop_ids
            text = "" if is_stop_token else stops.push(detok.push(token))
            finish = self._finish_reason(is_stop_token or stops.matched is not None, len(output), budget)
            if finish is not None and stops.matched is None:
                text += stops.push(detok.flush()) + stops.flush()
            yield StepOutput(token, text, logprob, finish, is_stop_token)
            if finish is not None:
                return
            logits = self._forward(cache, [token], len(prompt_ids) + len(output) - 1)

    @staticmethod
    def _finish_reason(stopped: bool, num_generated: int, budget: int) -> str | None:
        if stopped:
            return "stop"
        return "length" if num_generated >= budget else None

    def _prefill(self, cache: ContiguousKVCache, prompt_ids: list[int]) -> torch.Tensor:
        for start in range(0, len(prompt_ids), PREFILL_CHUNK_TOKENS):
            logits = self._forward(cache, prompt_ids[start : start + PREFILL_CHUNK_TOKENS], start)
        return logits

    def _forward(self, cache: ContiguousKVCache, ids: list[int], start: int) -> torch.Tensor:
        cache.begin_step(len(ids))
        input_ids = torch.tensor(ids, dtype=torch.long)
        positions = torch.arange(start, start + len(ids))
        logits = self.model.forward(input_ids, positions, cache, torch.tensor([len(ids) - 1]))
        cache.end_step()
        return logits

    def _sample(
        self, logits: torch.Tensor, native: _native.SamplingParams, prompt: np.ndarray, output: list[int]
    ) -> tuple[int, TokenLogprob | None]:
        rows = logits.numpy()
        history = np.asarray(output, dtype=np.uint32)
        ids, lps, top_ids, top_lps = _native.sample(rows, [native], [prompt], [history], [len(output)])
        token = int(ids[0])
        if np.isnan(lps[0]):
            return token, None
        top = tuple((int(i), float(lp)) for i, lp in zip(top_ids[0], top_lps[0], strict=True) if i >= 0)
        return token, TokenLogprob(token, float(lps[0]), top)
