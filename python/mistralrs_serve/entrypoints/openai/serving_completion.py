"""POST /v1/completions (legacy), for the server and the Runner alike."""

from __future__ import annotations

from mistralrs_serve.engine.engine_loop import EngineLoop
from mistralrs_serve.engine.sequence import CompletionOutput
from mistralrs_serve.entrypoints.openai import serving_common as common
from mistralrs_serve.entrypoints.openai.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Usage,
)
from mistralrs_serve.errors import InvalidRequestError
from mistralrs_serve.sampling_params import MAX_TOP_LOGPROBS


class CompletionServing:
    def __init__(self, client: EngineLoop, model_name: str) -> None:
        self.client = client
        self.engine = client.engine
        self.model_name = model_name

    def create(self, req: CompletionRequest) -> CompletionResponse:
        common.log_unknown_fields(req)
        common.reject_unsupported(req, common.NOT_YET_SUPPORTED)
        if req.suffix:
            raise InvalidRequestError(
                "suffix is not supported: this model has no fill-in-the-middle mode", "suffix"
            )
        if req.best_of is not None and req.best_of != req.n:
            raise InvalidRequestError("best_of must equal n (ranking candidates is not supported)", "best_of")
        if req.logprobs is not None and not 0 <= req.logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequestError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}]", "logprobs")
        params = common.sampling_params(
            req,
            max_tokens=req.max_tokens,
            logprobs=req.logprobs is not None,
            top_logprobs=req.logprobs or 0,
            defaults=self.engine.loaded.generation_defaults,
        )
        choices: list[CompletionChoice] = []
        prompt_tokens = completion_tokens = 0
        for prompt_index, prompt_ids in enumerate(self.prompts(req)):
            prompt_ids = common.fit_prompt(
                self.engine, prompt_ids, params, truncate=req.truncate_sequence, param="prompt"
            )
            outputs = self.client.generate(prompt_ids, params, "prompt")
            prompt_tokens += len(prompt_ids)
            completion_tokens += sum(len(o.token_ids) for o in outputs)
            prefix = self.engine.tokenizer.decode(prompt_ids) if req.echo else ""
            choices += [
                self._choice(prompt_index * params.n + o.index, prefix, o, req.logprobs is not None)
                for o in outputs
            ]
        usage = Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )
        return CompletionResponse(model=self.model_name, choices=choices, usage=usage)

    def prompts(self, req: CompletionRequest) -> list[list[int]]:
        """One token list per prompt: a string, strings, token ids, or lists of token ids."""
        p = req.prompt
        if isinstance(p, str):
            return [self.engine.tokenizer.encode(p)]
        if not p:
            raise InvalidRequestError("prompt must not be empty", "prompt")
        if all(isinstance(x, int) for x in p):
            return [self._checked_ids(p)]  # type: ignore[arg-type]
        if all(isinstance(x, str) for x in p):
            return [self.engine.tokenizer.encode(x) for x in p]  # type: ignore[arg-type]
        return [self._checked_ids(x) for x in p]  # type: ignore[arg-type]

    def _checked_ids(self, ids: list[int]) -> list[int]:
        vocab = self.engine.tokenizer.vocab_size
        if not ids or any(not 0 <= i < vocab for i in ids):
            raise InvalidRequestError(f"prompt token ids must be non-empty and in [0, {vocab})", "prompt")
        return ids

    def _choice(
        self, index: int, prefix: str, out: CompletionOutput, want_logprobs: bool
    ) -> CompletionChoice:
        logprobs = self._logprobs(out, len(prefix)) if want_logprobs else None
        return CompletionChoice(
            index=index,
            text=prefix + out.text,
            logprobs=logprobs,
            finish_reason="length" if out.finish_reason == "length" else "stop",
        )

    def _logprobs(self, out: CompletionOutput, offset: int) -> CompletionLogprobs:
        tok = self.engine.tokenizer
        tokens = [tok.token_bytes(lp.token_id).decode("utf-8", errors="replace") for lp in out.logprobs]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        top = [
            {tok.token_bytes(i).decode("utf-8", errors="replace"): v for i, v in lp.top} or None
            for lp in out.logprobs
        ]
        return CompletionLogprobs(
            tokens=tokens,
            token_logprobs=[lp.logprob for lp in out.logprobs],
            top_logprobs=top,
            text_offset=offsets,
        )
