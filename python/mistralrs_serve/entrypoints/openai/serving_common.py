"""What chat and legacy completions share: sampling params from a request,
fitting a prompt to the context, logprob shapes and usage. Serving reaches
the engine only through `EngineClient` and its `EngineInfo`."""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from typing import Any

from mistralrs_serve.engine.engine_info import CheckedPrompt, EngineClient, EngineInfo
from mistralrs_serve.engine.media import PromptMedia
from mistralrs_serve.engine.sequence import CompletionOutput
from mistralrs_serve.engine.sequence import TokenLogprob as EngineLogprob
from mistralrs_serve.entrypoints.openai.protocol import (
    SamplingFields,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from mistralrs_serve.errors import InvalidRequestError
from mistralrs_serve.sampling_params import DEFAULT_DRY_BREAKERS, Grammar, SamplingParams
from mistralrs_serve.tokenizer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


def log_unknown_fields(req: SamplingFields) -> None:
    extra = sorted((req.model_extra or {}).keys())
    if extra:
        logger.debug("ignoring unknown request fields: %s", ", ".join(extra))


def sampling_params(
    req: SamplingFields,
    *,
    max_tokens: int | None,
    logprobs: bool,
    top_logprobs: int,
    defaults: Mapping[str, Any],
    seeds: random.Random | None = None,
    grammar: Grammar | None = None,
) -> SamplingParams:
    """Validated SamplingParams; unset fields fall back to the model's generation_config.
    Without a request seed, `seeds` (the server's --seed) draws one: a server
    started with a seed answers the same sequence of requests the same way."""

    def pick(name: str, fallback: Any) -> Any:
        value = getattr(req, name)
        return value if value is not None else defaults.get(name, fallback)

    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=pick("temperature", 1.0),
        top_p=pick("top_p", 1.0),
        top_k=pick("top_k", 0),
        min_p=pick("min_p", 0.0),
        repetition_penalty=pick("repetition_penalty", 1.0),
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        logit_bias=dict(req.logit_bias or {}),
        dry_multiplier=req.dry_multiplier or 0.0,
        dry_base=req.dry_base if req.dry_base is not None else 1.75,
        dry_allowed_length=req.dry_allowed_length if req.dry_allowed_length is not None else 2,
        dry_sequence_breakers=tuple(req.dry_sequence_breakers or DEFAULT_DRY_BREAKERS),
        seed=req.seed if req.seed is not None or seeds is None else seeds.getrandbits(63),
        stop=tuple(stop),
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        n=req.n,
        grammar=grammar,
    )


def checked_prompt(
    info: EngineInfo,
    prompt_ids: list[int],
    params: SamplingParams,
    *,
    truncate: bool,
    param: str,
    media: PromptMedia | None = None,
) -> CheckedPrompt:
    """The request's one check, before a response (or stream) starts. With `truncate`
    the prompt keeps its last tokens so that max_tokens fits the context (not one
    with images: they would lose their places)."""
    room_for_output = params.max_tokens or 1
    limit = info.max_model_len - room_for_output
    if truncate and len(prompt_ids) > limit:
        if media is not None:
            raise InvalidRequestError(
                f"the prompt has {len(prompt_ids)} tokens with its images, over the {limit} that fit; "
                "truncate_sequence does not cut prompts with images",
                param,
            )
        if limit < 1:
            raise InvalidRequestError(
                f"max_tokens ({room_for_output}) leaves no room for the prompt in this model's context "
                f"of {info.max_model_len} tokens",
                "max_tokens",
            )
        prompt_ids = prompt_ids[-limit:]
    return info.check_prompt(prompt_ids, params, param, media)


async def collect_async(client: EngineClient, prompt: CheckedPrompt) -> list[CompletionOutput]:
    """Every choice of one request, finished; cancelling the caller aborts the request."""
    outputs = [CompletionOutput(i) for i in range(prompt.params.n)]
    steps = client.stream_async(prompt)
    try:
        async for step in steps:
            if step is not None:
                outputs[step.index].add(step)
    finally:
        await steps.aclose()
    return outputs


def usage(prompt_ids: list[int], outputs: list[CompletionOutput]) -> Usage:
    completion = sum(len(o.token_ids) for o in outputs)
    return Usage(
        prompt_tokens=len(prompt_ids), completion_tokens=completion, total_tokens=len(prompt_ids) + completion
    )


def chat_logprob(tokenizer: Tokenizer, lp: EngineLogprob) -> TokenLogprob:
    def top(token_id: int, logprob: float) -> TopLogprob:
        raw = tokenizer.token_bytes(token_id)
        return TopLogprob(token=raw.decode("utf-8", errors="replace"), logprob=logprob, bytes=list(raw))

    chosen = top(lp.token_id, lp.logprob)
    return TokenLogprob(
        token=chosen.token,
        logprob=chosen.logprob,
        bytes=chosen.bytes,
        top_logprobs=[top(i, v) for i, v in lp.top],
    )
