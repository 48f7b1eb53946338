"""The ways one scheduled step can run the model, behind one interface:
`forward(plan)` returns the fp32 logits of the plan's sampled rows. The runner
picks one per engine (model_runner.py)."""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from mistralrs_serve import _native
from mistralrs_serve.engine.cuda_graphs import DecodeGraphs, NotCapturable
from mistralrs_serve.engine.kv_cache import PagedKVCache
from mistralrs_serve.engine.media import StepMedia
from mistralrs_serve.layers.attention import (
    PLAIN,
    AttentionBackend,
    AttentionKernel,
    LayerAttention,
    PagedAttention,
)
from mistralrs_serve.layers.attention_plan import Spans
from mistralrs_serve.layers.linear import int4_rows
from mistralrs_serve.models.interface import CausalLM, FusedForward


class ForwardPath(Protocol):
    def forward(self, plan: _native.StepPlan, media: StepMedia | None = None) -> torch.Tensor:
        """fp32 logits (len(plan.logit_rows), vocab) of one step; the KV goes into the cache.
        media: the step's images (engine/media.py), on the paths that take them."""
        ...

    def decode_weight_bytes(self) -> int:
        """Weight bytes one decode step reads on this path."""
        ...


class GroupedAttention:
    """The attention of a step over a cache in several KV groups (kv_cache.KVLayout):
    one PagedAttention per group over its slots and tables, a layer's call going to its
    group's at its place in a block."""

    def __init__(
        self,
        cache: PagedKVCache,
        plan: _native.StepPlan,
        kernel: AttentionKernel,
        bidirectional: Spans | None = None,
    ) -> None:
        seqs = plan.num_seqs
        self.places = cache.layout.places
        self.groups = [
            PagedAttention(
                cache,
                plan.query_lens,
                plan.context_lens,
                plan.group_slot_mapping[g],
                plan.group_block_tables[g * seqs : (g + 1) * seqs],
                decode_mode=kernel,
                bidirectional=bidirectional,
            )
            for g in range(plan.num_groups)
        ]

    def attend(
        self,
        layer_idx: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        how: LayerAttention = PLAIN,
    ) -> torch.Tensor:
        group, place = self.places[layer_idx]
        return self.groups[group].attend(place, q, k, v, how)


class TorchPath:
    """The model's torch forward over the paged cache, attention by the Rust
    decode kernel on the CPU and SDPA elsewhere."""

    kernel: AttentionKernel = "native"

    def __init__(self, model: CausalLM, cache: PagedKVCache) -> None:
        self.model, self.cache = model, cache
        self.device = cache.kv.device

    def forward(self, plan: _native.StepPlan, media: StepMedia | None = None) -> torch.Tensor:
        attn: AttentionBackend
        spans = media.bidirectional if media is not None and media.has_bidirectional else None
        if plan.num_groups == 1:
            attn = PagedAttention(
                self.cache,
                plan.query_lens,
                plan.context_lens,
                plan.slot_mapping,
                plan.block_tables,
                decode_mode=self.kernel,
                bidirectional=spans,
            )
        else:
            attn = GroupedAttention(self.cache, plan, self.kernel, spans)
        dev = self.device
        args = (
            torch.from_numpy(plan.input_ids).to(dev),
            torch.from_numpy(plan.positions).to(dev),
            attn,
            torch.from_numpy(plan.logit_rows).to(dev),
            int4_rows(plan.query_lens) if dev.type == "cpu" else None,  # the 4-bit kernel is CPU-only
        )
        # media only to the families that take it (vision-language text models)
        return self.model.forward(*args) if media is None else self.model.forward(*args, media=media)

    def decode_weight_bytes(self) -> int:
        return self.model.decode_weight_bytes()


class TritonPath(TorchPath):
    """The torch forward with Triton kernels: paged attention, KV store, RMSNorm, SwiGLU."""

    kernel: AttentionKernel = "triton"

    def __init__(self, model: CausalLM, cache: PagedKVCache) -> None:
        super().__init__(model, cache)
        model.use_triton()


class RowBuffer:
    """An fp32 array of rows kept from step to step, grown when a step needs more rows.

    A step's logits are read before the next step begins (the engine samples them at
    once), so the fused path writes them into the same memory each time. A fresh array
    per step (12 MB for 64 rows of a 49k vocabulary) is fresh pages for the kernel to
    fault in and zero on every step wherever malloc gives that memory back between steps,
    as it does from an engine thread's own arena when nothing else lives there (seen in a
    Ray replica: 20 times the page faults of the single server, and 7% more CPU)."""

    def __init__(self) -> None:
        self.array = np.empty((0, 0), dtype=np.float32)

    def rows(self, n: int, width: int) -> np.ndarray:
        if self.array.shape[1] != width or self.array.shape[0] < n:
            self.array = np.empty((max(n, 2 * self.array.shape[0]), width), dtype=np.float32)
        return self.array[:n]


class FusedPath:
    """The whole step in one native call (the model family's FusedForward)."""

    def __init__(self, fused: FusedForward) -> None:
        self.fused = fused
        self.logits = RowBuffer()

    def forward(self, plan: _native.StepPlan, media: StepMedia | None = None) -> torch.Tensor:
        if media is not None:
            raise ValueError("the fused forward takes no image embeddings (the runner picks torch for them)")
        # every token a row with its own block tables and context (its position + 1),
        # each KV group's slots and tables after the group before's
        groups, seqs = plan.num_groups, plan.num_seqs
        tables = plan.group_block_tables.reshape(groups, seqs, -1)
        return self.fused.forward(
            plan.input_ids,
            plan.positions,
            plan.group_slot_mapping.reshape(-1),
            np.repeat(tables, plan.query_lens, axis=1).reshape(groups * plan.num_tokens, -1),
            plan.positions + 1,
            plan.logit_rows,
            out=self.logits.rows(len(plan.logit_rows), self.fused.vocab),
        )

    def decode_weight_bytes(self) -> int:
        return int(self.fused.weight_bytes)


class GraphPath:
    """Decode-only steps replayed from CUDA graphs (engine/cuda_graphs.py); every
    other step, and decodes past the captured context, on the eager path."""

    def __init__(self, graphs: DecodeGraphs, eager: ForwardPath) -> None:
        self.graphs, self.eager = graphs, eager

    def forward(self, plan: _native.StepPlan, media: StepMedia | None = None) -> torch.Tensor:
        bucket = None if media is not None else self.graphs.bucket_for(plan)
        if bucket is None:  # steps with images (or their rotary shift) run eagerly
            return self.eager.forward(plan, media)
        try:
            return self.graphs.run(bucket, plan)
        except NotCapturable:  # the eager step rewrites the same KV slots the partial one wrote
            return self.eager.forward(plan)

    def decode_weight_bytes(self) -> int:
        return self.eager.decode_weight_bytes()
