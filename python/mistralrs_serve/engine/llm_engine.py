"""The synchronous engine: one `step()` = schedule, run the model, sample,
postprocess. The Rust scheduler decides what runs; torch runs it over the
paged KV cache; the Rust sampler picks tokens for every row at once."""

from __future__ import annotations

import functools
import itertools
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from mistralrs_serve import _native
from mistralrs_serve.config import EngineConfig
from mistralrs_serve.engine.cuda_graphs import DecodeGraphs
from mistralrs_serve.engine.engine_info import CheckedPrompt, EngineInfo
from mistralrs_serve.engine.grammar import GrammarCompiler
from mistralrs_serve.engine.native_forward import NativeForward
from mistralrs_serve.engine.paged_cache import PagedAttention, PagedKVCache
from mistralrs_serve.engine.sequence import (
    CompletionOutput,
    OutputCallback,
    Request,
    Sequence,
    StepOutput,
    TokenLogprob,
)
from mistralrs_serve.layers.linear import INT4_MAX_ROWS
from mistralrs_serve.models.loader import LoadedModel
from mistralrs_serve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# The KV cache has the model's compute dtype (bf16 by default): keys and
# values come out of its matmuls, so a wider cache would hold the same values
# in more bytes, and decode attention is bound by reading them.


def resolve_device(name: str) -> torch.device:
    """EngineConfig.device: "auto" is the first GPU when torch sees one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA GPU (use --device cpu)")
    return device


class LLMEngine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = resolve_device(self.config.device)
        if self.model.device != self.device:
            self.model.to(self.device)
        self.use_triton = self.config.triton if self.config.triton is not None else self.device.type == "cuda"
        if self.use_triton:
            self.model.use_triton()
        cache_dtype = self.model.dtype
        model_len = loaded.config.max_position_embeddings
        self.max_model_len = min(model_len, self.config.max_model_len or model_len)
        cfg, block_size = loaded.config, self.config.block_size
        budget = self.config.kv_cache_mb << 20
        num_blocks = PagedKVCache.num_blocks_for_budget(cfg, block_size, cache_dtype, budget)
        self.cache = PagedKVCache(cfg, num_blocks, block_size, cache_dtype, self.device)
        self.scheduler = _native.Scheduler(
            num_blocks=num_blocks,
            block_size=block_size,
            max_num_seqs=self.config.max_num_seqs,
            max_num_batched_tokens=self.config.max_num_batched_tokens,
            enable_prefix_caching=self.config.enable_prefix_caching,
        )
        logger.info(
            "KV cache on %s: %d blocks of %d tokens (%d tokens, %d MiB, %s)%s",
            self.device,
            num_blocks,
            block_size,
            num_blocks * block_size,
            num_blocks * PagedKVCache.bytes_per_block(cfg, block_size, cache_dtype) >> 20,
            str(cache_dtype).removeprefix("torch."),
            "; Triton kernels" if self.use_triton else "",
        )
        self.num_kv_tokens = num_blocks * block_size
        self.graphs = self._decode_graphs()
        on_cpu = self.device.type == "cpu" and not self.use_triton
        self.native = (
            NativeForward.build(self.model, self.cache) if on_cpu and self.config.native_forward else None
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
        if self.native is not None:
            return int(self.native.decoder.weight_bytes)
        return self.model.decode_weight_bytes()

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
        req.matcher = prompt.matcher
        leader = self._new_sequence(req)
        self.scheduler.add(leader.seq_id, req.prompt_ids, params.n - 1)
        self.requests[request_id] = req
        return req

    def _new_sequence(self, req: Request) -> Sequence:
        index = len(req.seq_ids)
        native = req.params.to_native(
            self.model.config.vocab_size, lambda s: self.tokenizer.encode(s, add_special_tokens=False), index
        )
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
        if len(plan["seq_ids"]) == 0:
            return 0
        self.cache.copy_blocks(plan["copy_ops"])
        # Forks for n > 1 start now, so their grammar masks fill while the model runs.
        rows, seqs = self._rows_to_sample(plan["seq_ids"][plan["sample"]])
        masks = self._start_masks(seqs)
        bucket = self._graph_bucket(plan)
        if bucket is not None and self.graphs is not None:
            logits = self.graphs.run(bucket, plan)
        elif self.native is not None:
            logits = self._forward_native(plan)
        else:
            logits = self._forward(plan)
        if seqs:
            self._sample_and_update(logits, rows, seqs, masks)
        return len(plan["input_ids"])

    def _forward(self, plan: dict[str, np.ndarray]) -> torch.Tensor:
        """fp32 logits of the step's sampled rows, over the paged cache."""
        attn = PagedAttention(
            self.cache,
            plan["query_lens"],
            plan["context_lens"],
            plan["slot_mapping"],
            plan["block_tables"],
            decode_mode="triton" if self.use_triton else "native",
        )
        qlens = plan["query_lens"]
        last_rows = np.cumsum(qlens) - 1
        sample_rows = last_rows[plan["sample"]]
        dev = self.device
        on_cpu = dev.type == "cpu"
        logits = self.model.forward(
            torch.from_numpy(plan["input_ids"]).to(dev),
            torch.from_numpy(plan["positions"]).to(dev),
            attn,
            torch.from_numpy(sample_rows).to(dev),
            _int4_rows(qlens, last_rows) if on_cpu else None,  # the 4-bit kernel is CPU-only
        )
        if not on_cpu and not self.use_triton:
            logits = logits.cpu()  # the Rust sampler reads host memory
        return logits

    def _forward_native(self, plan: dict[str, np.ndarray]) -> torch.Tensor:
        """The whole step on the fused Rust forward: every token is a row with
        its own position, slot and (its sequence's) block table; a prefill
        chunk's rows attend causally together. Logits of the sampled rows."""
        assert self.native is not None
        qlens = plan["query_lens"]
        return self.native.forward(
            plan["input_ids"],
            plan["positions"],
            plan["slot_mapping"],
            np.repeat(plan["block_tables"], qlens, axis=0),
            plan["positions"].astype(np.int64) + 1,
            (np.cumsum(qlens) - 1)[plan["sample"]],
        )

    def _decode_graphs(self) -> DecodeGraphs | None:
        """CUDA graphs of decode steps: by default with Triton on CUDA (see EngineConfig.cuda_graphs)."""
        on_cuda = self.device.type == "cuda"
        wanted = self.config.cuda_graphs if self.config.cuda_graphs is not None else on_cuda
        if not wanted or not self.use_triton:
            return None
        max_context = min(self.max_model_len, self.config.cuda_graph_max_context)
        return DecodeGraphs(self.model, self.cache, self.config.max_num_seqs, max_context, capture=on_cuda)

    def _graph_bucket(self, plan: dict[str, np.ndarray]) -> int | None:
        """The graph bucket of a decode-only step (one token per sequence, all sampled), else None."""
        if self.graphs is None:
            return None
        qlens = plan["query_lens"]
        if len(plan["input_ids"]) != len(qlens) or not (qlens == 1).all() or not plan["sample"].all():
            return None
        return self.graphs.bucket(len(qlens), int(plan["context_lens"].max()), plan["block_tables"].shape[1])

    def _start_masks(self, seqs: list[Sequence]) -> Future[tuple[np.ndarray, list[str | None]]] | None:
        """Grammar bitmasks of the constrained rows, filled on the mask worker
        (the Rust call releases the GIL). None when no row is constrained."""
        matchers = [s.matcher for s in seqs if s.matcher is not None]
        if not matchers:
            return None
        return self._mask_worker.submit(self.grammars.bitmask, matchers)

    def _sample_and_update(
        self,
        logits: torch.Tensor,
        rows: list[int],
        seqs: list[Sequence],
        masks: Future[tuple[np.ndarray, list[str | None]]] | None,
    ) -> None:
        now = time.monotonic()
        bitmask = None
        if masks is not None:
            bitmask, rows, seqs = self._grammar_rows(masks, rows, seqs, now)
            if not seqs:
                return
        if self.use_triton and all(_gpu_samplable(s.request.params) for s in seqs):
            ids, lps, top_ids, top_lps = _sample_on_device(logits, rows, seqs, bitmask)
        else:
            logits_np = logits.cpu().numpy()[rows]  # fancy indexing copies: the sampler writes in place
            if bitmask is not None:
                _native.apply_token_bitmask(logits_np, bitmask)
            ids, lps, top_ids, top_lps = _native.sample(
                logits_np,
                [s.native for s in seqs],
                [s.request.prompt_ids for s in seqs],
                [s.history() for s in seqs],
                [len(s.output_ids) for s in seqs],
            )
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


