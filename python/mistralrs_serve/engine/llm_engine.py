"""The synchronous engine: one `step()` = schedule, run the model, sample,
postprocess. The Rust scheduler decides what runs and holds every sequence's
tokens; the model runner (model_runner.py) runs the step and samples; the
engine turns the sampled ids into each request's outputs."""

from __future__ import annotations

import functools
import itertools
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import torch

from mistralrs_serve import _native
from mistralrs_serve.config import EngineConfig
from mistralrs_serve.engine.engine_info import CheckedPrompt, EngineInfo
from mistralrs_serve.engine.grammar import GrammarCompiler
from mistralrs_serve.engine.media import StepMedia, step_media
from mistralrs_serve.engine.model_runner import ModelRunner
from mistralrs_serve.engine.sequence import (
    CompletionOutput,
    OutputCallback,
    Request,
    Sequence,
    StepOutput,
    TokenLogprob,
)
from mistralrs_serve.models.loader import LoadedModel
from mistralrs_serve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.runner = ModelRunner(loaded, self.config)
        self.max_model_len = self.runner.max_model_len
        num_blocks = self.runner.cache.num_blocks
        self.num_kv_tokens = self.runner.num_kv_tokens
        self.scheduler = _native.Scheduler(
            num_blocks=num_blocks,
            block_size=self.config.block_size,
            max_num_seqs=self.config.max_num_seqs,
            max_num_batched_tokens=self.config.max_num_batched_tokens,
            enable_prefix_caching=self.config.enable_prefix_caching,
            sliding_window=(
                self.runner.kv_window
                if self.config.free_kv_behind_window and not self.runner.kv_groups
                else None
            ),
            kv_groups=self.runner.kv_groups or None,
        )
        self.grammars = GrammarCompiler(self.tokenizer, self.model.config.vocab_size)
        # Grammar masks of a step are filled on this thread while the model runs.
        self._mask_worker = ThreadPoolExecutor(1, thread_name_prefix="grammar-mask")
        # The token trie, built off the engine thread before the first constrained request needs it.
        self._mask_worker.submit(lambda: self.grammars.vocabulary)
        # Called on the engine thread with each request that finished (not aborted): metrics.
        self.finished_hooks: list[Callable[[Request], None]] = []
        self.requests: dict[str, Request] = {}
        self.sequences: dict[int, Sequence] = {}
        self._seq_ids = itertools.count()

    def decode_weight_bytes(self) -> int:
        """Weight bytes one decode step reads, by whichever path runs it."""
        return self.runner.decode_weight_bytes()

    # --- requests -------------------------------------------------------

    @functools.cached_property
    def info(self) -> EngineInfo:
        """The read-only view serving uses, on any thread (see EngineInfo)."""
        return EngineInfo.of(self)

    def add_request(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        on_output: OutputCallback,
        param: str = "prompt",
    ) -> Request:
        """Check a prompt, then add it: for callers that drive the engine on their own thread."""
        return self.add_checked(request_id, self.info.check_prompt(prompt_ids, params, param), on_output)

    def add_checked(self, request_id: str, prompt: CheckedPrompt, on_output: OutputCallback) -> Request:
        """Queue a prompt `EngineInfo.check_prompt` accepted; nothing is checked again."""
        if request_id in self.requests:  # ids come from EngineLoop or the caller's own counter
            raise ValueError(f"request id {request_id!r} is already running")
        params = prompt.params
        prompt_ids = np.asarray(prompt.prompt_ids, dtype=np.uint32)
        req = Request(request_id, prompt_ids, params, prompt.max_new_tokens, on_output)
        req.matcher, req.media = prompt.matcher, prompt.media
        leader = self._new_sequence(req)
        spans = prompt.media.spans() if prompt.media is not None else None
        self.scheduler.add(leader.seq_id, req.prompt_ids, params.n - 1, spans=spans)
        self.requests[request_id] = req
        return req

    def _new_sequence(self, req: Request) -> Sequence:
        index = len(req.seq_ids)
        native = req.params.to_native(lambda s: self.tokenizer.encode(s, add_special_tokens=False), index)
        stop_ids = frozenset(req.params.stop_token_ids) | (
            frozenset() if req.params.ignore_eos else self.tokenizer.eos_token_ids
        )
        seq = Sequence(next(self._seq_ids), index, req, self.tokenizer, native, stop_ids)
        seq.matcher = req.matcher.fork() if req.matcher is not None else None
        req.seq_ids.append(seq.seq_id)
        req.num_unfinished += 1
        self.sequences[seq.seq_id] = seq
        return seq

    def abort_request(self, request_id: str) -> bool:
        """Stop a request at any point and free its KV blocks."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        for seq_id in req.seq_ids:
            seq = self.sequences.pop(seq_id, None)
            if seq is not None and not seq.finished:
                self.scheduler.finish(seq_id)
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # --- one step -------------------------------------------------------

    def step(self) -> int:
        """Run one step; outputs go to each request's callback. Returns tokens computed."""
        plan = self.scheduler.schedule()
        if plan.num_seqs == 0:
            return 0
        if not plan.is_decode_only:  # a sequence's first step is a prefill
            self._note_cached_prefixes(plan)
        # Forks for n > 1 start now, so their grammar masks fill while the model runs.
        rows, seqs = self._rows_to_sample(plan.sampled_seq_ids)
        masks = self._start_masks(seqs)
        logits = self.runner.execute(plan, self._step_media(plan))
        if seqs:
            self._postprocess(logits, rows, seqs, masks)
        return plan.num_tokens

    def _step_media(self, plan: _native.StepPlan) -> StepMedia | None:
        """The step's images, when one of its sequences has any (engine/media.py); a
        text-only model's steps have none, and are not looked through."""
        if not self.runner.takes_media:
            return None
        media = []
        for seq_id in plan.seq_ids.tolist():
            seq = self.sequences.get(seq_id)
            media.append(seq.request.media if seq is not None else None)
        if not any(m is not None for m in media):
            return None
        return step_media(
            plan.query_lens,
            plan.context_lens,
            plan.num_tokens,
            media,
            self.runner.multimodal_rope,
            self.runner.device,
        )

    def _note_cached_prefixes(self, plan: _native.StepPlan) -> None:
        """A request's first chunk starts after the prompt tokens the prefix cache
        served: usage reports them as cached."""
        for seq_id, num_context, num_query in zip(
            plan.seq_ids.tolist(), plan.context_lens.tolist(), plan.query_lens.tolist(), strict=True
        ):
            seq = self.sequences.get(seq_id)
            if seq is not None and seq.request.num_cached_tokens is None:
                seq.request.num_cached_tokens = num_context - num_query

    def _start_masks(self, seqs: list[Sequence]) -> Future[tuple[np.ndarray, list[str | None]]] | None:
        """Grammar bitmasks of the constrained rows, filled on the mask worker
        (the Rust call releases the GIL). None when no row is constrained."""
        matchers = [s.matcher for s in seqs if s.matcher is not None]
        if not matchers:
            return None
        return self._mask_worker.submit(self.grammars.bitmask, matchers)

    def _postprocess(
        self,
        logits: torch.Tensor,
        rows: list[int],
        seqs: list[Sequence],
        masks: Future[tuple[np.ndarray, list[str | None]]] | None,
    ) -> None:
        """Sample each choice's token and hand it to its request."""
        now = time.monotonic()
        bitmask = None
        if masks is not None:
            bitmask, rows, seqs = self._grammar_rows(masks, rows, seqs, now)
            if not seqs:
                return
        ids, lps, top_ids, top_lps = self.runner.sample(logits, rows, seqs, bitmask, self.scheduler)
        for i, seq in enumerate(seqs):
            logprob = None
            if not np.isnan(lps[i]):
                top = tuple((int(t), float(v)) for t, v in zip(top_ids[i], top_lps[i], strict=True) if t >= 0)
                logprob = TokenLogprob(int(ids[i]), float(lps[i]), top)
            token_id = int(ids[i])
            if seq.matcher is not None:
                try:
                    seq.matcher.consume(token_id)
                except RuntimeError as e:
                    self._fail_sequence(seq, str(e), now)
                    continue
            self._emit(seq, seq.append(token_id, logprob), now)

    def _grammar_rows(
        self,
        masks: Future[tuple[np.ndarray, list[str | None]]],
        rows: list[int],
        seqs: list[Sequence],
        now: float,
    ) -> tuple[np.ndarray, list[int], list[Sequence]]:
        """The bitmask for every row to sample (all ones where unconstrained);
        a row whose matcher failed ends its sequence with the error and is dropped."""
        constrained, errors = masks.result()
        full = np.full((len(seqs), constrained.shape[1]), 0xFFFFFFFF, dtype=np.uint32)
        keep: list[int] = []
        j = 0
        for i, seq in enumerate(seqs):
            if seq.matcher is not None:
                full[i] = constrained[j]
                error = errors[j]
                j += 1
                if error is not None:
                    self._fail_sequence(seq, f"the grammar failed: {error}", now)
                    continue
            keep.append(i)
        return full[keep], [rows[i] for i in keep], [seqs[i] for i in keep]

    def _fail_sequence(self, seq: Sequence, message: str, now: float) -> None:
        """End one choice with an error; the rest of the batch goes on."""
        logger.warning("request %s choice %d failed: %s", seq.request.request_id, seq.index, message)
        seq.finished = True
        self._emit(seq, StepOutput(seq.index, -1, "", finish_reason="abort", error=message), now)

    def _rows_to_sample(self, seq_ids: np.ndarray) -> tuple[list[int], list[Sequence]]:
        """Logits row per sequence; a request's first token also starts its other choices,
        which fork the leader's blocks and sample from the same row."""
        rows: list[int] = []
        seqs: list[Sequence] = []
        for row, seq_id in enumerate(seq_ids.tolist()):
            seq = self.sequences.get(seq_id)
            if seq is None:
                continue
            rows.append(row)
            seqs.append(seq)
            req = seq.request
            while req.num_pending_forks > 0:
                child = self._new_sequence(req)
                self.scheduler.fork(seq.seq_id, child.seq_id)
                rows.append(row)
                seqs.append(child)
        return rows, seqs

    def _emit(self, seq: Sequence, out: StepOutput, now: float) -> None:
        req = seq.request
        times = req.times
        times.first_token = times.first_token or now
        times.tokens.append(now)
        if seq.finished:
            self.scheduler.finish(seq.seq_id)
            self.sequences.pop(seq.seq_id, None)
            req.num_unfinished -= 1
            out = replace(out, num_cached_tokens=req.num_cached_tokens or 0)
            if req.num_unfinished == 0:
                times.finished = now
                self.requests.pop(req.request_id, None)
                for hook in self.finished_hooks:
                    hook(req)
        else:
            self.scheduler.append_token(seq.seq_id, out.token_id)
        req.on_output(out)

    def fail_all(self, message: str) -> None:
        """End every request with an error (the model step raised)."""
        for request_id, req in list(self.requests.items()):
            self.abort_request(request_id)
            for index in range(req.params.n):
                req.on_output(StepOutput(index, -1, "", finish_reason="abort", error=message))

    # --- blocking helpers (no background loop running) ------------------

    def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        param: str = "prompt",
        request_id: str | None = None,
    ) -> list[CompletionOutput]:
        """Run one request to completion on this thread."""
        outputs = [CompletionOutput(i) for i in range(params.n)]
        request_id = request_id or f"sync-{next(self._seq_ids)}"
        self.add_request(request_id, prompt_ids, params, lambda out: outputs[out.index].add(out), param)
        while request_id in self.requests:
            self.step()
        return outputs
