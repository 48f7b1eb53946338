"""POST /v1/completions (legacy), for the server and the Runner alike."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from mistralrs_serve.engine.engine_info import CheckedPrompt, EngineClient
from mistralrs_serve.engine.sequence import CompletionOutput, StepOutput
from mistralrs_serve.engine.sequence import TokenLogprob as EngineLogprob
from mistralrs_serve.entrypoints.openai import serving_common as common
from mistralrs_serve.entrypoints.openai import structured
from mistralrs_serve.entrypoints.openai.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamChoice,
    CompletionStreamResponse,
    Usage,
    random_id,
)
from mistralrs_serve.errors import InvalidRequestError
from mistralrs_serve.sampling_params import MAX_TOP_LOGPROBS, SamplingParams


@dataclass(frozen=True)
class Prepared:
    """A validated completion request: one checked prompt per prompt given."""

    prompts: list[CheckedPrompt]  # fitted to the context, all with the same params
    params: SamplingParams
    echo: bool
    want_logprobs: bool


class CompletionServing:
    def __init__(self, client: EngineClient, model_name: str) -> None:
        self.client = client
        self.info = client.info
        self.model_name = model_name
        self.seeds: random.Random | None = None  # the server's --seed, if any

    def prepare(self, req: CompletionRequest) -> Prepared:
        """Validate everything before any generation (or stream) starts."""
        common.log_unknown_fields(req)
        if req.suffix:
            raise InvalidRequestError(
                "suffix is not supported: this model has no fill-in-the-middle mode", "suffix"
            )
        if req.best_of is not None and req.best_of != req.n:
            raise InvalidRequestError("best_of must equal n (ranking candidates is not supported)", "best_of")
        if req.logprobs is not None and not 0 <= req.logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequestError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}]", "logprobs")
        if req.echo and req.logprobs is not None:
            raise InvalidRequestError(
                "echo with logprobs is not supported (prompt logprobs are not computed)", "echo"
            )
        params = common.sampling_params(
            req,
            max_tokens=req.max_tokens,
            logprobs=req.logprobs is not None,
            top_logprobs=req.logprobs or 0,
            defaults=self.info.generation_defaults,
            seeds=self.seeds,
            grammar=structured.request_grammar(None, req.grammar, req.grammar_type),
        )
        prompts = [
            common.checked_prompt(self.info, ids, params, truncate=req.truncate_sequence, param="prompt")
            for ids in self.prompts(req)
        ]
        return Prepared(prompts, params, req.echo, req.logprobs is not None)

    def create(self, req: CompletionRequest) -> CompletionResponse:
        prep = self.prepare(req)
        outputs = [self.client.generate(prompt) for prompt in prep.prompts]
        return self.response(prep, outputs)

    async def create_async(self, req: CompletionRequest) -> CompletionResponse:
        """As `create`; the prompts run concurrently, cancelling aborts them all."""
        prep = self.prepare(req)
        outputs = await asyncio.gather(*(common.collect_async(self.client, p) for p in prep.prompts))
        return self.response(prep, list(outputs))

    def response(self, prep: Prepared, outputs: list[list[CompletionOutput]]) -> CompletionResponse:
        choices: list[CompletionChoice] = []
        for prompt_index, (prompt, outs) in enumerate(zip(prep.prompts, outputs, strict=True)):
            prefix = self.info.tokenizer.decode(prompt.prompt_ids) if prep.echo else ""
            for o in outs:
                choices.append(
                    CompletionChoice(
                        index=prompt_index * prep.params.n + o.index,
                        text=prefix + o.text,
                        logprobs=self._logprobs(o.logprobs, len(prefix)) if prep.want_logprobs else None,
                        finish_reason="length" if o.finish_reason == "length" else "stop",
                    )
                )
        prompt_tokens = sum(len(p.prompt_ids) for p in prep.prompts)
        completion_tokens = sum(len(o.token_ids) for outs in outputs for o in outs)
        usage = Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )
        return CompletionResponse(model=self.model_name, choices=choices, usage=usage)

    def create_stream_async(
        self, req: CompletionRequest, idle_s: float | None = None
    ) -> AsyncIterator[CompletionStreamResponse | None]:
        """Validates now, then yields chunks (None after idle_s without output).
        Several prompts stream one after another, each choice with its own index."""
        prep = self.prepare(req)
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        return self._stream_async(prep, include_usage, idle_s)

    async def _stream_async(
        self, prep: Prepared, include_usage: bool, idle_s: float | None
    ) -> AsyncIterator[CompletionStreamResponse | None]:
        chunk_id, created = random_id("cmpl"), int(time.time())

        def chunk(
            choices: list[CompletionStreamChoice], usage: Usage | None = None
        ) -> CompletionStreamResponse:
            return CompletionStreamResponse(
                id=chunk_id, created=created, model=self.model_name, choices=choices, usage=usage
            )

        n = prep.params.n
        completion_tokens = 0
        for prompt_index, prompt in enumerate(prep.prompts):
            offsets = [0] * n
            if prep.echo:
                text = self.info.tokenizer.decode(prompt.prompt_ids)
                yield chunk([CompletionStreamChoice(index=prompt_index * n + i, text=text) for i in range(n)])
            steps = self.client.stream_async(prompt, idle_s=idle_s)
            try:
                async for step in steps:
                    if step is None:
                        yield None
                        continue
                    completion_tokens += 1
                    choice = self._stream_choice(prompt_index * n + step.index, step, offsets, prep)
                    if choice is not None:
                        yield chunk([choice])
            finally:
                await steps.aclose()
        if include_usage:
            prompt_tokens = sum(len(p.prompt_ids) for p in prep.prompts)
            usage = Usage(
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                total_tokens=prompt_tokens + completion_tokens,
            )
            yield chunk([], usage)

    def _stream_choice(
        self, index: int, step: StepOutput, offsets: list[int], prep: Prepared
    ) -> CompletionStreamChoice | None:
        logprobs = None
        if prep.want_logprobs and step.logprob is not None and not step.is_stop_token:
            logprobs = self._logprobs([step.logprob], offsets[step.index])
        offsets[step.index] += len(step.text)
        if not (step.text or logprobs is not None or step.finish_reason):
            return None
        finish = None
        if step.finish_reason is not None:
            finish = "length" if step.finish_reason == "length" else "stop"
        return CompletionStreamChoice(index=index, text=step.text, logprobs=logprobs, finish_reason=finish)

    def prompts(self, req: CompletionRequest) -> list[list[int]]:
        """One token list per prompt: a string, strings, token ids, or lists of token ids."""
        p = req.prompt
        if isinstance(p, str):
            return [self.info.tokenizer.encode(p) or self._document_start()]
        if not p:
            raise InvalidRequestError("prompt must not be empty", "prompt")
        if all(isinstance(x, int) for x in p):
            return [self._checked_ids(p)]  # type: ignore[arg-type]
        if all(isinstance(x, str) for x in p):
            return [self.info.tokenizer.encode(x) for x in p]  # type: ignore[arg-type]
        return [self._checked_ids(x) for x in p]  # type: ignore[arg-type]

    def _document_start(self) -> list[int]:
        """An empty prompt is OpenAI's default: the model starts a new document
        (after its BOS token, or the end-of-text token where it has no BOS)."""
        special = self.info.tokenizer.special
        start = special.bos_token_id if special.bos_token_id is not None else special.eos_token_id
        if start is None:
            raise InvalidRequestError("prompt must not be empty: the model has no BOS or EOS", "prompt")
        return [start]

    def _checked_ids(self, ids: list[int]) -> list[int]:
        vocab = self.info.tokenizer.vocab_size
        if not ids or any(not 0 <= i < vocab for i in ids):
            raise InvalidRequestError(f"prompt token ids must be non-empty and in [0, {vocab})", "prompt")
        return ids

    def _logprobs(self, logprobs: list[EngineLogprob], offset: int) -> CompletionLogprobs:
        """OpenAI's legacy shape; top_logprobs always holds the chosen token too."""
        tok = self.info.tokenizer

        def text(token_id: int) -> str:
            return tok.token_bytes(token_id).decode("utf-8", errors="replace")

        tokens = [text(lp.token_id) for lp in logprobs]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        top = [{text(i): v for i, v in ((lp.token_id, lp.logprob), *lp.top)} for lp in logprobs]
        return CompletionLogprobs(
            tokens=tokens,
            token_logprobs=[lp.logprob for lp in logprobs],
            top_logprobs=top,
            text_offset=offsets,
        )