def _int4_rows(query_lens: np.ndarray, last_rows: np.ndarray) -> torch.Tensor | None:
    """Which rows of a step take the 4-bit kernel (Linear). Prefill rows never
    do; decode rows do when the step has at most INT4_MAX_ROWS of them. So a
    decode computes the same whatever else is in its step, and up to that
    many concurrent requests decode greedily exactly as each would alone.
    None for a decode-only step: Linear's row-count rule says the same."""
    is_decode = query_lens == 1
    num_decodes = int(is_decode.sum())
    if num_decodes == len(query_lens):
        return None
    if num_decodes > INT4_MAX_ROWS:
        return torch.empty(0, dtype=torch.int64)
    return torch.from_numpy(np.ascontiguousarray(last_rows[is_decode], dtype=np.int64))


def _gpu_samplable(params: SamplingParams) -> bool:
    """What the Triton path does: penalties, logit bias, temperature, top-k,
    top-p, min-p. Rows with DRY go to the Rust sampler on the host."""
    return params.dry_multiplier == 0.0


def _has_penalties(params: SamplingParams) -> bool:
    return bool(
        params.repetition_penalty != 1.0
        or params.presence_penalty != 0.0
        or params.frequency_penalty != 0.0
        or params.logit_bias
    )


def _sample_on_device(
    logits: torch.Tensor, rows: list[int], seqs: list[Sequence], bitmask: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The Rust sampler's outputs, from the Triton kernel (and torch.topk for
    top logprobs) where the logits are: only ids and a few floats cross to
    the host. Seeded draws are reproducible, on a different random stream
    than the CPU sampler's."""
    from mistralrs_kernels import triton_ops

    dev = logits.device
    x = logits.index_select(0, torch.tensor(rows, device=dev)).float().contiguous()
    params = [s.request.params for s in seqs]

    def column(values: list[float] | list[int], dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=dev)

    if any(_has_penalties(p) for p in params):
        counts, seen, bias = triton_ops.penalty_tensors(
            [
                s.request.prompt_ids.tolist() if p.repetition_penalty != 1.0 else []
                for s, p in zip(seqs, params, strict=True)
            ],
            [s.output_ids for s in seqs],
            [p.logit_bias for p in params],
            x.shape[1],
            dev,
        )
        triton_ops.apply_penalties(
            x,
            counts,
            seen,
            bias,
            column([p.repetition_penalty for p in params], torch.float32),
            column([p.presence_penalty for p in params], torch.float32),
            column([p.frequency_penalty for p in params], torch.float32),
        )
    if bitmask is not None:
        triton_ops.apply_token_bitmask(x, torch.from_numpy(bitmask.view(np.int32)).to(dev))

    temps = [p.temperature for p in params]
    ids_t, lps_t = triton_ops.sample(
        x,
        column(temps, torch.float32),
        column([max(p.top_k, 0) for p in params], torch.int32),
        column([p.top_p for p in params], torch.float32),
        column([p.min_p for p in params], torch.float32),
        column([s.native.seed & (2**63 - 1) for s in seqs], torch.int64),
        column([len(s.output_ids) for s in seqs], torch.int64),
    )
    width = max((p.top_logprobs for p in params if p.logprobs), default=0)
    top_ids = np.full((len(seqs), width), -1, dtype=np.int64)
    top_lps = np.full((len(seqs), width), np.nan, dtype=np.float32)
    if width:
        scale = column([1.0 / t if t > 0 else 1.0 for t in temps], torch.float32)
        values, indices = torch.log_softmax(x * scale[:, None], dim=-1).topk(width, dim=-1)
        top_ids[:], top_lps[:] = indices.cpu().numpy(), values.cpu().numpy()
        for i, p in enumerate(params):
            keep = p.top_logprobs if p.logprobs else 0
            top_ids[i, keep:], top_lps[i, keep:] = -1, np.nan
    lps = lps_t.cpu().numpy()
    lps[[i for i, p in enumerate(params) if not p.logprobs]] = np.nan
    return ids_t.cpu().numpy(), lps, top_ids, top_lps
