"""CUDA graphs for decode-only steps."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from mistralrs_serve import _native
from mistralrs_serve.engine.kv_cache import PagedKVCache
from mistralrs_serve.layers.attention import PLAIN, LayerAttention, decode_triton, store_kv_triton
from mistralrs_serve.models.interface import CausalLM

logger = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class NotCapturable(RuntimeError):
    """A layer the captured decode step has no kernel for (sliding windows,
    soft-capped scores): the model's decodes run on the eager path instead."""


class StaticDecodeAttention:
    """The attention backend of a captured decode step: the Triton KV store
    and paged decode kernels over the static buffers' first `rows` rows."""

    def __init__(self, graphs: DecodeGraphs, rows: int) -> None:
        self.cache = graphs.cache
        self.slots = graphs.slots[:rows]
        self.tables = graphs.tables[:rows]
        self.context_lens = graphs.context_lens[:rows]
        self.max_context = graphs.max_context

    def attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, how: LayerAttention = PLAIN
    ) -> torch.Tensor:
        if (how.window is not None and how.window < self.max_context) or how.softcap is not None:
            raise NotCapturable(f"layer {layer_idx} attends with {how}: no captured decode kernel for it")
        store_kv_triton(self.cache, layer_idx, k, v, self.slots)
        scale = how.scale if how.scale is not None else 1.0 / float(self.cache.head_dim) ** 0.5
        out = decode_triton(self.cache, layer_idx, q, self.tables, self.context_lens, self.max_context, scale)
        return out.to(q.dtype)


class DecodeGraphs:
    """One captured decode forward per batch-size bucket, captured on first use.

    A decode step launches a few hundred small kernels whose CPU launch cost,
    at batch 1 on a GPU, exceeds their run time. So each batch-size bucket's
    whole forward is captured once into a CUDA graph over static buffers
    (token ids, positions, slots, block tables, context lengths) and replayed:
    a step copies its plan into the buffers and launches one graph.

    Static shapes: a step of n sequences runs the smallest bucket >= n, the
    extra rows padded (slot -1, so the KV store skips them; context 1 over
    block 0, read and discarded). The decode attention kernel is launched for
    `max_context` positions (programs past a row's context exit at once), so one
    graph serves every context length up to it; longer steps run eagerly.

    Without CUDA (`capture=False`), `run` executes the same static-buffer
    forward eagerly: the tests check it against the ordinary path on the CPU.
    """

    def __init__(
        self,
        model: CausalLM,
        cache: PagedKVCache,
        max_num_seqs: int,
        max_context: int,
        *,
        capture: bool,
    ) -> None:
        self.model = model
        self.cache = cache
        self.capture = capture
        self.not_capturable = False  # set for good when a layer has no captured kernel
        self.buckets = sorted({b for b in BUCKETS if b < max_num_seqs} | {max_num_seqs})
        rows = self.buckets[-1]
        bs = cache.block_size
        self.max_blocks = -(-max_context // bs)
        self.max_context = self.max_blocks * bs
        dev = cache.kv.device
        self.input_ids = torch.zeros(rows, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(rows, dtype=torch.int64, device=dev)
        self.slots = torch.full((rows,), -1, dtype=torch.int64, device=dev)
        self.tables = torch.zeros((rows, self.max_blocks), dtype=torch.int32, device=dev)
        self.context_lens = torch.ones(rows, dtype=torch.int32, device=dev)
        self.sample_rows = torch.arange(rows, dtype=torch.int64, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self._pool: Any = None  # the graphs share one memory pool

    def bucket(self, num_seqs: int, max_context_len: int, max_table_blocks: int) -> int | None:
        """The bucket a decode step of this shape replays, or None to run it eagerly."""
        if self.not_capturable:
            return None
        if max_context_len > self.max_context or max_table_blocks > self.max_blocks:
            return None
        return next((b for b in self.buckets if b >= num_seqs), None)

    def bucket_for(self, plan: _native.StepPlan) -> int | None:
        """The bucket of a decode-only step (one token per sequence, all sampled), else None."""
        if not plan.is_decode_only:
            return None
        return self.bucket(plan.num_seqs, int(plan.context_lens.max()), plan.block_tables.shape[1])

    def run(self, bucket: int, plan: _native.StepPlan) -> torch.Tensor:
        """fp32 logits (num_seqs, vocab) of a decode-only step (one row per sequence);
        NotCapturable (then for good) where the model has layers the graphs cannot run."""
        try:
            return self._run(bucket, plan)
        except NotCapturable:
            logger.info(
                "the model's decode steps cannot be captured (windowed or soft-capped attention); eager"
            )
            self.not_capturable = True
            raise

    def _run(self, bucket: int, plan: _native.StepPlan) -> torch.Tensor:
        n = plan.num_seqs
        self._fill(n, bucket, plan)
        if not self.capture:
            return self._forward(bucket)[:n]
        if bucket not in self.graphs:
            try:
                self._capture(bucket)
            except NotCapturable:
                raise
            except Exception:  # a kernel that cannot be captured must not stop serving
                logger.exception("capturing the decode graph of batch %d failed; decode runs eagerly", bucket)
                self.capture = False
                return self._forward(bucket)[:n]
        self.graphs[bucket].replay()
        return self.outputs[bucket][:n]

    def _fill(self, n: int, bucket: int, plan: _native.StepPlan) -> None:
        dev = self.input_ids.device

        def put(dst: torch.Tensor, values: np.ndarray) -> None:
            dst[:n].copy_(torch.from_numpy(np.ascontiguousarray(values)).to(dev, non_blocking=True))

        put(self.input_ids, plan.input_ids[:n])
        put(self.positions, plan.positions[:n])
        put(self.slots, plan.slot_mapping[:n])
        put(self.context_lens, plan.context_lens.astype(np.int32))
        tables = plan.block_tables
        width = tables.shape[1] if tables.ndim == 2 else 0
        self.tables[:n, :width].copy_(torch.from_numpy(np.ascontiguousarray(tables, dtype=np.int32)).to(dev))
        if n < bucket:  # padding rows: no KV write, one position of block 0
            self.slots[n:bucket].fill_(-1)
            self.context_lens[n:bucket].fill_(1)
            self.tables[n:bucket].zero_()
            self.input_ids[n:bucket].zero_()
            self.positions[n:bucket].zero_()

    def _forward(self, bucket: int) -> torch.Tensor:
        attn = StaticDecodeAttention(self, bucket)
        return self.model.forward(
            self.input_ids[:bucket], self.positions[:bucket], attn, self.sample_rows[:bucket]
        )

    def _capture(self, bucket: int) -> None:
        """Warm up on a side stream (compiles the Triton kernels), then capture.
        The buffers hold padding-or-real rows, so the warm-up's KV writes are
        the same as the replay's."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._forward(bucket)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._forward(bucket)
        self._pool = graph.pool()
        self.graphs[bucket], self.outputs[bucket] = graph, out
